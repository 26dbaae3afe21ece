"""Rendering chat messages with the model's own Jinja chat template, the way
Hugging Face transformers does (sandboxed, trim/lstrip blocks, loop
controls, `raise_exception`, a `tojson` that keeps non-ASCII), so a prompt
is byte-identical to what the model was trained on."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2

from lmx_worker.engines.engine import RequestError
from lmx_worker.text.template_inspection import ToolSupport, inspect_template, template_environment


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise RequestError("invalid_request", f"chat template refused the messages: {message}")


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        env = template_environment()
        env.filters["tojson"] = _tojson
        self._template = env.from_string(source)
        self.source = source
        # How this template takes tools and how its model writes calls.
        self.tool_support: ToolSupport = inspect_template(source, env)
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        try:
            return self._template.render(
                messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt, raise_exception=_raise,
                strftime_now=lambda fmt: datetime.now().strftime(fmt), **extra)
        except RequestError:
            raise
        except jinja2.TemplateError as exc:
            raise RequestError("invalid_request", f"chat template failed: {exc}") from exc
