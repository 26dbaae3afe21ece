"""A translated request is validated by the chat path under OpenAI's field
names; its errors must name the field the client actually sent
(`tools[0].function.parameters` is Anthropic's `tools[0].input_schema`)."""

from __future__ import annotations

import re

from lmx_supervisor.errors import BadRequest

Renames = tuple[tuple[str, str], ...]  # (regex on OpenAI's name, replacement)


def rename_params(exc: BadRequest, renames: Renames) -> BadRequest:
    message, param = exc.message, exc.param
    for pattern, replacement in renames:
        message = re.sub(pattern, replacement, message)
        if param is not None:
            param = re.sub(pattern, replacement, param)
    return BadRequest(message, param=param, code=exc.code,
                      retry_after_sec=exc.retry_after_sec)
