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
"""

from __future__ import annotations

import mmap
import struct
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


class GGUFError(ValueError):
    """Not a GGUF file, or a header this reader does not understand."""


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: struct.Struct) -> Any:
        end = self.pos + fmt.size
        if end > len(self.buf):
            raise GGUFError("truncated GGUF header")
        value = fmt.unpack_from(self.buf, self.pos)[0]
        self.pos = end
        return value

    def string(self) -> str:
        length = self.take(_U64)
        end = self.pos + length
        if end > len(self.buf):
            raise GGUFError("truncated GGUF string")
        text = self.buf[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def skip_string(self) -> None:
        length = self.take(_U64)
        self.pos += length
        if self.pos > len(self.buf):
            raise GGUFError("truncated GGUF string")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.take(_U32)
            count = self.take(_U64)
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
        elif item_type == _STRING:
            for _ in range(count):
                self.skip_string()
        else:
            for _ in range(count):
                self.value(item_type)


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


def _header_and_tensors(buf: mmap.mmap) -> tuple[dict[str, Any], int, list[tuple[int, int]]]:
    """Metadata, the offset where tensor data starts, and for every tensor
    (relative data offset, byte length or -1 when its type is unknown)."""
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
    for _ in range(count):
        key = cur.string()
        meta[key] = cur.value(cur.take(_U32))
    tensors: list[tuple[int, int]] = []
    for _ in range(n_tensors):
        cur.skip_string()
        n_dims = cur.take(_U32)
        if n_dims > 8:
            raise GGUFError("implausible tensor rank (corrupt header)")
        elements = 1
        for _ in range(n_dims):
            elements *= cur.take(_U64)
        ggml_type = cur.take(_U32)
        offset = cur.take(_U64)
        block = GGML_BLOCKS.get(ggml_type)
        size = -1 if block is None else elements // block[0] * block[1]
        tensors.append((offset, size))
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
    for offset, length in tensors:
        end = max(end, data_start + offset + max(length, 1))
    if end > size:
        return f"truncated: tensor data needs {end} bytes, file has {size}"
    return None


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The metadata entries of a GGUF file; arrays of strings (vocabularies)
    and very long arrays come back as None."""
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _header_and_tensors(buf)[0]
