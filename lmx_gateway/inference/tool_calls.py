"""Reading tool calls back out of generated text, incrementally.

`ToolCallParser(fmt)` takes the model's text as it streams (`feed`, then
`finish`) and returns events: `ContentDelta` (text shown to the user),
`CallStart` (a call's index, id and name) and `ArgumentsDelta` (a piece of
the call's arguments, a JSON text). Call markup never reaches content: text
that might be the beginning of a marker is held back until it is decided.
`parse_tool_calls` does the same for a whole text. Formats are those of
`lmx_protocol.tool_formats.ToolFormat`:

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  anywhere in the text (a JSON list of calls inside the tags is accepted);
- mistral: `[TOOL_CALLS]` then a JSON list/object of calls, or
  `name[ARGS]{...}`;
- llama3_json: `{"name": ..., "parameters": {...}}` at the start of the
  output (several separated by `;`), or after `<|python_tag|>`;
- json: a bare JSON call object, or a list of them, as the whole output.

A call is reported (CallStart, then its ArgumentsDelta pieces) only once it
is complete, so every call a client sees is whole, with arguments that are
JSON: a call cut short by max_tokens, or one whose arguments do not parse,
is dropped. A call identical (same name, same arguments) to an earlier one
of the same output ends the turn: it is dropped, everything after it is
ignored, and `ended` tells the caller it may stop the generation (small
models decoding greedily under a `required` grammar repeat one call until
max_tokens otherwise).

In the formats without a marker (llama3_json, json), output that starts
with `{` only counts as a call once it has a "name" (one of the offered
tools, when the parser knows them) and an arguments key; any other JSON is
content. Reusable by every route that offers tools (chat completions,
Anthropic Messages, Responses): the events map onto each API's deltas.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from lmx_protocol.tool_formats import (
    HERMES_CLOSE,
    HERMES_OPEN,
    MISTRAL_ARGS,
    MISTRAL_MARKER,
    PYTHON_TAG,
    ToolFormat,
)

_WS = " \t\r\n"
_MAX_NAME = 128


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ContentDelta:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class ArgumentsDelta:
    index: int
    text: str


ParseEvent = ContentDelta | CallStart | ArgumentsDelta


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""

    def openai(self) -> dict[str, object]:
        """The call in OpenAI's `message.tool_calls[]` shape."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments or "{}"}}


class _Invalid(Exception):
    """The text after a marker is not a call after all."""


@dataclass
class _CallState:
    """One call object being scanned."""

    name: str | None = None
    args_seen: bool = False
    args_string: bool = False  # arguments given as a JSON string (decoded at the end)
    pending_args: list[str] = field(default_factory=list)  # before the call started
    index: int | None = None  # set once CallStart is emitted


class _CallScanner:
    """Char-level scanner for call JSON: one object `{"name": ...,
    "<args key>": ...}` or a list of them. Streams the arguments' raw text
    while it arrives; `done` once the outermost value closes."""

    def __init__(self, parser: ToolCallParser, bare: bool) -> None:
        self.parser = parser
        self.bare = bare  # no marker before it: be strict about what counts
        self.list_mode: bool | None = None
        self.depth = 0  # nesting inside the current call object (1 = its top level)
        self.in_string = False
        self.escape = False
        self.expect = "start"
        self.string_role = ""  # "key" or "value" for a depth-1 string
        self.key = ""
        self.token: list[str] = []  # current depth-1 key, or name/other value text
        self.value_key = ""  # key of the depth-1 value being read
        self.call = _CallState()
        self.done = False

    # The scanner reads `text` and returns how many chars it consumed; it
    # stops right after the outermost value closes.
    def feed(self, text: str) -> int:
        for i, ch in enumerate(text):
            self._char(ch)
            if self.done:
                return i + 1
        return len(text)

    def _char(self, ch: str) -> None:
        if self.depth >= 1 and (self.in_string or self.depth >= 2
                                or self.expect in ("value", "primitive")):
            self._value_char(ch)
            return
        if self.expect == "start":
            if ch in _WS:
                return
            if ch == "[" and self.list_mode is None:
                self.list_mode = True
                self.expect = "object"
                return
            if ch == "{":
                self.list_mode = bool(self.list_mode)
                self._open_call()
                return
            raise _Invalid
        if self.expect == "object":  # in a list, before a call object
            if ch in _WS or ch == ",":
                return
            if ch == "{":
                self._open_call()
                return
            if ch == "]" and self.list_mode:
                self.done = True
                return
            raise _Invalid
        if self.expect == "key":
            if ch in _WS or ch == ",":
                return
            if ch == '"':
                self.in_string, self.string_role, self.token = True, "key", [ch]
                return
            if ch == "}":
                self._close_call()
                return
            raise _Invalid
        if self.expect == "colon":
            if ch in _WS:
                return
            if ch != ":":
                raise _Invalid
            self.expect = "value_start"
            return
        if self.expect == "value_start":
            if ch in _WS:
                return
            self._begin_value(ch)
            return
        if self.expect == "after_value":
            if ch in _WS:
                return
            if ch == ",":
                self.expect = "key"
                return
            if ch == "}":
                self._close_call()
                return
            raise _Invalid
        raise _Invalid

    def _open_call(self) -> None:
        self.depth = 1
        self.call = _CallState()
        self.expect = "key"

    def _close_call(self) -> None:
        call = self.call
        if call.index is None:
            raise _Invalid  # never became a call (no name, or no arguments when bare)
        if call.args_string:
            self.parser._arguments(call, self._decode("".join(call.pending_args)))
            call.pending_args = []
        self.depth = 0
        self.parser._end_call(call)
        if self.list_mode:
            self.expect = "object"
        else:
            self.done = True

    def _begin_value(self, ch: str) -> None:
        self.value_key = self.key
        is_args = self.key in ("arguments", "parameters")
        self.token = []
        if is_args:
            self.call.args_seen = True
            self.call.args_string = ch == '"'
            self.parser._maybe_start(self.call, self.bare)
        if ch == '"':
            self.in_string, self.string_role, self.expect = True, "value", "value"
        elif ch in "{[":
            self.depth += 1
            self.expect = "value"
        else:
            self.expect = "primitive"
        self._record(ch)

    def _record(self, ch: str) -> None:
        if self.value_key in ("arguments", "parameters"):
            if self.call.args_string or self.call.index is None:
                self.call.pending_args.append(ch)
            else:
                self.parser._arguments(self.call, ch)
        else:
            self.token.append(ch)

    def _value_char(self, ch: str) -> None:
        if self.in_string:
            if self.string_role == "key":
                self.token.append(ch)
            else:
                self._record(ch)
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
                if self.string_role == "key":
                    self.key = str(self._decode("".join(self.token)))
                    self.expect = "colon"
                elif self.depth == 1:
                    self._end_value()
            return
        if self.expect == "primitive":
            if ch in _WS or ch in ",}":
                self._end_value()
                self._char(ch)
                return
            self._record(ch)
            return
        self._record(ch)
        if ch == '"':
            self.in_string, self.string_role = True, "value"
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 1:
                self._end_value()

    def _end_value(self) -> None:
        self.expect = "after_value"
        if self.value_key == "name":
            name = self._decode("".join(self.token))
            if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
                raise _Invalid
            self.call.name = name
            self.parser._maybe_start(self.call, self.bare)
        self.value_key = ""

    @staticmethod
    def _decode(text: str) -> object:
        try:
            return json.loads(text)
        except ValueError:
            raise _Invalid from None


class ToolCallParser:
    """Incremental parser for one generation's output. `tool_names`: the
    offered tools (used to tell a call from other JSON in marker-less
    formats; empty = any name)."""

    def __init__(self, fmt: str, tool_names: Collection[str] = (),
                 id_factory: Callable[[], str] = new_call_id) -> None:
        self.format = ToolFormat(fmt) if fmt else ToolFormat.HERMES
        self.tool_names = set(tool_names)
        self._new_id = id_factory
        self.calls: list[ToolCall] = []
        self._events: list[ParseEvent] = []
        self._buf = ""
        self._mode = "text"
        self._region = ""  # raw text since the current marker (emitted as content if invalid)
        self._region_calls = 0
        self._scanner: _CallScanner | None = None
        self._held_space = ""
        self._said_anything = False  # content or call emitted: "start of output" has passed
        self._final = False
        # The call being read: its events wait here until it is complete.
        self._open = False
        self._held: list[ParseEvent] = []
        self._held_feed = -1  # the feed that made the last held ArgumentsDelta
        self._feeds = 0
        self._done_calls: set[tuple[str, str]] = set()  # (name, canonical arguments)
        self.ended = False  # a repeated call ended the turn: the rest is ignored
        if self.format is ToolFormat.HERMES:
            self._markers = [HERMES_OPEN]
        elif self.format is ToolFormat.MISTRAL:
            self._markers = [MISTRAL_MARKER]
        elif self.format is ToolFormat.LLAMA3_JSON:
            self._markers = [PYTHON_TAG]
        else:
            self._markers = []

    # --- public API ---------------------------------------------------------

    def feed(self, text: str) -> list[ParseEvent]:
        """Add generated text; return the events it completes."""
        if self.ended:
            return []
        self._feeds += 1
        self._buf += text
        self._run()
        return self._take()

    def finish(self) -> list[ParseEvent]:
        """The generation ended: decide everything still held back."""
        self._final = True
        self._run()
        if self.ended:
            self._held_space = ""
            return self._take()
        if self._open:
            # A call cut short (max_tokens): never reported, nor its markup.
            self._drop_open()
            self._buf = ""
        elif self._mode != "text" and not self.calls:
            self._content(self._region + self._buf)  # an unfinished, never-started call
            self._buf = ""
        elif self._mode != "text":
            # A call cut short (max_tokens): a started one keeps what it has,
            # the markup of one not yet started is dropped.
            self._buf = ""
        if self._buf:
            self._content(self._buf)
            self._buf = ""
        if self._held_space and not self.calls:
            self._events.append(ContentDelta(self._held_space))
        self._held_space = ""
        return self._take()

    # --- modes --------------------------------------------------------------

    def _run(self) -> None:
        while not self.ended:
            handler = getattr(self, f"_mode_{self._mode}")
            if not handler():
                return

    def _mode_text(self) -> bool:
        buf = self._buf
        if not buf:
            return False
        if not self._said_anything and self.format in (ToolFormat.JSON, ToolFormat.LLAMA3_JSON):
            stripped = buf.lstrip(_WS)
            if not stripped:
                return False  # only whitespace so far: undecided
            opener = "{[" if self.format is ToolFormat.JSON else "{"
            if stripped[0] in opener:
                self._enter_call(buf[: len(buf) - len(stripped)], stripped, bare=True)
                return True
        at, marker = self._find_marker(buf)
        if marker:
            self._content(buf[:at])
            self._region = marker
            self._region_calls = 0
            self._buf = buf[at + len(marker):]
            self._mode = "open"
            return True
        keep = self._partial_marker(buf)
        self._content(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        if self._final:
            # At the end a held marker prefix is text, unless calls came
            # before it: then it is the start of a call cut short (markup).
            if not self.calls:
                self._content(self._buf)
            self._buf = ""
        return False

    def _mode_open(self) -> bool:
        stripped = self._buf.lstrip(_WS)
        if not stripped:
            return False
        if stripped[0] in "{[":
            self._region += self._buf[: len(self._buf) - len(stripped)]
            self._buf = stripped
            self._scanner = _CallScanner(self, bare=False)
            self._mode = "body"
            return True
        if self.format is ToolFormat.MISTRAL:
            self._mode = "mistral_name"
            return True
        self._abandon()
        return True

    def _mode_body(self) -> bool:
        scanner = self._scanner
        assert scanner is not None
        if not self._buf:
            return False
        try:
            used = scanner.feed(self._buf)
        except _Invalid:
            self._abandon()
            return True
        self._region += self._buf[:used]
        self._buf = self._buf[used:]
        if scanner.done:
            self._mode = "after"
            return True
        return False

    def _mode_after(self) -> bool:
        stripped = self._buf.lstrip(_WS)
        if self.format is ToolFormat.HERMES:
            if not stripped:
                return self._settle_if_final()
            if stripped.startswith(HERMES_CLOSE):
                self._buf = stripped[len(HERMES_CLOSE):]
                self._mode = "text"
                return True
            if HERMES_CLOSE.startswith(stripped) and not self._final:
                return False
            self._mode = "text"  # no closing tag: whatever follows is text
            return True
        if self.format is ToolFormat.LLAMA3_JSON:
            if not stripped:
                return self._settle_if_final()
            if stripped[0] == ";":
                self._buf = stripped[1:]
                self._region = ""
                self._mode = "open_bare"
                return True
        self._mode = "text"
        return True

    def _mode_open_bare(self) -> bool:
        stripped = self._buf.lstrip(_WS)
        if not stripped:
            return self._settle_if_final()
        if stripped[0] == "{":
            self._enter_call("", stripped, bare=True)
        else:
            self._mode = "text"
        return True

    def _mode_mistral_name(self) -> bool:
        at = self._buf.find(MISTRAL_ARGS)
        if at < 0:
            if len(self._buf) > _MAX_NAME + len(MISTRAL_ARGS):
                self._abandon()
                return True
            return False
        name = self._buf[:at].strip()
        if not name or any(c in name for c in _WS + '{}[]"'):
            self._abandon()
            return True
        self._region += self._buf[: at + len(MISTRAL_ARGS)]
        self._buf = self._buf[at + len(MISTRAL_ARGS):]
        call = _CallState(name=name, args_seen=True)
        self._maybe_start(call, bare=False)
        self._scanner = _CallScanner(self, bare=False)
        # Read the arguments as the value of a one-key call object.
        self._scanner.call = call
        self._scanner.depth, self._scanner.key, self._scanner.expect = 1, "arguments", "value_start"
        self._mode = "mistral_args"
        return True

    def _mode_mistral_args(self) -> bool:
        scanner = self._scanner
        assert scanner is not None
        if not self._buf:
            return False
        used = 0
        try:
            for ch in self._buf:
                scanner._char(ch)
                used += 1
                if scanner.expect == "after_value":
                    break
        except _Invalid:
            self._buf = self._buf[used:]
            self._close_mistral(scanner)
            return True
        self._buf = self._buf[used:]
        if scanner.expect == "after_value":
            self._close_mistral(scanner)
            return True
        return False

    def _close_mistral(self, scanner: _CallScanner) -> None:
        call = scanner.call
        if call.args_string and call.pending_args:
            with contextlib.suppress(ValueError):
                self._arguments(call, str(json.loads("".join(call.pending_args))))
        self._end_call(call)
        self._mode = "text"

    # --- helpers ------------------------------------------------------------

    def _enter_call(self, space: str, rest: str, bare: bool) -> None:
        self._region = space
        self._region_calls = 0
        self._buf = rest
        self._scanner = _CallScanner(self, bare=bare)
        self._mode = "body"

    def _settle_if_final(self) -> bool:
        if self._final:
            self._buf = ""
            self._mode = "text"
        return False

    def _abandon(self) -> None:
        """What followed the marker was not a call: it is content after all
        (unless a call in this region already went out)."""
        if self._open:
            self._drop_open()  # a started call that turned out malformed
        if self._region_calls == 0:
            self._content(self._region)
        self._region = ""
        self._mode = "text"
        self._said_anything = True

    def _find_marker(self, buf: str) -> tuple[int, str]:
        best, found = len(buf), ""
        for marker in self._markers:
            at = buf.find(marker)
            if 0 <= at < best:
                best, found = at, marker
        return best, found

    def _partial_marker(self, buf: str) -> int:
        """Length of the longest tail of `buf` that could begin a marker."""
        best = 0
        for marker in self._markers:
            for k in range(min(len(marker) - 1, len(buf)), best, -1):
                if buf.endswith(marker[:k]):
                    best = k
                    break
        return best

    def _content(self, text: str) -> None:
        # Trailing whitespace is held: shown if more text follows, dropped
        # if a call does (so streamed and whole parses agree).
        body = text.rstrip(_WS)
        if not body:
            self._held_space += text
            return
        self._events.append(ContentDelta(self._held_space + body))
        self._held_space = text[len(body):]
        self._said_anything = True

    def _maybe_start(self, call: _CallState, bare: bool) -> None:
        if call.index is not None or call.name is None:
            return
        if bare and not call.args_seen:
            return
        if bare and self.tool_names and call.name not in self.tool_names:
            raise _Invalid
        call.index = len(self.calls)
        tool_call = ToolCall(self._new_id(), call.name)
        self.calls.append(tool_call)
        self._region_calls += 1
        self._said_anything = True
        self._held_space = ""  # whitespace before a call is not content
        self._open = True
        self._held.append(CallStart(call.index, tool_call.id, call.name))
        if call.pending_args and not call.args_string:
            self._arguments(call, "".join(call.pending_args))
            call.pending_args = []

    def _arguments(self, call: _CallState, text: object) -> None:
        assert call.index is not None
        piece = text if isinstance(text, str) else json.dumps(text)
        if not piece:
            return
        self.calls[call.index].arguments += piece
        held = self._held
        if (held and isinstance(held[-1], ArgumentsDelta) and held[-1].index == call.index
                and self._held_feed == self._feeds):
            held[-1].text += piece  # one delta per feed, not one per char
        else:
            held.append(ArgumentsDelta(call.index, piece))
            self._held_feed = self._feeds

    def _end_call(self, call: _CallState) -> None:
        if call.index is None:
            raise _Invalid
        if not self._open:
            return
        done = self.calls[call.index]
        arguments = _canonical(done.arguments)
        if arguments is None:  # not JSON after all
            self._drop_open()
            return
        if (done.name, arguments) in self._done_calls:
            self._drop_open()
            self.ended = True
            self._buf = ""
            return
        self._done_calls.add((done.name, arguments))
        self._open = False
        self._events.extend(self._held)
        self._held = []

    def _drop_open(self) -> None:
        """Forget the call being read: none of its events went out."""
        if self._open:
            self.calls.pop()
            self._open = False
            self._held = []

    def _take(self) -> list[ParseEvent]:
        events, self._events = self._events, []
        return events


def _canonical(arguments: str) -> str | None:
    try:
        return json.dumps(json.loads(arguments or "{}"), sort_keys=True)
    except ValueError:
        return None


def parse_tool_calls(text: str, fmt: str, tool_names: Collection[str] = ()
                     ) -> tuple[str | None, list[ToolCall]]:
    """A whole output: (content outside the calls, or None when empty or
    only whitespace around calls; the calls)."""
    parser = ToolCallParser(fmt, tool_names)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    if parser.calls and not content.strip():
        return None, parser.calls
    return content, parser.calls
