"""Turns a stream of token bytes into client-visible text.

Two things make this more than concatenation: a token may end inside a
multi-byte UTF-8 character (hold the bytes until the character completes),
and a stop string may arrive split over several tokens (hold back any tail
that could still grow into one, and cut the text where a stop string begins).
Backend-independent: the llama.cpp and MLX engines both feed bytes here.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: list[str]) -> None:
        self._stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to show.
        After a stop string is found, `stopped` is set and the text before
        it is returned; later feeds return nothing."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        if not self._stop:
            out, self._pending = self._pending, ""
            return out
        found = self._earliest_stop()
        if found is not None:
            cut, self.matched = found
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = self._longest_partial_stop()
        split = len(self._pending) - keep
        out, self._pending = self._pending[:split], self._pending[split:]
        return out

    def flush(self) -> str:
        """Release whatever is held back (generation ended another way)."""
        if self.stopped:
            return ""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out

    def _earliest_stop(self) -> tuple[int, str] | None:
        """Where the first stop string begins, and which one it is (the
        longest, when several begin there)."""
        found = [(i, -len(s), s) for s in self._stop if (i := self._pending.find(s)) >= 0]
        if not found:
            return None
        at, _, stop = min(found)
        return at, stop

    def _longest_partial_stop(self) -> int:
        best = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:k]):
                    best = k
                    break
        return best
