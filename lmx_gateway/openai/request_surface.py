"""The OpenAI request fields LMX decides about beyond sampling: accepted
as OpenAI-compatible no-ops, carried to the logs, or refused with a 400
naming the field. README.md's "OpenAI request fields" table is the
user-facing version of these decisions (tests/test_openai_surface.py checks
it covers every field of the SDK's request types)."""

from __future__ import annotations

from typing import Any

from lmx_gateway.openai.schemas import ChatCompletionRequest, SamplingFields
from lmx_supervisor.errors import BadRequest

UNSUPPORTED = "unsupported_parameter"
LOGIT_BIAS_LIMIT = 100.0
MAX_LOGIT_BIAS_ENTRIES = 1024
METADATA_PAIRS = 16  # OpenAI's own limits on metadata
METADATA_KEY_CHARS = 64
METADATA_VALUE_CHARS = 512

# Fields whose only honest answer here is a refusal: they ask for output
# (audio, web results, moderation scores) or model behaviour (reasoning
# effort, verbosity) that no local model of LMX provides.
_REFUSED_WHEN_SET = {
    "audio": "audio output is not supported (text models only)",
    "functions": "the deprecated functions/function_call API is not supported; use tools",
    "function_call": "the deprecated functions/function_call API is not supported; "
                     "use tool_choice",
    "moderation": "moderation is not available on this server",
    "reasoning_effort": "reasoning_effort is not supported by the models this server runs",
    "verbosity": "verbosity is not supported by the models this server runs",
    "web_search_options": "web search is not available on this server",
}
_SERVICE_TIERS_ACCEPTED = ("auto", "default")


def logit_bias(value: object) -> dict[int, float]:
    """OpenAI's `{"token id": bias}` with biases in -100..100 (the ids are
    checked against the vocabulary by the worker)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("logit_bias must be an object mapping token ids to numbers",
                         param="logit_bias", code="invalid_type")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise BadRequest(f"logit_bias may name at most {MAX_LOGIT_BIAS_ENTRIES} tokens",
                         param="logit_bias")
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise BadRequest(f"logit_bias key {key!r} is not a token id (a non-negative "
                             "integer)", param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or \
                not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
            raise BadRequest(f"logit_bias value for token {key} must be a number in "
                             "-100..100", param="logit_bias")
        out[int(key)] = float(bias)
    return out


def check_n(n: int, max_n: int) -> None:
    if n > max_n:
        raise BadRequest(f"n must be at most {max_n} on this server (models.max_n)", param="n")


def _refuse(param: str, why: str) -> BadRequest:
    return BadRequest(why, param=param, code=UNSUPPORTED)


def _check_metadata(value: object) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or len(value) > METADATA_PAIRS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= METADATA_KEY_CHARS
            and len(v) <= METADATA_VALUE_CHARS for k, v in value.items()):
        raise BadRequest(f"metadata must be an object of at most {METADATA_PAIRS} string "
                         f"pairs (keys up to {METADATA_KEY_CHARS} characters, values up to "
                         f"{METADATA_VALUE_CHARS})", param="metadata")


def check_chat_surface(req: ChatCompletionRequest) -> None:
    """Refuse what cannot be honoured; the no-ops pass (see the README)."""
    for param, why in _REFUSED_WHEN_SET.items():
        if getattr(req, param) is not None:
            raise _refuse(param, why)
    modalities: Any = req.modalities
    if modalities is not None and (not isinstance(modalities, list)
                                   or any(m != "text" for m in modalities)):
        raise _refuse("modalities", "only the text modality is supported")
    if req.store:
        raise _refuse("store", "chat completions are not stored on this server (store: true)")
    if req.service_tier is not None and req.service_tier not in _SERVICE_TIERS_ACCEPTED:
        raise _refuse("service_tier", "service_tier must be auto or default (one tier here)")
    _check_metadata(req.metadata)


def log_tags(req: SamplingFields) -> dict[str, Any]:
    """What identifies the caller in the request log (user, safety_identifier,
    metadata), for the fields a client set."""
    tags: dict[str, Any] = {}
    if req.user:
        tags["user"] = req.user
    if isinstance(req, ChatCompletionRequest):
        if req.safety_identifier:
            tags["safety_identifier"] = req.safety_identifier
        if req.metadata:
            tags["metadata"] = req.metadata
    return tags
