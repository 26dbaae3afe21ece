"""Model names as Ollama clients send them: an LMX id as is, or Ollama's
`name:tag` form. `name:latest` is `name`; `name:tag` is the one known id
that starts with `name` and contains `tag` (case-insensitive), if exactly
one does. Anything else stays as sent, and fails as an unknown model."""

from __future__ import annotations

from collections.abc import Collection

LATEST = "latest"


def resolve_name(name: str, known: Collection[str]) -> str:
    if name in known:
        return name
    base, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        return name
    if tag == LATEST and base in known:
        return base
    if tag == LATEST:
        tag = ""
    matches = [k for k in known if k.lower().startswith(base.lower())
               and tag.lower() in k.lower()[len(base):]]
    if len(matches) == 1:
        return matches[0]
    exact = [k for k in known if k == base]
    return exact[0] if exact and not tag else name


def listed_name(model_id: str) -> str:
    """How /api/tags and /api/ps name a model: its LMX id (clients send it
    back as is; `:latest` appended by a client also resolves)."""
    return model_id
