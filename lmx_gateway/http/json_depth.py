"""Bounding how deeply a request body nests, and naming where it goes too deep.

msgspec decodes recursively and gives up with a RecursionError near
Python's recursion limit (about 1,000 levels, fewer the deeper the caller's
own stack). Anything shallower decodes, but later steps recurse too
(`json.dumps` of a tool's parameters, of a tool_use block's input...), so
a 900-deep value would still end in a 500 there. Bodies are therefore held to
MAX_JSON_DEPTH levels, far below any recursion limit and far above any real
request (a JSON schema at json_schema_subset.MAX_DEPTH subschemas is about
twice that many JSON levels, which still fits).

Both checks are iterative: no recursion however deep the input.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

MAX_JSON_DEPTH = 256
# Where a path stops: a schema counts as one field (its inside is reported by
# the schema check), and a path is at most this many parts long.
_SCHEMA_KEYS = frozenset({"parameters", "schema", "input_schema"})
_MAX_PARTS = 6


def _join(parts: list[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _short(parts: list[str | int]) -> str | None:
    """The param a path names: cut after a schema key or _MAX_PARTS parts."""
    kept: list[str | int] = []
    for part in parts:
        kept.append(part)
        if part in _SCHEMA_KEYS or len(kept) >= _MAX_PARTS:
            break
    return _join(kept) or None


def too_deep_value(value: Any) -> str | None:
    """The param under which `value` (decoded structs, lists, dicts) nests
    deeper than MAX_JSON_DEPTH, or None when it does not."""
    stack: list[tuple[Any, int, list[str | int]]] = [(value, 0, [])]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict):
            children: Any = node.items()
        elif isinstance(node, list | tuple):
            children = enumerate(node)
        elif isinstance(node, msgspec.Struct):
            children = ((f, getattr(node, f)) for f in node.__struct_fields__)
        else:
            continue
        if depth >= MAX_JSON_DEPTH:
            return _short(path) or "body"
        for key, child in children:
            if isinstance(child, dict | list | tuple | msgspec.Struct):
                # Only the first few parts of a path are ever reported.
                stack.append((child, depth + 1,
                              [*path, key] if len(path) < _MAX_PARTS else path))
    return None


_STRUCTURE = re.compile(rb'["{}\[\],:]')
_BACKSLASH = 0x5C
_MAX_KEY = 256


def _string_end(raw: bytes, start: int) -> int:
    """Index just past the string whose first character is at `start`."""
    at = start
    while True:
        quote = raw.index(b'"', at)
        escapes = 0
        while quote - escapes - 1 >= start and raw[quote - escapes - 1] == _BACKSLASH:
            escapes += 1
        if escapes % 2 == 0:
            return quote + 1
        at = quote + 1


def too_deep_raw(raw: bytes) -> str | None:
    """For a body msgspec could not decode for depth: the param under which
    it nests deeper than MAX_JSON_DEPTH. A scan of its structure that jumps
    from one structural character to the next (strings are skipped whole),
    keeping the key or index of every open container."""
    keys: list[str | int] = []  # per open container: the key of its current child
    last_string = ""
    pos = 0
    try:
        while (found := _STRUCTURE.search(raw, pos)) is not None:
            ch, pos = raw[found.start()], found.end()
            if ch == 0x22:  # '"'
                end = _string_end(raw, pos)
                last_string = raw[pos:min(end - 1, pos + _MAX_KEY)].decode("utf-8", "replace")
                pos = end
            elif ch in b"{[":
                if len(keys) >= MAX_JSON_DEPTH:
                    return _short(keys)
                keys.append(0 if ch == 0x5B else "")
            elif ch in b"}]":
                keys.pop()
            elif ch == 0x3A:  # ':' follows an object's key
                keys[-1] = last_string
            elif isinstance(keys[-1], int):  # ',' in an array
                keys[-1] += 1
    except (ValueError, IndexError):
        pass  # not JSON after all: nothing to name
    return None
