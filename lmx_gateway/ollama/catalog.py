"""Ollama's model routes: GET /api/tags (on disk and loaded), POST
/api/show, GET /api/ps (loaded), GET /api/version, POST /api/pull (the hub
download, with Ollama-style progress lines) and DELETE /api/delete.

`digest` identifies a model file's version (sha256 of its path, size and
modification time), not its content: hashing gigabytes on every listing
would cost more than clients use it for (telling versions apart)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway import __version__
from lmx_gateway.admin.model_files import model_files
from lmx_gateway.http.body import read_json
from lmx_gateway.http.sse import EventStreamResponse
from lmx_gateway.ollama.chat import NDJSON, line, now_iso
from lmx_gateway.ollama.names import listed_name, resolve_name
from lmx_gateway.ollama.schemas import ModelRef
from lmx_gateway.ollama.serving import not_found
from lmx_gateway.state import GatewayState, gateway_state
from lmx_supervisor.errors import BadRequest
from lmx_supervisor.lifecycle.managed_model import ManagedModel
from lmx_supervisor.lifecycle.states import ModelState
from lmx_supervisor.memory.memory_guard import idle_ttl
from lmx_supervisor.models.downloads import DownloadJob, DownloadStatus
from lmx_supervisor.models.gguf_header import read_gguf_metadata
from lmx_supervisor.models.model_files import split_repo_ref

# The Ollama API version this translation follows (clients gate features on it).
OLLAMA_API_VERSION = "0.12.0"
PULL_POLL_SEC = 0.25
_NEVER = "9999-12-31T23:59:59Z"  # expires_at of a model no TTL unloads
_QUANT = re.compile(r"(?i)(IQ\d_[A-Z]+|Q\d_K(?:_[SML])?|Q\d_\d|Q\d|BF16|F16|F32)")
# LMX capabilities in Ollama's words.
_CAPABILITIES = {"chat": "completion", "tools": "tools", "fill_in_middle": "insert",
                 "embeddings": "embedding"}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _digest(path: Path, size: int) -> str:
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return hashlib.sha256(f"{path}:{size}:{mtime}".encode()).hexdigest()


def _weights(path: Path) -> Path | None:
    if path.is_file():
        return path
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return ggufs[0] if ggufs else None


def _describe(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(details, model_info) of a model file or directory, read from its
    GGUF header or config.json; what cannot be read stays empty."""
    info: dict[str, Any] = {}
    weights = _weights(path)
    fmt, family, size_label, quant = "", "", "", ""
    if weights is not None and weights.suffix == ".gguf":
        fmt = "gguf"
        try:
            meta = read_gguf_metadata(weights)
        except (OSError, ValueError):
            meta = {}
        family = str(meta.get("general.architecture") or "")
        size_label = str(meta.get("general.size_label") or "")
        info = {k: v for k, v in meta.items()
                if isinstance(v, str | int | float) and not k.startswith("tokenizer.")}
        found = _QUANT.search(weights.name)
        quant = found.group(1).upper() if found else ""
    elif (path / "config.json").is_file():
        fmt = "safetensors"
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        family = str(config.get("model_type") or "")
        bits = (config.get("quantization") or {}).get("bits")
        quant = f"Q{bits}" if bits else str(config.get("torch_dtype") or "").upper()
        if family:
            info["general.architecture"] = family
            if "max_position_embeddings" in config:
                info[f"{family}.context_length"] = config["max_position_embeddings"]
    details = {"parent_model": "", "format": fmt, "family": family,
               "families": [family] if family else [], "parameter_size": size_label,
               "quantization_level": quant}
    return details, info


def _entry(name: str, path: Path, size: int) -> dict[str, Any]:
    details, _ = _describe(path)
    try:
        modified = _iso(path.stat().st_mtime)
    except OSError:
        modified = now_iso()
    return {"name": listed_name(name), "model": listed_name(name), "modified_at": modified,
            "size": size, "digest": _digest(path, size), "details": details}


def _loaded_size(model: ManagedModel) -> int:
    if model.memory_sample is not None:
        return int(model.memory_sample.rss)
    return model.memory_estimate.total_bytes if model.memory_estimate else 0


async def tags(request: Request) -> Response:
    state = gateway_state(request)
    rows = await model_files(state).available(state.config.models_dir)
    entries = []
    listed = set()
    for row in rows:
        if row["complete"]:
            listed.add(row["repo_id"])
            entries.append(await asyncio.to_thread(
                _entry, row["repo_id"], Path(row["local_path"]), int(row["size_bytes"])))
    for model in state.supervisor.models():  # loaded under a name of their own
        if model.model_id not in listed:
            entries.append(await asyncio.to_thread(
                _entry, model.model_id, Path(model.path), _loaded_size(model)))
    return JSONResponse({"models": entries})


async def _find(state: GatewayState, name: str) -> tuple[str, Path, ManagedModel | None]:
    """A model by name: loaded first, then on disk."""
    loaded = {m.model_id: m for m in state.supervisor.models()}
    resolved = resolve_name(name, loaded)
    if resolved in loaded:
        return resolved, Path(loaded[resolved].path), loaded[resolved]
    rows = {str(r["repo_id"]): r for r in await model_files(state).available(
        state.config.models_dir)}
    resolved = resolve_name(name, rows)
    if resolved not in rows:
        raise not_found(name)
    return resolved, Path(rows[resolved]["local_path"]), None


async def show(request: Request) -> Response:
    state = gateway_state(request)
    ref = (await read_json(request, ModelRef, state.config.server.max_request_body_bytes,
                          untyped_ok_without_origin=True)).ref
    if not ref:
        raise BadRequest("model is required", param="model")
    name, path, model = await _find(state, ref)
    details, info = await asyncio.to_thread(_describe, path)
    template = str(info.pop("tokenizer.chat_template", "") or "")
    ready = model.ready if model is not None else None
    if ready is not None:
        capabilities = sorted({_CAPABILITIES[c] for c in ready.capabilities
                               if c in _CAPABILITIES})
        if details["family"]:
            info[f"{details['family']}.context_length"] = ready.context_length
    else:  # not loaded: what its files say it is
        capabilities = ["completion"]
    weights = _weights(path)
    if weights is not None and not template:
        meta = await asyncio.to_thread(read_gguf_metadata, weights)
        template = str(meta.get("tokenizer.chat_template") or "")
    try:
        modified = _iso(path.stat().st_mtime)
    except OSError:
        modified = now_iso()
    return JSONResponse({"modelfile": "", "parameters": "", "template": template,
                         "license": "", "details": details, "model_info": info,
                         "capabilities": capabilities, "modified_at": modified,
                         "model": name})


def _expires_at(state: GatewayState, model: ManagedModel) -> str:
    ttl = idle_ttl(model, state.config.memory)
    if ttl is None:
        return _NEVER
    return _iso(time.time() + max(0.0, model.last_used + ttl - time.monotonic()))


async def ps(request: Request) -> Response:
    state = gateway_state(request)
    models = []
    for model in state.supervisor.models():
        if model.state is not ModelState.READY:
            continue
        size = _loaded_size(model)
        details, _ = await asyncio.to_thread(_describe, Path(model.path))
        models.append({
            "name": listed_name(model.model_id), "model": listed_name(model.model_id),
            "size": size, "digest": _digest(Path(model.path), size), "details": details,
            "expires_at": _expires_at(state, model), "size_vram": 0,
            "context_length": model.ready.context_length if model.ready else 0})
    return JSONResponse({"models": models})


async def version(_request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_API_VERSION, "lmx_version": __version__})


def _pull_target(ref: str) -> tuple[str, list[str] | None]:
    """`org/name`, `org/name/file.gguf`, and Ollama's `hf.co/org/name:QUANT`
    (the GGUF files of that quantisation) as a repo and file patterns."""
    ref = re.sub(r"^(https?://)?(hf\.co|huggingface\.co)/", "", ref)
    repo, _, tag = ref.partition(":")
    target = split_repo_ref(repo)
    if target is None:
        raise BadRequest(f"'{ref}' is not a hub repo id ('org/name', optionally "
                         "':QUANT')", param="model")
    repo_id, patterns = target
    if tag and tag != "latest":
        patterns = [f"*{tag}*.gguf", f"*{tag.lower()}*.gguf", f"*{tag.upper()}*.gguf"]
    return repo_id, patterns


def _progress(job: DownloadJob) -> dict[str, Any]:
    snap = job.snapshot()
    return {"status": f"pulling {job.repo_id}", "digest": f"sha256:{snap['commit'] or ''}",
            "total": snap["bytes_total"], "completed": snap["bytes_downloaded"]}


async def _pull_lines(job: DownloadJob) -> AsyncGenerator[bytes, None]:
    yield line({"status": "pulling manifest"})
    last: dict[str, Any] = {}
    while job.active:
        progress = _progress(job)
        if progress != last and progress["total"]:
            yield line(progress)
            last = progress
        await asyncio.sleep(PULL_POLL_SEC)
    if job.status is not DownloadStatus.COMPLETED:
        yield line({"error": job.error or f"download {job.status}"})
        return
    yield line(_progress(job))
    yield line({"status": "verifying sha256 digest"})
    yield line({"status": "writing manifest"})
    yield line({"status": "success"})


async def pull(request: Request) -> Response:
    state = gateway_state(request)
    body = await read_json(request, ModelRef, state.config.server.max_request_body_bytes,
                          untyped_ok_without_origin=True)
    repo_id, patterns = _pull_target(body.ref)
    files = model_files(state)
    job = await files.downloads.start(repo_id, None, patterns)
    if body.stream:
        async def cancel_if_left() -> None:
            if job.active:  # the client went away: as Ollama, stop the pull
                files.downloads.cancel(job.id)
        return EventStreamResponse(_pull_lines(job), headers={"content-type": NDJSON},
                                   on_close=cancel_if_left)
    while job.active:
        await asyncio.sleep(PULL_POLL_SEC)
    if job.status is not DownloadStatus.COMPLETED:
        return JSONResponse({"error": job.error or f"download {job.status}"}, status_code=500)
    return JSONResponse({"status": "success"})


async def delete(request: Request) -> Response:
    state = gateway_state(request)
    ref = (await read_json(request, ModelRef, state.config.server.max_request_body_bytes,
                          untyped_ok_without_origin=True)).ref
    if not ref:
        raise BadRequest("model is required", param="model")
    on_disk = {str(r["repo_id"]) for r in await model_files(state).available(
        state.config.models_dir)}
    name = resolve_name(ref, on_disk)
    if name not in on_disk:
        raise not_found(ref)
    # Loaded: 409 (unload it first); outside the models directory/cache: 400.
    await model_files(state).delete(name, state.config.models_dir)
    return Response(status_code=200)
