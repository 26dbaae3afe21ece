"""/v1/embeddings against a live server: all-MiniLM-L6-v2 (from its PyPI
wheel) in its own MLX worker, vectors held to sentence-transformers' own
(tests/data/minilm_reference.json), through the official openai SDK in
both encodings; token-id input, dimensions, usage, batching of concurrent
requests, the listing, and bad input."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from tokenizers import Tokenizer

from tests.conftest import MODEL_ID, LMXServer, running_server
from tests.encoder_fixtures import cosine, minilm_dir, reference

pytestmark = pytest.mark.timeout(150)

MINILM = "all-MiniLM-L6-v2"
MATRYOSHKA = "minilm-matryoshka"
SLOW = "minilm-slow"  # the same model under another id, with a slow_encode failpoint


def matryoshka_copy(src: Path, dst: Path) -> Path:
    """MiniLM's files under a model card that says "Matryoshka": the model is
    not really Matryoshka-trained, so this only exercises the mechanism
    (cut, then renormalise), which the test checks arithmetically."""
    dst.mkdir()
    for item in src.iterdir():
        if item.name != "README.md":
            (dst / item.name).symlink_to(item)
    (dst / "README.md").write_text("Trained with MatryoshkaLoss (matryoshka_dims: 384, 128).\n")
    return dst


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[LMXServer]:
    # warmup_on_load: the canary of an encoder is one embedding.
    # Loads by path read from the test cache: it must be an allowed path.
    with running_server(tmp_path_factory, "embed", links=[model_file, (MINILM, minilm_dir())],
                        prepare=lambda home: matryoshka_copy(minilm_dir(),
                                                             home / "models" / MATRYOSHKA),
                        models={"auto_load": [MODEL_ID, MINILM, MATRYOSHKA],
                                "warmup_on_load": True,
                                "allowed_paths": [str(minilm_dir().parent)]},
                        env={"LMX_FAILPOINTS": f"{SLOW}=slow_encode:1500"},
                        wait_for=[MINILM, MATRYOSHKA, MODEL_ID], timeout=120) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(reference()["max_seq_length"])
    return tok


def _check_reference(vectors: list[list[float]]) -> None:
    ref = reference()
    assert len(vectors) == len(ref["texts"])
    for got, want, text in zip(vectors, ref["vectors"], ref["texts"], strict=True):
        got_a, want_a = np.array(got, dtype=np.float32), np.array(want, dtype=np.float32)
        assert cosine(got_a, want_a) >= 0.999, text
        assert abs(float(np.linalg.norm(got_a)) - 1.0) < 1e-4  # the Normalize module


def test_vectors_match_sentence_transformers(server: LMXServer, tokenizer: Tokenizer) -> None:
    client = server.openai()
    texts = reference()["texts"]
    floats = client.embeddings.create(model=MINILM, input=texts, encoding_format="float")
    assert floats.model == MINILM and floats.object == "list"
    assert [d.index for d in floats.data] == list(range(len(texts)))
    _check_reference([d.embedding for d in floats.data])
    # Usage: every token the model read, special tokens included, after the
    # truncation to 256 (the long text is cut).
    expected = sum(len(e.ids) for e in tokenizer.encode_batch(texts))
    assert floats.usage.prompt_tokens == expected
    assert floats.usage.total_tokens == expected
    # The SDK's default asks for base64 and decodes it to floats itself.
    decoded = client.embeddings.create(model=MINILM, input=texts)
    assert [d.embedding for d in decoded.data] == [d.embedding for d in floats.data]
    # Asked for explicitly, base64 comes back as the raw little-endian float32
    # bytes (the same batch gives the same bits: batch shape changes rounding).
    raw = client.embeddings.create(model=MINILM, input=texts, encoding_format="base64")
    for item, want in zip(raw.data, floats.data, strict=True):
        assert isinstance(item.embedding, str)
        values = np.frombuffer(base64.b64decode(item.embedding), dtype="<f4")
        assert values.tolist() == want.embedding


def test_single_string_and_token_ids(server: LMXServer, tokenizer: Tokenizer) -> None:
    client = server.openai()
    text = reference()["texts"][0]
    one = client.embeddings.create(model=MINILM, input=text, encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    _check_reference_one(one.data[0].embedding, 0)
    # Token ids are the model's complete input ([CLS] ... [SEP] included).
    ids = [e.ids for e in tokenizer.encode_batch(reference()["texts"][:3])]
    by_ids = client.embeddings.create(model=MINILM, input=ids, encoding_format="float")
    for i, item in enumerate(by_ids.data):
        _check_reference_one(item.embedding, i)
    assert by_ids.usage.prompt_tokens == sum(len(x) for x in ids)
    flat = client.embeddings.create(model=MINILM, input=ids[0], encoding_format="float")
    assert len(flat.data) == 1
    _check_reference_one(flat.data[0].embedding, 0)


def _check_reference_one(vector: list[float], index: int) -> None:
    want = np.array(reference()["vectors"][index], dtype=np.float32)
    assert cosine(np.array(vector, dtype=np.float32), want) >= 0.999


def test_dimensions(server: LMXServer) -> None:
    client = server.openai()
    texts = reference()["texts"][:4]
    full = client.embeddings.create(model=MINILM, input=texts, dimensions=384,
                                    encoding_format="float")
    assert all(len(d.embedding) == 384 for d in full.data)
    # A Matryoshka model's vector cut to 128 values and renormalised.
    cut = client.embeddings.create(model=MATRYOSHKA, input=texts, dimensions=128,
                                   encoding_format="float")
    for item, want in zip(cut.data, reference()["vectors"], strict=False):
        got = np.array(item.embedding, dtype=np.float32)
        assert got.shape == (128,)
        assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-4
        head = np.array(want[:128], dtype=np.float32)
        assert cosine(got, head) >= 0.999
    # Not Matryoshka-trained: a shorter vector would be meaningless.
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MINILM, input="x", dimensions=128)
    assert refused.value.body["param"] == "dimensions"  # type: ignore[index]
    assert "Matryoshka" in refused.value.body["message"]  # type: ignore[index]


def test_listing(server: LMXServer) -> None:
    models = {m["id"]: m for m in server.http.get("/v1/models").json()["data"]}
    row = models[MINILM]
    assert row["backend"] == "mlx_encoder"
    assert row["capabilities"] == ["embeddings", "rerank"]
    assert row["embedding_dimensions"] == 384
    assert row["embedding_pooling"] == "mean" and row["embedding_normalized"] is True
    assert row["rerank_mode"] == "bi-encoder-cosine"
    assert row["dimensions_adjustable"] is False
    assert models[MATRYOSHKA]["dimensions_adjustable"] is True
    assert "embeddings" not in models[MODEL_ID]["capabilities"]
    assert "rerank_mode" not in models[MODEL_ID]
    admin = server.admin_models()[MINILM]
    assert admin["rerank_mode"] == "bi-encoder-cosine"
    assert admin["context_length"] == 256
    assert admin["worker_stats"]["requests_finished"] >= 1  # the warm-up at least


def test_concurrent_requests_share_a_forward_pass(server: LMXServer) -> None:
    """With the worker held 1.5 s before each batch, requests sent together
    pile up behind the first and run as one batch; each still gets its own
    vectors."""
    loaded = server.load(str(minilm_dir()), served_name=SLOW)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["backend"] == "mlx_encoder"
    server.wait_ready(SLOW, timeout=60)
    before = server.admin_models()[SLOW]["worker_stats"]["encoder_batches"]
    texts = reference()["texts"]
    n = 4
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            resp = server.http.post("/v1/embeddings", json={
                "model": SLOW, "input": texts[i:i + 3]}, timeout=60)
            results[i] = resp
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors
    for i in range(n):
        assert results[i].status_code == 200, results[i].text
        data = results[i].json()["data"]
        for j, item in enumerate(data):
            _check_reference_one(item["embedding"], i + j)
    batches = server.admin_models()[SLOW]["worker_stats"]["encoder_batches"] - before
    assert 1 <= batches < n, batches
    assert server.http.post("/admin/models/unload", json={"model_id": SLOW}).status_code == 200


def test_generation_on_an_embedding_model_is_refused(server: LMXServer) -> None:
    resp = server.http.post("/v1/chat/completions", json={
        "model": MINILM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("model_lacks_capability", "model")
    assert "cannot generate text" in error["message"]
    completion = server.http.post("/v1/completions", json={"model": MINILM, "prompt": "x"})
    assert completion.status_code == 400
    assert completion.json()["error"]["code"] == "model_lacks_capability"
    assert server.http.get("/healthz").status_code == 200


BAD: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("empty list", {"model": MINILM, "input": []}, 400, "invalid_value", "input"),
    ("empty string", {"model": MINILM, "input": ""}, 400, "invalid_value", "input"),
    ("empty string in list", {"model": MINILM, "input": ["a", ""]}, 400, "invalid_value",
     "input"),
    ("missing input", {"model": MINILM}, 400, "missing_required_parameter", "input"),
    ("number", {"model": MINILM, "input": 5}, 400, "invalid_type", "input"),
    ("object", {"model": MINILM, "input": {"text": "a"}}, 400, "invalid_type", "input"),
    ("floats", {"model": MINILM, "input": [1.5, 2.5]}, 400, "invalid_type", "input"),
    ("mixed", {"model": MINILM, "input": ["a", 3]}, 400, "invalid_type", "input"),
    ("strings in token lists", {"model": MINILM, "input": [["a"]]}, 400, "invalid_type",
     "input"),
    ("empty token list", {"model": MINILM, "input": [[]]}, 400, "invalid_value", "input"),
    ("token id past vocab", {"model": MINILM, "input": [101, 30522, 102]}, 400,
     "invalid_value", "input"),
    ("negative token id", {"model": MINILM, "input": [[101, -1, 102]]}, 400,
     "invalid_value", "input"),
    ("too many token ids", {"model": MINILM, "input": [[101] * 257]}, 400,
     "context_length_exceeded", "input"),
    ("dimensions above the model's", {"model": MINILM, "input": "a", "dimensions": 385},
     400, "invalid_value", "dimensions"),
    ("dimensions zero", {"model": MINILM, "input": "a", "dimensions": 0}, 400,
     "invalid_value", "dimensions"),
    ("dimensions wrong type", {"model": MINILM, "input": "a", "dimensions": "128"}, 400,
     "invalid_type", "dimensions"),
    ("bad encoding_format", {"model": MINILM, "input": "a", "encoding_format": "hex"}, 400,
     "invalid_value", "encoding_format"),
    ("chat model", {"model": MODEL_ID, "input": "a"}, 400, "model_lacks_capability",
     "model"),
    ("unknown model", {"model": "nope", "input": "a"}, 404, "model-not-found", "model"),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
def test_bad_input(server: LMXServer, body: dict[str, Any], status: int, code: str,
                   param: str | None) -> None:
    resp = server.http.post("/v1/embeddings", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert (error["code"], error["param"]) == (code, param), error
    assert error["message"]


def test_token_ids_checked_by_the_worker_too() -> None:
    """The worker refuses out-of-vocabulary ids itself (the gateway's check
    is only an early answer): run the engine in-process on the same model."""
    from lmx_protocol import Embed, Embeddings, Failed, Generate, SamplingParams
    from lmx_worker.encoders.mlx_encoder_engine import MlxEncoderEngine
    from lmx_worker.engines.engine import RequestError
    from lmx_worker.process.spec import WorkerSpec

    engine = MlxEncoderEngine(WorkerSpec(worker_id="w", model_id="m",
                                         model_path=str(minilm_dir()),
                                         backend="mlx_encoder", address="inproc://none"))
    out = engine.embed([Embed("bad", token_ids=[[101, 99999, 102]]),
                        Embed("good", texts=["hello"])])
    by_id = {o.request_id: o for o in out}
    bad = by_id["bad"]
    assert isinstance(bad, Failed) and bad.param == "input" and "99999" in bad.message
    good = by_id["good"]
    assert isinstance(good, Embeddings) and (good.count, good.dim) == (1, 384)
    # ...and a generation that got past the gateway is refused, not hung.
    with pytest.raises(RequestError, match="cannot generate text"):
        engine.add(Generate("g", SamplingParams(), prompt="hi"))
    assert not engine.has_work()


def test_gguf_embedding_model_on_llama_cpp(server: LMXServer, tokenizer: Tokenizer) -> None:
    """The same model as a GGUF file (tests/gguf_bert.py) loads on the
    llama.cpp embedding backend and gives sentence-transformers' vectors.
    Its GGUF context is the model's 512 positions, not sentence-transformers'
    max_seq_length of 256, so the one text longer than 256 tokens is checked
    by its first 256 tokens, sent as token ids."""
    from tests.gguf_bert import minilm_gguf

    path = minilm_gguf()
    loaded = server.load(str(path))
    assert loaded.status_code == 200, loaded.text
    model = loaded.json()["model_id"]
    assert loaded.json()["backend"] == "llama_cpp_encoder"
    listed = {m["id"]: m for m in server.http.get("/v1/models").json()["data"]}[model]
    assert listed["capabilities"] == ["embeddings", "rerank"]
    assert listed["embedding_dimensions"] == 384 and listed["embedding_pooling"] == "mean"
    assert listed["rerank_mode"] == "bi-encoder-cosine"
    client = server.openai()
    texts = reference()["texts"]
    short, long_text = texts[:-1], texts[-1]
    result = client.embeddings.create(model=model, input=short, encoding_format="float")
    for i, item in enumerate(result.data):
        _check_reference_one(item.embedding, i)
    assert result.usage.prompt_tokens == sum(len(e.ids) for e in tokenizer.encode_batch(short))
    cut = tokenizer.encode(long_text).ids  # 256 tokens, [SEP] last
    assert len(cut) == 256
    by_ids = client.embeddings.create(model=model, input=[cut])
    _check_reference_one(by_ids.data[0].embedding, len(texts) - 1)
    whole = client.embeddings.create(model=model, input=long_text)
    assert 256 < whole.usage.prompt_tokens <= 512
    ranked = server.http.post("/v1/rerank", json={
        "model": model, "query": "capital of France",
        "documents": ["I like bananas", "Paris is the capital of France"]}).json()
    assert ranked["results"][0]["index"] == 1
    bad = server.http.post("/v1/embeddings", json={"model": model, "input": [[101, 40000]]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
    assert server.http.post("/admin/models/unload", json={"model_id": model}).status_code == 200
