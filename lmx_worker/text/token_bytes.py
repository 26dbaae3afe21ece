"""The raw bytes each token id stands for, from a Hugging Face tokenizer.

The worker streams text by feeding token bytes to TextStream (which holds
back incomplete UTF-8), so it needs bytes per token, not the replacement-
character strings a per-token `decode` gives for a token ending mid
character. Two vocabulary encodings cover nearly every model:
- byte-level BPE (GPT-2 style): each vocabulary character stands for one
  byte through GPT-2's byte-to-unicode table;
- SentencePiece style: "▁" is a space and `<0xNN>` tokens are single bytes.
Special (control) tokens produce no text, as in the llama.cpp backend.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode table."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _decoder_kinds(decoder: Any) -> set[str]:
    if not isinstance(decoder, dict):
        return set()
    kinds = {str(decoder.get("type"))}
    for inner in decoder.get("decoders") or []:
        kinds |= _decoder_kinds(inner)
    if decoder.get("type") == "Replace":
        pattern = decoder.get("pattern", {})
        if isinstance(pattern, dict) and pattern.get("String") == "▁":
            kinds.add("Metaspace")
    return kinds


def token_byte_table(backend_json: str | None, vocab_size: int, id_to_token: Any,
                     special_ids: set[int], decode_one: Any) -> list[bytes]:
    """Bytes for ids 0..vocab_size-1.

    `backend_json` is the fast tokenizer's serialized form (None for a slow
    tokenizer), `id_to_token(i)` the vocabulary string of id i (or None),
    `decode_one(i)` a fallback decoder for vocabularies of neither kind."""
    kinds: set[str] = set()
    added: set[int] = set()
    if backend_json is not None:
        data = json.loads(backend_json)
        kinds = _decoder_kinds(data.get("decoder"))
        added = {int(t["id"]) for t in data.get("added_tokens", [])}
        special_ids = special_ids | {int(t["id"]) for t in data.get("added_tokens", [])
                                     if t.get("special")}
    byte_level = "ByteLevel" in kinds
    metaspace = "Metaspace" in kinds or "ByteFallback" in kinds
    table: list[bytes] = []
    byte_decoder = _gpt2_byte_decoder()
    for i in range(vocab_size):
        if i in special_ids:
            table.append(b"")
            continue
        piece = id_to_token(i)
        if piece is None:
            table.append(b"")
        elif i in added:
            table.append(str(piece).encode())  # added tokens are plain text
        elif byte_level and all(ch in byte_decoder for ch in piece):
            table.append(bytes(byte_decoder[ch] for ch in piece))
        elif metaspace:
            match = _BYTE_TOKEN.match(piece)
            table.append(bytes([int(match.group(1), 16)]) if match
                         else piece.replace("▁", " ").encode())
        else:
            table.append(str(decode_one(i)).encode())
    return table
