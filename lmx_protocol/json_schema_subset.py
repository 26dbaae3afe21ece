"""The JSON Schema subset LMX can enforce by constrained decoding, checked
without the grammar engine.

The gateway refuses a `response_format` or tool `parameters` schema outside
this subset with a 400 before any worker sees it; the worker compiles the
grammar with llguidance, which stays the final word (and reports its own
refusals the same way). The keyword and format lists are llguidance's: a
keyword it does not implement must be refused, never silently ignored.
Depth and size are bounded so a hostile schema cannot exhaust the grammar
compiler (or Python's recursion limit).
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 64
MAX_NODES = 10_000

# Keywords llguidance does not implement (it would refuse the grammar).
UNIMPLEMENTED = frozenset({
    "uniqueItems", "contains", "minContains", "maxContains", "unevaluatedItems",
    "unevaluatedProperties", "propertyNames", "dependentRequired", "dependentSchemas",
    "dependencies", "not", "if", "then", "else", "$dynamicRef", "$dynamicAnchor",
    "$recursiveRef", "$recursiveAnchor",
})
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4",
                     "ipv6", "uuid", "uri"})
TYPES = frozenset({"null", "boolean", "object", "array", "number", "integer", "string"})

# Where subschemas sit: a schema, a list of schemas, or a map of schemas.
_ONE = ("additionalProperties", "items", "additionalItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions")


class SchemaError(ValueError):
    """The schema is invalid or outside the enforceable subset; the message
    names the keyword (and where it is)."""


def check_schema(schema: object) -> None:
    """Raise SchemaError unless `schema` is a JSON schema (object or
    boolean) within the subset, MAX_DEPTH deep and MAX_NODES nodes at most."""
    if not isinstance(schema, dict | bool):
        raise SchemaError("must be a JSON schema object")
    budget = [MAX_NODES]
    _check(schema, "#", 0, budget)


def _check(schema: Any, where: str, depth: int, budget: list[int]) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise SchemaError(f"{where}: a schema must be an object or a boolean")
    if depth > MAX_DEPTH:
        raise SchemaError(f"nested deeper than {MAX_DEPTH} levels (at {where})")
    budget[0] -= 1
    if budget[0] < 0:
        raise SchemaError(f"has more than {MAX_NODES} subschemas")
    for key in schema:
        if key in UNIMPLEMENTED:
            raise SchemaError(f"{where}: the keyword '{key}' cannot be enforced "
                              "(unimplemented by the grammar engine)")
    _check_type(schema.get("type"), where)
    fmt = schema.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise SchemaError(f"{where}: format '{fmt}' cannot be enforced (known formats: "
                          f"{', '.join(sorted(FORMATS))})")
    ref = schema.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise SchemaError(f"{where}: only local $ref ('#/...') is supported, got {ref!r}")
    for key in _ONE:
        if isinstance(schema.get(key), dict | bool):
            _check(schema[key], f"{where}/{key}", depth + 1, budget)
    for key in _LIST:
        value = schema.get(key)
        if isinstance(value, list):
            for i, sub in enumerate(value):
                _check(sub, f"{where}/{key}/{i}", depth + 1, budget)
        elif key != "items" and value is not None:
            raise SchemaError(f"{where}/{key}: must be a list of schemas")
    for key in _MAP:
        value = schema.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                _check(sub, f"{where}/{key}/{name}", depth + 1, budget)
        elif value is not None:
            raise SchemaError(f"{where}/{key}: must be an object of schemas")


def _check_type(value: object, where: str) -> None:
    if value is None:
        return
    names = value if isinstance(value, list) else [value]
    for name in names:
        if name not in TYPES:
            raise SchemaError(f"{where}: invalid type {name!r} (types: "
                              f"{', '.join(sorted(TYPES))})")
