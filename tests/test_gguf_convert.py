"""`lmx models convert`: the bundled SmolLM2 GGUF converted to an MLX
directory computes what llama.cpp computes, the way two correct runtimes can
agree, and tokenizes exactly as llama.cpp does.

llama.cpp multiplies Q4_1 weights with 8-bit-quantized activations, MLX with
float activations, so logits differ by up to ~1 and near-ties may swap.
Hence teacher forcing: llama.cpp's greedy tokens are fed to both and their
predictions compared position by position. An independent numpy forward
pass over the converted weights shows MLX computes exactly that math.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from tokenizers import Tokenizer

pytestmark = pytest.mark.timeout(300)

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers.", "Name a famous painter and one of their works."]
GREEDY_TOKENS = 24

TRICKY = [
    "Hello world", "12345 + 6789 = 19134", "1.5e-10 3,141,592 and 2024-11-22",
    "  leading  and   multiple   spaces ", "tabs\tand\nnewlines\n\n\r\n", "    ", "x  \n  y",
    "Unicode: naïve café, 日本語, emoji 😀👍🏽, Ελληνικά, ½ ² ٣", "ÀÉÎÕÜ ß ﬁ", "\u200b zero width",
    "def f(x):\n    return x**2  # comment\n", "if (a && b) { return -1; }",
    "https://example.com/a?b=c&d=e", "don't I'll we're THEY'VE",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "a<|endoftext|>b",
    "<repo_name>foo<file_sep>", " ", "\n",
]


@pytest.fixture(scope="module")
def llama(model_file: Path) -> Any:
    # One thread: llama.cpp's threads spin while they wait for each other,
    # which costs much more than it saves for a 135M model on a busy machine.
    llm = llama_cpp.Llama(model_path=str(model_file), logits_all=True, n_ctx=512,
                          n_threads=1, verbose=False)
    yield llm
    llm.close()


def chat_prompt(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_matches_llama_cpp(llama: Any, mlx_model_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(mlx_model_dir / "tokenizer.json"))
    for text in TRICKY:
        expected = llama.tokenize(text.encode(), add_bos=False, special=True)
        assert tokenizer.encode(text).ids == expected, text
        assert tokenizer.decode(expected, skip_special_tokens=False) == text, text
    config = json.loads((mlx_model_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == llama.metadata["tokenizer.chat_template"]
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    model_config = json.loads((mlx_model_dir / "config.json").read_text())
    # Per-module bits: the token embedding is Q8_0 in this Q4_1 file; tied head.
    assert model_config["quantization"] == {
        "group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    assert model_config["tie_word_embeddings"] is True


def test_teacher_forced_agreement_with_llama_cpp(llama: Any, mlx_model_dir: Path,
                                                 tmp_path: Path) -> None:
    sequences, prompt_lengths, llama_logits = [], [], []
    for question in PROMPTS:
        prompt = llama.tokenize(chat_prompt(question).encode(), add_bos=False, special=True)
        llama.reset()
        llama.eval(prompt)
        generated: list[int] = []
        while len(generated) < GREEDY_TOKENS:  # greedy, keeping every position's logits
            token = int(np.argmax(llama.scores[llama.n_tokens - 1]))
            if token == llama.token_eos():
                break
            generated.append(token)
            llama.eval([token])
        sequence = prompt + generated
        sequences.append(sequence)
        prompt_lengths.append(len(prompt))
        llama_logits.append(np.array(llama.scores[:len(sequence)]))
    (tmp_path / "in.json").write_text(json.dumps(sequences))
    done = subprocess.run([sys.executable, "-m", "tests.mlx_reference", str(mlx_model_dir),
                           str(tmp_path / "in.json"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    out = np.load(tmp_path / "out.npz")

    agree = total = 0
    worst = 0.0
    for i, (sequence, start) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        ours, theirs = out[f"mlx{i}"], llama_logits[i]
        rows = range(start - 1, len(sequence) - 1)  # positions predicting generated tokens
        agree += sum(int(ours[r].argmax() == theirs[r].argmax()) for r in rows)
        total += len(rows)
        worst = max(worst, max(float(np.abs(ours[r] - theirs[r]).max()) for r in rows))
        first = start - 1
        assert set(np.argsort(ours[first])[-5:]) == set(np.argsort(theirs[first])[-5:]), i
    assert total >= 40 and agree / total >= 0.9, (agree, total)
    # MLX computes the converted weights' math up to float32 rounding: the
    # differences from llama.cpp come from llama.cpp's activation quantization.
    assert float(np.abs(out["mlx0"] - out["ref0"]).max()) < 1e-2
    assert worst <= 2.0, worst


def test_convert_refuses_bad_input(tmp_path: Path, mlx_model_dir: Path) -> None:
    def convert(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lmx_gateway", "models", "convert", *args],
                              capture_output=True, text=True, timeout=120)

    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_bytes(b"this is not a GGUF file")
    bad = convert(str(not_gguf), str(tmp_path / "out"))
    assert bad.returncode == 1 and "cannot convert" in bad.stderr
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # no staging directory left behind
    exists = convert(str(not_gguf), str(mlx_model_dir))
    assert exists.returncode == 1 and "already exists" in exists.stderr
