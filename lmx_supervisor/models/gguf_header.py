"""Reads the header of a GGUF file without loading the model: its key/value
metadata (the memory guard needs a model's shape: layers, embedding width,
attention heads) and its tensor table (the inventory checks that every
tensor's data lies inside the file, i.e. the download is not truncated).

Format (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor
count, u64 metadata count, then `count` entries of (string key, u32 type,
value), then per tensor (name, u32 rank, u64 dims, u32 ggml type, u64 offset
into the aligned data section). Strings are a u64 length plus UTF-8 bytes.
The file is memory-mapped, so only the header pages are read from disk.
Large arrays (the tokenizer's vocabulary) are walked but not kept.

The header is untrusted input (a download, a file someone handed over):
every count and length is checked against the bytes left in the file before
anything is read or allocated, so a forged tensor count or string length is
a GGUFError naming the field, never a long loop or a huge allocation.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
# Arrays longer than this are skipped rather than returned: only per-layer
# numbers (a few hundred at most) are of interest here.
MAX_KEPT_ARRAY = 4096

_SCALARS: dict[int, struct.Struct] = {
    0: struct.Struct("<B"),  # uint8
    1: struct.Struct("<b"),  # int8
    2: struct.Struct("<H"),  # uint16
    3: struct.Struct("<h"),  # int16
    4: struct.Struct("<I"),  # uint32
    5: struct.Struct("<i"),  # int32
    6: struct.Struct("<f"),  # float32
    7: struct.Struct("<?"),  # bool
    10: struct.Struct("<Q"),  # uint64
    11: struct.Struct("<q"),  # int64
    12: struct.Struct("<d"),  # float64
}
_STRING = 8
_ARRAY = 9
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Smallest encodings, for the "can this count fit in the file" checks: a
# metadata entry is a key (u64 length) + u32 type + at least 1 byte of value;
# a tensor entry is a name (u64 length) + u32 rank + u32 type + u64 offset.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8
# Bounds no real model comes near (the largest models have a few thousand
# tensors, keys and template strings of kilobytes), so a header past them is
# corrupt or hostile even when the file is big enough to pretend otherwise.
MAX_TENSORS = 1_000_000
MAX_METADATA_ENTRIES = 100_000
MAX_STRING_BYTES = 64 * 1024 * 1024
MAX_TENSOR_RANK = 8


class GGUFError(ValueError):
    """Not a GGUF file, or a header this reader does not understand."""


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, fmt: struct.Struct) -> Any:
        end = self.pos + fmt.size
        if end > len(self.buf):
            raise GGUFError("truncated GGUF header")
        value = fmt.unpack_from(self.buf, self.pos)[0]
        self.pos = end
        return value

    def _string_length(self) -> int:
        length = int(self.take(_U64))
        if length > MAX_STRING_BYTES:
            raise GGUFError(f"GGUF string length {length} at byte {self.pos - 8} exceeds the "
                            f"{MAX_STRING_BYTES}-byte limit (corrupt or forged header)")
        if length > self.left:
            raise GGUFError(f"truncated GGUF string: {length} bytes announced at byte "
                            f"{self.pos - 8}, {self.left} left in the file")
        return length

    def string(self) -> str:
        length = self._string_length()
        end = self.pos + length
        text = self.buf[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def skip_string(self) -> None:
        length = self._string_length()  # moves pos past the length field first
        self.pos += length

    def check_count(self, what: str, count: int, min_bytes: int, limit: int) -> None:
        """Refuse a count the rest of the file cannot hold (or no model has)."""
        if count > limit:
            raise GGUFError(f"GGUF {what} {count} exceeds the limit of {limit} "
                            "(corrupt or forged header)")
        if count * min_bytes > self.left:
            raise GGUFError(f"GGUF {what} {count} cannot fit in the {self.left} bytes left "
                            "in the file (truncated, corrupt or forged header)")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.take(_U32)
            count = self.take(_U64)
            if item_type == _ARRAY:  # llama.cpp refuses these too; unbounded recursion
                raise GGUFError(f"GGUF array of arrays at byte {self.pos - 12} (not supported)")
            if item_type not in _SCALARS and item_type != _STRING:
                raise GGUFError(f"unknown GGUF array item type {item_type}")
            min_item = _SCALARS[item_type].size if item_type in _SCALARS else 8
            if count * min_item > self.left:
                raise GGUFError(f"GGUF array length {count} cannot fit in the {self.left} "
                                "bytes left in the file (truncated, corrupt or forged header)")
            if count > MAX_KEPT_ARRAY or item_type in (_STRING, _ARRAY):
                self._skip_array(item_type, count)
                return None
            return [self.value(item_type) for _ in range(count)]
        raise GGUFError(f"unknown GGUF value type {vtype}")

    def _skip_array(self, item_type: int, count: int) -> None:
        if item_type in _SCALARS:
            self.pos += _SCALARS[item_type].size * count
            if self.pos > len(self.buf):
                raise GGUFError("truncated GGUF array")
        else:
            for _ in range(count):
                self.skip_string()


# --- tensor data extent (completeness) ---------------------------------------

# ggml type id -> (elements per block, bytes per block), from ggml.h. Types
# not listed (new ones) are checked by offset only.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
    8: (32, 34), 9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144),
    13: (256, 176), 14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74),
    18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
}
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorInfo:
    offset: int  # relative to the data section
    size: int  # bytes, or -1 when the ggml type is unknown here
    elements: int
    ggml_type: int


def _header_and_tensors(buf: mmap.mmap) -> tuple[dict[str, Any], int, list[TensorInfo]]:
    """Metadata, the offset where tensor data starts, and every tensor."""
    if buf[:4] != MAGIC:
        raise GGUFError("not a GGUF file (bad magic)")
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.take(_U32)
    if version == 1:  # v1 used 32-bit counts
        n_tensors = cur.take(_U32)
        count = cur.take(_U32)
    elif version in (2, 3):
        n_tensors = cur.take(_U64)
        count = cur.take(_U64)
    else:
        raise GGUFError(f"unsupported GGUF version {version}")
    meta: dict[str, Any] = {"GGUF.version": version}
    cur.check_count("metadata entry count", count, _MIN_KV_BYTES, MAX_METADATA_ENTRIES)
    for _ in range(count):
        key = cur.string()
        meta[key] = cur.value(cur.take(_U32))
    cur.check_count("tensor count", n_tensors, _MIN_TENSOR_BYTES, MAX_TENSORS)
    tensors: list[TensorInfo] = []
    for index in range(n_tensors):
        cur.skip_string()
        n_dims = cur.take(_U32)
        if n_dims > MAX_TENSOR_RANK:
            raise GGUFError(f"GGUF tensor {index} has rank {n_dims}, more than "
                            f"{MAX_TENSOR_RANK} (corrupt header)")
        elements = 1
        for _ in range(n_dims):
            elements *= cur.take(_U64)
        ggml_type = cur.take(_U32)
        offset = cur.take(_U64)
        block = GGML_BLOCKS.get(ggml_type)
        size = -1 if block is None else elements // block[0] * block[1]
        tensors.append(TensorInfo(offset, size, elements, ggml_type))
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        alignment = DEFAULT_ALIGNMENT
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    return meta, data_start, tensors


def gguf_problem(path: Path) -> str | None:
    """None when the header parses and every tensor it describes lies inside
    the file; otherwise what is wrong, in words (a truncated download says
    so)."""
    try:
        size = path.stat().st_size
        if size < 24:
            return "file too short to be GGUF (truncated)"
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _meta, data_start, tensors = _header_and_tensors(buf)
    except GGUFError as exc:
        return str(exc)
    except (OSError, ValueError) as exc:
        return f"cannot read: {exc}"
    end = data_start
    for tensor in tensors:
        end = max(end, data_start + tensor.offset + max(tensor.size, 1))
    if end > size:
        return f"truncated: tensor data needs {end} bytes, file has {size}"
    return None


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The metadata entries of a GGUF file; arrays of strings (vocabularies)
    and very long arrays come back as None."""
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _header_and_tensors(buf)[0]


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_start: int
    file_size: int


def read_gguf_header(path: Path) -> GGUFHeader:
    """Metadata and tensor table; GGUFError says what is wrong with a file
    that is not a whole, well-formed GGUF."""
    size = path.stat().st_size
    if size < 24:
        raise GGUFError(f"file too short to be GGUF ({size} bytes; truncated)")
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        meta, data_start, tensors = _header_and_tensors(buf)
    return GGUFHeader(meta, tensors, data_start, size)


# ggml type id -> name (ggml.h), for reporting a model's quantization.
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
