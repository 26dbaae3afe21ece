"""Presets: named request templates in `~/.opta-lmx/presets/*.yaml`.

A preset names a model (or a routing alias) and carries sampling defaults and
a system prompt. `"model": "preset:NAME"` routes to the preset's model; the
preset's values fill only the fields the request left out, and its system
prompt is prepended only when the conversation has none of its own.

Example file `code-assistant.yaml`:

    model: SmolLM2-135M-Instruct.Q4_1   # a model id or a routing alias
    description: terse coding helper
    system_prompt: You are a concise senior engineer.
    temperature: 0.2
    max_tokens: 512
    stop: ["</code>"]

A bad file never stops the server: it is skipped and reported (by name, with
the key at fault) in the reload answer and the log.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import yaml
from msgspec import Meta

from lmx_gateway.openai.schemas import (
    ChatCompletionRequest,
    ChatMessageIn,
    ModelName,
    SamplingDefaults,
    SamplingFields,
)
from lmx_supervisor.models.bundled_model import lmx_home

log = logging.getLogger("lmx.presets")

PRESET_PREFIX = "preset:"
PresetName = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[^\s:/]+$")]

# The request fields a preset may give defaults for (declared once, with the
# request's own limits, in openai/schemas.py).
SAMPLING_KEYS = SamplingDefaults.__struct_fields__


class PresetFile(SamplingDefaults, forbid_unknown_fields=True, kw_only=True):
    model: ModelName
    name: PresetName | None = None
    description: str | None = None
    system_prompt: str | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    file: str
    description: str | None
    system_prompt: str | None
    sampling: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "file": self.file,
                "description": self.description, "system_prompt": self.system_prompt,
                "defaults": dict(self.sampling)}


@dataclass
class PresetSet:
    """Every preset that loaded, and why the others did not."""

    directory: Path | None = None
    presets: dict[str, Preset] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)

    def get(self, name: str) -> Preset | None:
        return self.presets.get(name)

    def same_presets(self, other: PresetSet) -> bool:
        return self.presets == other.presets


def presets_dir() -> Path:
    return lmx_home() / "presets"


_AT_PATH = re.compile(r" - at `\$\.?(.*)`$")


def _explain(exc: msgspec.ValidationError) -> str:
    """'Expected `float` <= 2.0 - at `$.temperature`' -> 'temperature: expected ...'."""
    text = str(exc)
    match = _AT_PATH.search(text)
    where = match.group(1) if match else ""
    what = text[: match.start()] if match else text
    unknown = re.match(r"Object contains unknown field `(.+)`", what)
    if unknown:
        return f"{unknown.group(1)}: unknown key"
    return f"{where or 'preset'}: {what[0].lower()}{what[1:]}"


def _read_preset(path: Path) -> Preset:
    """One file; raises ValueError with the operator's one-line reason."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ValueError("not valid YAML: " + " ".join(str(exc).split())) from exc
    if not isinstance(data, dict):
        raise ValueError("top level must be a mapping (model, system_prompt, temperature, ...)")
    try:
        spec = msgspec.convert(data, PresetFile)
    except msgspec.ValidationError as exc:
        raise ValueError(_explain(exc)) from exc
    sampling = {key: getattr(spec, key) for key in SAMPLING_KEYS
                if getattr(spec, key) is not None}
    return Preset(name=spec.name or path.stem, model=spec.model, file=path.name,
                  description=spec.description, system_prompt=spec.system_prompt,
                  sampling=sampling)


def load_presets(directory: Path | None = None) -> PresetSet:
    """Read every `*.yaml`/`*.yml` in the presets directory (a missing
    directory is simply no presets). Blocking file I/O: call it off the loop."""
    directory = presets_dir() if directory is None else directory
    result = PresetSet(directory=directory)
    if not directory.is_dir():
        return result
    files = sorted(p for p in directory.iterdir()
                   if p.suffix in (".yaml", ".yml") and p.is_file())
    for path in files:
        try:
            preset = _read_preset(path)
        except ValueError as exc:
            result.errors.append({"file": path.name, "error": str(exc)})
            log.warning("preset %s skipped: %s", path.name, exc)
            continue
        if not re.fullmatch(r"[^\s:/]+", preset.name):
            result.errors.append({"file": path.name,
                                  "error": f"name: {preset.name!r} must not contain "
                                           "spaces, ':' or '/'"})
            continue
        if preset.name in result.presets:
            first = result.presets[preset.name].file
            result.errors.append({"file": path.name,
                                  "error": f"name: '{preset.name}' already defined in {first}"})
            log.warning("preset %s skipped: name '%s' already defined in %s",
                        path.name, preset.name, first)
            continue
        result.presets[preset.name] = preset
    return result


R = TypeVar("R", bound=SamplingFields)


def apply_preset(req: R, preset: Preset | None) -> R:
    """The request with the preset's defaults under its explicit fields."""
    if preset is None:
        return req
    updates: dict[str, Any] = {key: value for key, value in preset.sampling.items()
                               if getattr(req, key) is None}
    if isinstance(req, ChatCompletionRequest):
        if req.max_completion_tokens is not None:
            updates.pop("max_tokens", None)  # the newer spelling was given explicitly
        has_system = any(m.role in ("system", "developer") for m in req.messages)
        if preset.system_prompt and not has_system:
            updates["messages"] = [ChatMessageIn(role="system", content=preset.system_prompt),
                                   *req.messages]
    return msgspec.structs.replace(req, **updates) if updates else req
