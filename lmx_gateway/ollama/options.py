"""Ollama's `options`, `format` and `keep_alive` in LMX's terms.

Sampling options map onto the OpenAI fields the chat path reads. Options
about how a runtime is run (GPU layers, threads, mmap...) are LMX's config,
so they are accepted and change nothing. Options that would change the
answer in a way LMX cannot reproduce (mirostat, typical_p, tfs_z...) are
refused by name unless they hold their neutral value. Options left out
take LMX's defaults (those of /v1), not Ollama's built-in ones.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from lmx_supervisor.errors import BadRequest

UNSUPPORTED = "unsupported_parameter"


class SamplingOptions(msgspec.Struct, kw_only=True):
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    seed: int | None = None
    stop: Annotated[list[str], Meta(max_length=16)] | str | None = None
    num_predict: int | None = None
    num_ctx: Annotated[int, Meta(ge=1)] | None = None
    repeat_penalty: Annotated[float, Meta(gt=0)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None


_SAMPLING = set(SamplingOptions.__struct_fields__)
# How the runtime runs, decided by LMX's config: accepted, no effect.
_RUNTIME = {"num_gpu", "main_gpu", "num_thread", "num_batch", "use_mmap", "use_mlock", "numa",
            "low_vram", "vocab_only", "f16_kv", "num_keep"}
# LMX's own, for what Ollama's API has no field for: `tool_choice` ("auto",
# "required", "none" or a tool's name) on /api/chat, as OpenAI's.
EXTENSIONS = {"tool_choice"}
# Accepted only at the value that means "off" (what LMX does anyway).
_NEUTRAL: dict[str, object] = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0,
                               "repeat_last_n": 64}


def sampling_options(options: dict[str, Any] | None) -> SamplingOptions:
    options = options or {}
    for key, value in options.items():
        if key in _SAMPLING or key in _RUNTIME or key in EXTENSIONS:
            continue
        if key in _NEUTRAL and value == _NEUTRAL[key]:
            continue
        why = (f"options.{key} is only accepted at {_NEUTRAL[key]!r} (LMX does not implement "
               "it)" if key in _NEUTRAL else f"options.{key} is not supported")
        raise BadRequest(why, param=f"options.{key}", code=UNSUPPORTED)
    sampling = {k: v for k, v in options.items() if k in _SAMPLING}
    try:
        return msgspec.convert(sampling, SamplingOptions)
    except msgspec.ValidationError as exc:
        where = re.search(r"\$\.(\w+)", str(exc))
        raise BadRequest(f"options: {exc}",
                         param=f"options.{where.group(1)}" if where else "options") from None


def sampling_fields(opts: SamplingOptions, context_length: int) -> dict[str, Any]:
    """The chat request's fields for these options. num_ctx cannot resize a
    loaded model's window: up to the window it is honoured as is (the model
    has that much room), beyond it the request is refused."""
    if opts.num_ctx is not None and opts.num_ctx > context_length:
        raise BadRequest(f"options.num_ctx {opts.num_ctx} exceeds the model's loaded context "
                         f"of {context_length} tokens (set models.context_length)",
                         param="options.num_ctx", code=UNSUPPORTED)
    # num_predict -1 (no limit) and -2 (fill the context) both mean: the room left.
    max_tokens = opts.num_predict if opts.num_predict is not None and opts.num_predict > 0 \
        else None
    if opts.num_predict == 0:
        raise BadRequest("options.num_predict must not be 0", param="options.num_predict")
    return {"temperature": opts.temperature, "top_p": opts.top_p, "top_k": opts.top_k,
            "min_p": opts.min_p, "seed": opts.seed, "stop": opts.stop,
            "max_tokens": max_tokens, "repetition_penalty": opts.repeat_penalty,
            "presence_penalty": opts.presence_penalty,
            "frequency_penalty": opts.frequency_penalty}


def tool_choice(options: dict[str, Any] | None, has_tools: bool) -> Any:
    """`options.tool_choice` in OpenAI's spelling (None: the model decides)."""
    choice = (options or {}).get("tool_choice")
    if choice is None:
        return None
    if not has_tools:
        raise BadRequest("options.tool_choice needs tools", param="options.tool_choice")
    if not isinstance(choice, str) or not choice:
        raise BadRequest("options.tool_choice must be auto, required, none or a tool name",
                         param="options.tool_choice")
    if choice in ("auto", "required", "none"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def response_format(fmt: Any) -> dict[str, Any] | None:
    """`format: "json"` or a JSON schema, as OpenAI's response_format (both
    enforced by constrained decoding)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt}}
    raise BadRequest('format must be "json" or a JSON schema object', param="format")


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?"
                       r"(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$")


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's keep_alive: a number of seconds or a Go duration ("5m",
    "1h30m", "0"); negative means forever (returned as -1). None: not given."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("keep_alive must be a duration", param="keep_alive")
    if isinstance(value, int | float):
        return -1.0 if value < 0 else float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            return -1.0
        try:
            return float(text)
        except ValueError:
            pass
        match = _DURATION.match(text)
        if match and text:
            h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
            return h * 3600 + m * 60 + s + ms / 1000
    raise BadRequest(f"keep_alive {value!r} is not a duration (e.g. 300, \"5m\", \"1h\", "
                     "\"-1\")", param="keep_alive")
