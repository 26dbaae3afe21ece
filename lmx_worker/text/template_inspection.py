"""What a chat template says about tools, read off its source without
rendering it: whether it takes a `tools` variable and how its model writes
calls (`ToolSupport`). Pure Python (jinja2 only, no engine, no llguidance),
so the supervisor can answer a model probe with it before any worker runs.

The environment matches the one `ChatTemplate` renders in (HF's
`{% generation %}` tag, loop controls): a template that parses there must
parse here, or the probe would report no tool support for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmx_protocol.tool_formats import (
    HERMES_OPEN,
    MISTRAL_ARGS,
    MISTRAL_MARKER,
    PYTHON_TAG,
    ToolFormat,
    argument_key,
)


class GenerationTag(jinja2.ext.Extension):
    """Accepts HF's `{% generation %}…{% endgeneration %}` markers (used for
    training masks) and renders their body unchanged."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it an instance attribute)

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def template_environment() -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[GenerationTag, jinja2.ext.loopcontrols])


@dataclass(frozen=True)
class ToolSupport:
    """What a chat template does with tools."""

    format: ToolFormat
    takes_tools: bool  # renders a `tools` variable itself
    mistral_args: bool = False  # `[TOOL_CALLS]name[ARGS]{...}` rather than a JSON list

    @property
    def argument_key(self) -> str:
        return argument_key(self.format)


def inspect_template(source: str, env: jinja2.Environment | None = None) -> ToolSupport:
    """Detect the tool-call format from the template's own markers. `env`:
    the environment the template renders in (its extensions parse tags a
    bare environment would reject)."""
    try:
        parsed = (env or jinja2.Environment()).parse(source)
        names = jinja2.meta.find_undeclared_variables(parsed)
    except jinja2.TemplateSyntaxError:
        names = set()
    takes_tools = "tools" in names
    if MISTRAL_MARKER in source:
        return ToolSupport(ToolFormat.MISTRAL, takes_tools, MISTRAL_ARGS in source)
    if HERMES_OPEN in source:
        return ToolSupport(ToolFormat.HERMES, takes_tools)
    if takes_tools and (PYTHON_TAG in source or '"parameters"' in source):
        return ToolSupport(ToolFormat.LLAMA3_JSON, takes_tools)
    if takes_tools:
        return ToolSupport(ToolFormat.JSON, takes_tools)
    return ToolSupport(ToolFormat.HERMES, False)
