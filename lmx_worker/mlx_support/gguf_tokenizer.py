"""A Hugging Face `tokenizer.json` rebuilt from a GGUF file's vocabulary.

GGUF keeps the tokenizer as metadata: the token strings, their types, the
BPE merges and the name of llama.cpp's pre-tokenizer (the regex that splits
text into words before BPE runs). transformers' GGUF reader needs torch and
knows no rule for several pre-tokenizers (SmolLM's split-every-digit one), so
this builds the tokenizer with the `tokenizers` library directly, matching
llama.cpp's splitting rules for the pre-tokenizers named below.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are
handled; SentencePiece ones ("llama") are refused with a clear message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp token types (llama_token_type): 3 = control, 4 = user-defined.
_CONTROL = 3
_USER_DEFINED = 4

# llama.cpp's word-splitting regexes (llama-vocab.cpp), by GGUF pre-tokenizer
# name. GPT-2's own regex is what ByteLevel(use_regex=True) applies.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = {"default", "gpt-2", "gpt2", "olmo", "jais", "poro-chat", "viking"}
# Every digit is its own word, then GPT-2's regex.
_DIGIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"}
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe", "falcon3"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "megrez"}

# Token texts llama.cpp treats as end-of-generation besides the EOS id (its
# llama-vocab.cpp heuristics); the converter lists them as EOS ids too so an
# MLX worker stops where llama.cpp does.
END_OF_GENERATION_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "</s>",
})


class UnsupportedTokenizer(ValueError):
    """The GGUF's tokenizer is of a kind this converter cannot rebuild."""


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    byte_level_plain = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in _GPT2_PRE:
        return byte_level_regex
    if pre in _DIGIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level_regex])
    for names, regex in ((_LLAMA3_PRE, _LLAMA3_REGEX), (_QWEN2_PRE, _QWEN2_REGEX)):
        if pre in names:
            return pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                byte_level_plain])
    known = sorted(_GPT2_PRE | _DIGIT_PRE | _LLAMA3_PRE | _QWEN2_PRE)
    raise UnsupportedTokenizer(
        f"GGUF pre-tokenizer '{pre}' is not supported (known: {', '.join(known)})")


def _int(meta: Mapping[str, Any], key: str) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    return int(value.item() if hasattr(value, "item") else value)


def _bool(meta: Mapping[str, Any], key: str, default: bool) -> bool:
    value = meta.get(key)
    if value is None:
        return default
    return bool(value.item() if hasattr(value, "item") else value)


class GGUFTokenizer:
    """The tokenizer files of a GGUF model, built from its metadata."""

    def __init__(self, meta: Mapping[str, Any]) -> None:
        kind = str(meta.get("tokenizer.ggml.model", ""))
        if kind != "gpt2":
            raise UnsupportedTokenizer(
                f"GGUF tokenizer model '{kind or 'missing'}' is not supported "
                "(only byte-level BPE, 'gpt2', GGUF vocabularies convert)")
        self.tokens: list[str] = [str(t) for t in meta["tokenizer.ggml.tokens"]]
        raw_types = meta.get("tokenizer.ggml.token_type")
        self.types: list[int] = ([int(t) for t in raw_types.tolist()]
                                 if raw_types is not None else [1] * len(self.tokens))
        merges = [str(m) for m in meta.get("tokenizer.ggml.merges", [])]
        self.pre = str(meta.get("tokenizer.ggml.pre", "default"))
        self.bos_id = _int(meta, "tokenizer.ggml.bos_token_id")
        self.eos_id = _int(meta, "tokenizer.ggml.eos_token_id")
        self.eot_id = _int(meta, "tokenizer.ggml.eot_token_id")
        self.eom_id = _int(meta, "tokenizer.ggml.eom_token_id")
        self.unk_id = _int(meta, "tokenizer.ggml.unknown_token_id")
        self.pad_id = _int(meta, "tokenizer.ggml.padding_token_id")
        self.add_bos = _bool(meta, "tokenizer.ggml.add_bos_token", False)
        self.chat_template = meta.get("tokenizer.chat_template")

        vocab = {tok: i for i, tok in enumerate(self.tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        # llama3-style vocabularies hold whole words that no merge path
        # reaches; llama.cpp looks them up first, as HF's ignore_merges does.
        ignore_merges = self.pre in _LLAMA3_PRE
        bpe = models.BPE(vocab=vocab, merges=[(a, b) for a, b in pairs], fuse_unk=False,
                         byte_fallback=False, ignore_merges=ignore_merges)
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = _pre_tokenizer(self.pre)
        tok.decoder = decoders.ByteLevel()
        added = [AddedToken(text, special=ttype == _CONTROL, normalized=False)
                 for text, ttype in zip(self.tokens, self.types, strict=True)
                 if ttype in (_CONTROL, _USER_DEFINED)]
        tok.add_tokens(added)
        if self.add_bos and self.bos_id is not None:
            bos = self.tokens[self.bos_id]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, self.bos_id)])
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        self.tokenizer = tok

    def end_of_generation_ids(self) -> list[int]:
        """EOS first, then EOT/EOM and control tokens llama.cpp also stops on."""
        ids: list[int] = []
        for i in (self.eos_id, self.eot_id, self.eom_id):
            if i is not None and i not in ids:
                ids.append(i)
        for i, (text, ttype) in enumerate(zip(self.tokens, self.types, strict=True)):
            if ttype == _CONTROL and text in END_OF_GENERATION_TEXTS and i not in ids:
                ids.append(i)
        return ids

    def _text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    def tokenizer_config(self, model_max_length: int) -> dict[str, Any]:
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
        }
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                              ("unk_token", self.unk_id), ("pad_token", self.pad_id)):
            text = self._text(token_id)
            if text is not None:
                config[key] = text
        if self.chat_template:
            config["chat_template"] = str(self.chat_template)
        return config

    def special_tokens_map(self) -> dict[str, str]:
        config = self.tokenizer_config(0)
        return {k: v for k, v in config.items()
                if k in ("bos_token", "eos_token", "unk_token", "pad_token")}
