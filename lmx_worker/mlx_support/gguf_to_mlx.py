"""Convert a llama-family GGUF file into an MLX model directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json) that mlx-lm loads.

What has to be translated:
- Weights: `mx.load` reads Q4_0/Q4_1/Q8_0 tensors as MLX affine quantized
  groups (packed uint32 weight + per-group scales and biases, group size 32),
  which mlx-lm's QuantizedLinear/QuantizedEmbedding take as they are; other
  GGUF types arrive as float arrays and stay unquantized.
- Bits per module: a GGUF may mix types (SmolLM2's Q4_1 file keeps its token
  embedding at Q8_0), so config.json's `quantization` names every module
  whose bits differ from the most common choice (mlx-lm's per-layer form).
- Rotary layout: llama.cpp's converter permutes the rows of Q and K so that
  its interleaved ("traditional") rope applies; HF-layout llama (what mlx-lm's
  llama model expects, rope_traditional=False) rotates halves. The rows (and
  their scales and biases) are permuted back.
- Tied embeddings: no `output.weight` means lm_head reuses the embedding.
- Tokenizer and chat template: rebuilt from the GGUF metadata (gguf_tokenizer).
- Float dtype: scales, biases and float tensors are written as float32 by
  default (GGUF stores float16 scales, so this is lossless). On a CPU,
  float16 activations run MLX an order of magnitude slower; `dtype="float16"`
  writes a smaller copy for GPUs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, cast

import mlx.core as mx

from lmx_worker.mlx_support.gguf_tokenizer import GGUFTokenizer

GROUP_SIZE = 32  # every GGUF block type mx.load keeps quantized has 32 weights a block
SUPPORTED_ARCHITECTURES = ("llama",)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
              "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|scales|biases|bias)$")
_TOP = re.compile(r"^([a-z_]+)\.(weight|scales|biases|bias)$")


class ConversionError(ValueError):
    """The GGUF cannot be converted (unsupported architecture or content)."""


def _scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        return value.item()
    return value


def _mlx_name(gguf_name: str) -> tuple[str, str]:
    """(module path, parameter) in mlx-lm's llama naming."""
    block = _BLOCK.match(gguf_name)
    if block is not None:
        index, part, param = block.groups()
        if part not in _LAYER_NAMES:
            raise ConversionError(f"unexpected tensor '{gguf_name}'")
        return f"model.layers.{index}.{_LAYER_NAMES[part]}", param
    top = _TOP.match(gguf_name)
    if top is not None and top.group(1) in _TOP_NAMES:
        return _TOP_NAMES[top.group(1)], top.group(2)
    if gguf_name.startswith("rope_freqs"):
        raise ConversionError("this GGUF carries rope_freqs (Llama 3.1-style rope scaling), "
                              "which the converter does not translate")
    raise ConversionError(f"unexpected tensor '{gguf_name}'")


def _unpermute_rows(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (interleaved rope -> halves).

    llama.cpp wrote row h*d + 2*i + j from HF row h*d + j*(d/2) + i, for
    head h, head dimension d, i < d/2, j in {0, 1}; a row's quantization
    groups run along it, so scales and biases move with their rows."""
    rows = x.shape[0]
    head_dim = rows // n_heads
    return (x.reshape(n_heads, head_dim // 2, 2, *x.shape[1:])
            .swapaxes(1, 2).reshape(x.shape))


def _config(meta: dict[str, Any], arch: str, tok: GGUFTokenizer, tied: bool,
            quantization: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
    def key(name: str, default: Any = None) -> Any:
        return _scalar(meta, f"{arch}.{name}", default)

    n_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", n_heads)),
        "head_dim": int(key("attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 4096)),
        "vocab_size": int(key("vocab_size", len(tok.tokens))),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ConversionError(f"rope scaling '{scaling}' is not supported")
        config["rope_scaling"] = {"type": "linear",
                                  "factor": float(key("rope.scaling.factor", 1.0))}
    if tok.bos_id is not None:
        config["bos_token_id"] = tok.bos_id
    eog = tok.end_of_generation_ids()
    if eog:
        config["eos_token_id"] = eog if len(eog) > 1 else eog[0]
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    return config


def convert_weights(weights: dict[str, mx.array], n_heads: int, n_kv_heads: int,
                    float_dtype: mx.Dtype) -> tuple[dict[str, mx.array], dict[str, int]]:
    """Renamed, un-permuted weights and the bits of each quantized module."""
    out: dict[str, mx.array] = {}
    bits: dict[str, int] = {}
    for name, value in weights.items():
        module, param = _mlx_name(name)
        if module.endswith("self_attn.q_proj"):
            value = _unpermute_rows(value, n_heads)
        elif module.endswith("self_attn.k_proj"):
            value = _unpermute_rows(value, n_kv_heads)
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(float_dtype)
        out[f"{module}.{param}"] = value
    for name in list(out):
        if not name.endswith(".scales"):
            continue
        module = name.removesuffix(".scales")
        packed = out[f"{module}.weight"]
        in_dims = out[name].shape[-1] * GROUP_SIZE
        bits[module] = packed.shape[-1] * 32 // in_dims
    return out, bits


def dequantize_weights(weights: dict[str, mx.array], bits: dict[str, int],
                       float_dtype: mx.Dtype) -> dict[str, mx.array]:
    """The same weights with every quantized module expanded to floats."""
    out = dict(weights)
    for module, b in bits.items():
        scales, biases = out.pop(f"{module}.scales"), out.pop(f"{module}.biases")
        out[f"{module}.weight"] = mx.dequantize(out[f"{module}.weight"], scales, biases,
                                                GROUP_SIZE, b).astype(float_dtype)
    return out


def _quantization(bits: dict[str, int]) -> dict[str, Any] | None:
    if not bits:
        return None
    common = Counter(bits.values()).most_common(1)[0][0]
    quantization: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": common}
    for module, b in sorted(bits.items()):
        if b != common:
            quantization[module] = {"group_size": GROUP_SIZE, "bits": b}
    return quantization


def convert_gguf(src: Path, dest: Path, dtype: str = "float32", overwrite: bool = False,
                 dequantize: bool = False) -> dict[str, Any]:
    """Write the MLX directory `dest` from the GGUF `src`; returns its config.
    `dequantize` writes every weight as a `dtype` float instead of keeping
    the GGUF's quantized blocks.

    The directory is assembled beside `dest` and renamed into place, so a
    failed or interrupted conversion never leaves a half-written model."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ConversionError(f"dtype must be float32, float16 or bfloat16, not '{dtype}'")
    if not src.is_file():
        raise ConversionError(f"{src} is not a file")
    if dest.exists() and not overwrite:
        raise ConversionError(f"{dest} already exists")
    try:
        loaded = mx.load(str(src), return_metadata=True)
    except Exception as exc:  # mlx raises plain exceptions for unreadable files
        raise ConversionError(f"cannot read {src} as GGUF: {exc}") from exc
    weights, meta = cast(tuple[dict[str, mx.array], dict[str, Any]], loaded)
    arch = str(meta.get("general.architecture", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"architecture '{arch}' is not supported "
                              f"(only {', '.join(SUPPORTED_ARCHITECTURES)})")
    tok = GGUFTokenizer(meta)
    n_heads = int(_scalar(meta, f"{arch}.attention.head_count"))
    n_kv_heads = int(_scalar(meta, f"{arch}.attention.head_count_kv", n_heads))
    float_dtype = getattr(mx, dtype)
    converted, bits = convert_weights(weights, n_heads, n_kv_heads, float_dtype)
    if dequantize:
        converted, bits = dequantize_weights(converted, bits, float_dtype), {}
    tied = "lm_head.weight" not in converted
    config = _config(meta, arch, tok, tied, _quantization(bits), dtype)

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        # mkdtemp makes it private (0700); a model directory is ordinary data.
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        mx.save_safetensors(str(staging / "model.safetensors"), converted,
                            metadata={"format": "mlx"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok.tokenizer.save(str(staging / "tokenizer.json"))
        (staging / "tokenizer_config.json").write_text(
            json.dumps(tok.tokenizer_config(config["max_position_embeddings"]), indent=2,
                       ensure_ascii=False) + "\n")
        (staging / "special_tokens_map.json").write_text(
            json.dumps(tok.special_tokens_map(), indent=2, ensure_ascii=False) + "\n")
        eos = config.get("eos_token_id")
        generation = {"bos_token_id": tok.bos_id, "eos_token_id": eos}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return config
