"""`POST /admin/models/probe`: what a model is and what loading it would
cost, answered from its files alone (no worker is started, no engine is
imported): backend, architecture, parameter count, quantization, size, the
model's own maximum context, the memory estimate at the context and slots a
load would use, the chat template and tool-call format, capabilities, and
whether it fits now (with what the memory guard would evict).

Files are untrusted: a GGUF header is parsed with bounds on every count and
length (gguf_header), and anything wrong with a file is an
InvalidModelFile (422) naming it.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmx_supervisor.config import Config
from lmx_supervisor.errors import Conflict, InvalidModelFile
from lmx_supervisor.memory.fit_plan import plan_fit
from lmx_supervisor.memory.memory_estimate import MemoryEstimate, estimate_model_memory
from lmx_supervisor.memory.mlx_memory import mlx_estimate
from lmx_supervisor.models.encoder_models import (
    CROSS_ENCODER,
    LLAMA_CPP_ENCODER,
    MLX_ENCODER,
    hf_encoder_kind,
)
from lmx_supervisor.models.gguf_header import GGML_TYPE_NAMES, GGUFError, read_gguf_header
from lmx_supervisor.models.model_layout import LLAMA_CPP, MLX, inspect_path
from lmx_supervisor.models.model_resolver import ResolvedModel, resolve_model
from lmx_supervisor.supervisor import Supervisor, settings_from
from lmx_supervisor.tuning.performance import (
    KV_BYTES_PER_VALUE,
    apply_performance,
    check_backend,
    effective_settings,
    parse_settings,
)
from lmx_worker.text.template_inspection import inspect_template, template_environment

# llama.cpp's LLAMA_FTYPE_* (general.file_type): the file's nominal type.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE",
}
_SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024
_TEXT_CAPABILITIES = ["chat", "completions", "structured_output"]


@dataclass(frozen=True)
class FileFacts:
    """What the model's files say about it."""

    architecture: str | None
    name: str | None
    parameter_count: int | None
    quantization: dict[str, Any]
    max_context: int | None
    chat_template: str | None


# --- GGUF ---------------------------------------------------------------------------


def gguf_facts(path: Path) -> FileFacts:
    try:
        header = read_gguf_header(path)
    except GGUFError as exc:
        raise InvalidModelFile(f"{path.name}: {exc}", param="model_id") from exc
    except OSError as exc:
        raise InvalidModelFile(f"{path.name}: cannot read ({exc.strerror or exc})",
                               param="model_id") from exc
    meta = header.metadata
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    types = Counter(GGML_TYPE_NAMES.get(t.ggml_type, f"type{t.ggml_type}")
                    for t in header.tensors)
    file_type = meta.get("general.file_type")
    context = meta.get(f"{arch}.context_length") if arch else None
    template = meta.get("tokenizer.chat_template")
    name = meta.get("general.name")
    return FileFacts(
        architecture=arch, name=name if isinstance(name, str) else None,
        parameter_count=sum(t.elements for t in header.tensors),
        quantization={
            "file_type": FILE_TYPES.get(file_type, f"type{file_type}")
            if isinstance(file_type, int) else None,
            "tensor_types": dict(types.most_common()),
        },
        max_context=context if isinstance(context, int) else None,
        chat_template=template if isinstance(template, str) and template else None)


# --- transformers-layout directories (MLX) ---------------------------------------------


def _json_file(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InvalidModelFile(f"{path.name} is unreadable ({exc})", param="model_id") from exc
    return data if isinstance(data, dict) else None


def _safetensors_tensors(directory: Path) -> dict[str, dict[str, Any]]:
    tensors: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with path.open("rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise ValueError("header is cut off (file truncated)")
                (length,) = struct.unpack("<Q", raw)
                if length > _SAFETENSORS_HEADER_LIMIT:
                    raise ValueError(f"header length {length} exceeds the limit (corrupt)")
                header = json.loads(f.read(length))
        except (OSError, ValueError) as exc:
            raise InvalidModelFile(f"{path.name}: unreadable safetensors ({exc})",
                                   param="model_id") from exc
        if isinstance(header, dict):
            tensors.update({k: v for k, v in header.items()
                            if k != "__metadata__" and isinstance(v, dict)})
    return tensors


def _count(shape: Any) -> int:
    count = 1
    for dim in shape if isinstance(shape, list) else []:
        count *= int(dim)
    return count


def _module_bits(quant: dict[str, Any], module: str) -> int | None:
    """mlx-lm's per-module overrides (e.g. 8-bit embeddings in a 4-bit model)."""
    own = quant.get(module)
    bits = own.get("bits") if isinstance(own, dict) else quant.get("bits")
    return bits if isinstance(bits, int) and bits > 0 else None


def _parameters(tensors: dict[str, dict[str, Any]], quant: dict[str, Any]) -> int:
    """Logical weights: an mlx-lm quantized layer stores `bits`-bit values
    packed into uint32 (32 / bits per element) plus scales and biases, which
    are not parameters of the model."""
    total = 0
    for name, info in tensors.items():
        module, _, param = name.rpartition(".")
        quantized = f"{module}.scales" in tensors
        if quantized and param in ("scales", "biases"):
            continue
        elements = _count(info.get("shape"))
        bits = _module_bits(quant, module) if quantized and param == "weight" else None
        total += elements * 32 // bits if bits else elements
    return total


def _directory_template(directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(errors="replace") or None
    for name in ("chat_template.json", "tokenizer_config.json"):
        data = _json_file(directory / name)
        source = data.get("chat_template") if data else None
        if isinstance(source, list):  # named templates: the default one
            named = {str(t.get("name")): t.get("template") for t in source
                     if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        if isinstance(source, str) and source:
            return source
    return None


def directory_facts(directory: Path) -> FileFacts:
    config = _json_file(directory / "config.json") or {}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    quant = config.get("quantization") or config.get("quantization_config")
    quant = quant if isinstance(quant, dict) else {}
    tensors = _safetensors_tensors(directory)
    dtypes = Counter(str(info.get("dtype")) for info in tensors.values())
    archs = config.get("architectures")
    context = text.get("max_position_embeddings") if isinstance(text, dict) else None
    return FileFacts(
        architecture=str(archs[0]) if isinstance(archs, list) and archs
        else config.get("model_type"),
        name=directory.name,
        parameter_count=_parameters(tensors, quant),
        quantization={
            "bits": quant.get("bits"),
            "group_size": quant.get("group_size"),
            "per_module": {k: v for k, v in quant.items() if isinstance(v, dict)},
            "torch_dtype": config.get("torch_dtype"),
            "tensor_dtypes": dict(dtypes.most_common()),
        },
        max_context=context if isinstance(context, int) else None,
        chat_template=_directory_template(directory))


# --- the probe ----------------------------------------------------------------------------


def resolve_for_probe(ref: str, models_dir: Path, backend: str | None) -> ResolvedModel:
    """The load path's resolution; an incomplete or corrupt file is a 422
    here (a load says 409 model_incomplete: there the file is fine to retry
    once re-downloaded, here the question is what is wrong with it)."""
    try:
        return resolve_model(ref, models_dir, backend)
    except Conflict as exc:
        if exc.code != "model_incomplete":
            raise
        layout = inspect_path(Path(ref).expanduser()) if Path(ref).expanduser().exists() \
            else None
        detail = "; ".join(layout.problems) if layout and layout.problems else exc.message
        raise InvalidModelFile(f"'{ref}' cannot be read as a model: {detail}",
                               param="model_id") from exc


def capabilities(backend: str, path: Path, has_template: bool) -> list[str]:
    """What a worker would report (the engines' own rules)."""
    if backend == LLAMA_CPP_ENCODER:
        return ["embeddings", "rerank"]
    if backend == MLX_ENCODER:
        kind = hf_encoder_kind(path)
        return ["rerank"] if kind and kind.role == CROSS_ENCODER else ["embeddings", "rerank"]
    return _TEXT_CAPABILITIES + (["tools"] if has_template else [])


def tool_calls(backend: str, template: str | None) -> dict[str, Any] | None:
    if template is None or backend not in (LLAMA_CPP, MLX):
        return None
    support = inspect_template(template, template_environment())
    return {"format": str(support.format), "template_takes_tools": support.takes_tools,
            # Templates without a `tools` variable get the tools (and the
            # Hermes format) described in a system prompt.
            "tools_via": "template" if support.takes_tools else "system_prompt"}


def estimate(resolved: ResolvedModel, context_tokens: int, mlx_dequantize: bool | str,
             kv_bytes_per_value: float) -> MemoryEstimate:
    """What Supervisor.load estimates for the same model and settings."""
    result = estimate_model_memory(resolved.path, context_tokens, kv_bytes_per_value)
    if resolved.backend == MLX:
        result = mlx_estimate(result, resolved.path, mlx_dequantize)
    return result


def describe_files(resolved: ResolvedModel) -> tuple[FileFacts, int, str]:
    """Facts, total size in bytes, and the on-disk format."""
    layout = inspect_path(resolved.path)
    if layout is None:
        raise InvalidModelFile(f"{resolved.path} holds no model", param="model_id")
    read = gguf_facts if resolved.path.is_file() else directory_facts
    facts = read(resolved.path)
    return facts, layout.size_bytes, layout.format


@dataclass(frozen=True)
class ProbeArgs:
    model_id: str
    backend: str | None = None
    context_length: int | None = None  # per slot; None: what a load would use
    parallel_slots: int | None = None
    kv_cache_type: str | None = None


def _inspect(args: ProbeArgs, config: Config) -> dict[str, Any]:
    """The file work (blocking: runs in a thread)."""
    resolved = resolve_for_probe(args.model_id, config.models_dir, args.backend)
    facts, size, fmt = describe_files(resolved)
    # What a load would use: config, the model's profile, then this request.
    asked = parse_settings({k: v for k, v in (
        ("context_length", args.context_length), ("parallel_slots", args.parallel_slots),
        ("kv_cache_type", args.kv_cache_type)) if v is not None}, "request")
    effective = effective_settings(resolved.model_id, asked)
    check_backend(effective, resolved.backend, overrides_param="")
    settings = apply_performance(settings_from(config, resolved.model_id), effective)
    context, slots = settings.context_length, max(1, settings.parallel_slots)
    if resolved.backend == MLX and facts.max_context:
        context = min(context, facts.max_context)  # the MLX worker caps it the same way
    memory = estimate(resolved, context * slots, settings.mlx_dequantize,
                      KV_BYTES_PER_VALUE[settings.kv_cache_type])
    return {
        "model_id": resolved.model_id,
        "path": str(resolved.path),
        "backend": resolved.backend,
        "format": fmt,
        "architecture": facts.architecture,
        "name": facts.name,
        "parameter_count": facts.parameter_count,
        "quantization": facts.quantization,
        "size_bytes": size,
        "max_context": facts.max_context,
        "context_length": context,
        "context_exceeds_model": bool(facts.max_context and context > facts.max_context),
        "parallel_slots": slots,
        "kv_cache_type": settings.kv_cache_type,
        "performance_sources": effective.sources,
        "memory_estimate": memory.as_dict(),
        "chat_template": facts.chat_template is not None,
        "tool_calls": tool_calls(resolved.backend, facts.chat_template),
        "capabilities": capabilities(resolved.backend, resolved.path,
                                     facts.chat_template is not None),
    }


async def probe_model(supervisor: Supervisor, args: ProbeArgs) -> dict[str, Any]:
    body = await asyncio.to_thread(_inspect, args, supervisor.config)
    model_id = body["model_id"]
    loaded = next((m for m in supervisor.models() if m.model_id == model_id), None)
    body["loaded"] = loaded is not None
    plan = plan_fit(supervisor.memory, supervisor.models(), model_id,
                    int(body["memory_estimate"]["total_bytes"]))
    body["fit"] = plan.as_dict()
    return body
