"""Poison requests ("queries of death"): a request that crashes its model's
worker whenever it runs would otherwise quarantine the whole model after a
few retries. Each crash records a fingerprint (model + canonical request
body) of every request in flight; one found at two crashes of the same model
within the crash window is quarantined instead: refused at once (422) for a
while, and its crashes no longer count toward the model's crash loop.

Requests in flight alongside a poison one share its first crash; they are
only implicated again if they are in flight at the second too (a client that
retries the same body exactly then is indistinguishable from the poison).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import msgspec

from lmx_protocol import Embed, Generate, Rerank, encode

Request = Generate | Embed | Rerank


def fingerprint(model_id: str, request: Request) -> str:
    """The request without its id (the same body sent twice has two ids),
    hashed together with the model it ran on."""
    canonical = encode(msgspec.structs.replace(request, request_id=""))
    digest = hashlib.blake2b(canonical, digest_size=16, person=b"lmx-poison")
    digest.update(model_id.encode())
    return digest.hexdigest()


@dataclass
class QuarantinedRequest:
    model_id: str
    fingerprint: str
    until: float  # monotonic
    crashes: int
    quarantined_at: float = field(default_factory=time.time)  # wall clock, for people

    def remaining(self, now: float) -> float:
        return max(0.0, self.until - now)


class PoisonRegistry:
    def __init__(self, window_sec: float, quarantine_sec: float, max_entries: int) -> None:
        self.window_sec = window_sec
        self.quarantine_sec = quarantine_sec
        self.max_entries = max_entries
        # fingerprint -> (model id, monotonic times of the crashes it was in flight at)
        self._suspects: OrderedDict[str, tuple[str, list[float]]] = OrderedDict()
        self._quarantined: OrderedDict[str, QuarantinedRequest] = OrderedDict()

    def record_crash(self, model_id: str, fingerprints: set[str], now: float | None = None
                     ) -> tuple[list[QuarantinedRequest], set[float]]:
        """Note a crash of `model_id` with these requests in flight. Returns
        the requests quarantined by it and the times of the earlier crashes
        they were in (which then no longer count toward the model's loop)."""
        now = time.monotonic() if now is None else now
        newly: list[QuarantinedRequest] = []
        earlier: set[float] = set()
        for fp in sorted(fingerprints):
            _, times = self._suspects.pop(fp, (model_id, []))
            times = [t for t in times if now - t <= self.window_sec] + [now]
            if len(times) >= 2:
                entry = QuarantinedRequest(model_id, fp, now + self.quarantine_sec, len(times))
                self._quarantined[fp] = entry
                self._quarantined.move_to_end(fp)
                newly.append(entry)
                earlier.update(t for t in times if t != now)
            else:
                self._suspects[fp] = (model_id, times)
        self._trim()
        return newly, earlier

    def check(self, fp: str, now: float | None = None) -> QuarantinedRequest | None:
        entry = self._quarantined.get(fp)
        if entry is None:
            return None
        if entry.remaining(time.monotonic() if now is None else now) <= 0:
            del self._quarantined[fp]
            return None
        return entry

    def quarantined(self, model_id: str, now: float | None = None) -> list[QuarantinedRequest]:
        now = time.monotonic() if now is None else now
        self._expire(now)
        return [e for e in self._quarantined.values() if e.model_id == model_id]

    def clear(self, model_id: str) -> None:
        """Forget a model's suspects and quarantined requests (an operator
        lifted its quarantine: the fix may be in)."""
        for store in (self._suspects, self._quarantined):
            for fp in [fp for fp, v in store.items()
                       if (v.model_id if isinstance(v, QuarantinedRequest) else v[0]) == model_id]:
                del store[fp]

    def _expire(self, now: float) -> None:
        for fp in [fp for fp, e in self._quarantined.items() if e.remaining(now) <= 0]:
            del self._quarantined[fp]

    def _trim(self) -> None:
        """Bounded: oldest suspects go first, then the oldest quarantines."""
        while len(self._suspects) + len(self._quarantined) > self.max_entries:
            store = self._suspects if self._suspects else self._quarantined
            store.popitem(last=False)
