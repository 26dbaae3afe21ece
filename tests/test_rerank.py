"""/v1/rerank against a live server: MiniLM as a bi-encoder (cosine
similarity) ranks the relevant document first in 10 sets; a cross-encoder
built from MiniLM's real config with random weights loads in its own MLX
worker, and scores deterministically, equal to an independent numpy forward
pass, across two loads; bad input is refused by name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from tests.conftest import MODEL_ID, LMXServer, running_server
from tests.encoder_fixtures import minilm_dir, numpy_cross_encoder_scores, random_cross_encoder

pytestmark = pytest.mark.timeout(150)

MINILM = "all-MiniLM-L6-v2"
CROSS = "random-cross-encoder"

# (query, relevant document, distractors): the relevant one must rank first.
SETS: list[tuple[str, str, list[str]]] = [
    ("What is the capital of France?", "Paris is the capital and largest city of France.",
     ["Berlin is famous for its techno clubs.", "The Loire is the longest river in France.",
      "Bananas grow in tropical climates."]),
    ("How do plants make food?",
     "Plants make their food by photosynthesis, turning sunlight, water and CO2 into sugar.",
     ["Cats sleep for most of the day.", "The stock market fell sharply on Monday.",
      "Roots anchor a tree in the ground."]),
    ("How do I reset my password?",
     "To reset your password, click 'Forgot password' on the login page and follow the email.",
     ["Our office is closed on public holidays.", "Passwords should be long and unique.",
      "The weather tomorrow will be sunny."]),
    ("Who wrote Romeo and Juliet?",
     "Romeo and Juliet is a tragedy written by William Shakespeare.",
     ["Juliet is a common name in Italy.", "The Globe Theatre was rebuilt in 1997.",
      "Mozart composed over 600 works."]),
    ("What causes rain?",
     "Rain forms when water vapour in clouds condenses into droplets heavy enough to fall.",
     ["Umbrellas were invented in ancient China.", "Deserts get very little rain.",
      "The football match was cancelled."]),
    ("Which planet is closest to the sun?", "Mercury is the planet nearest to the Sun.",
     ["Mars is often called the red planet.", "The Sun is a medium-sized star.",
      "Saturn has beautiful rings."]),
    ("How many legs does a spider have?", "Spiders have eight legs.",
     ["Insects have six legs.", "Some spiders spin webs to catch prey.",
      "Octopuses have eight arms."]),
    ("What is the boiling point of water?",
     "At sea level, water boils at 100 degrees Celsius.",
     ["Ice floats because it is less dense than water.", "Tea tastes better with milk.",
      "The ocean covers most of the Earth."]),
    ("How to cook pasta", "Boil salted water, add the pasta and cook it for about ten minutes.",
     ["Pasta originated in Italy.", "Pizza is baked in a very hot oven.",
      "A balanced diet includes vegetables."]),
    ("Python list sorting", "Use sorted(my_list) or my_list.sort() to sort a list in Python.",
     ["Pythons are large snakes found in Africa and Asia.", "Java is a programming language.",
      "A shopping list helps you remember groceries."]),
]


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Two layers of MiniLM's architecture (the config's other numbers kept),
    random weights: enough to check the forward pass, fast to score twice."""
    target = tmp_path_factory.mktemp("cross") / CROSS
    weights = random_cross_encoder(minilm_dir(), target, seed=1234, layers=2)
    return target, weights


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[LMXServer]:
    # The cross-encoder is loaded by its path under the pytest temp dir.
    with running_server(tmp_path_factory, "rerank", links=[model_file, (MINILM, minilm_dir())],
                        models={"auto_load": [MODEL_ID, MINILM], "allowed_paths": [
                            str(tmp_path_factory.getbasetemp()), str(minilm_dir().parent)]},
                        wait_for=[MINILM, MODEL_ID], timeout=120) as srv:
        yield srv


def _rerank(server: LMXServer, **body: Any) -> dict[str, Any]:
    resp = server.http.post("/v1/rerank", json=body)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


@pytest.mark.parametrize(("query", "relevant", "others"), SETS, ids=[s[0] for s in SETS])
def test_bi_encoder_ranks_the_relevant_document_first(server: LMXServer, query: str,
                                                      relevant: str, others: list[str]) -> None:
    # The relevant document is not first in the list, so order alone cannot pass.
    documents = [others[0], relevant, *others[1:]]
    body = _rerank(server, model=MINILM, query=query, documents=documents)
    results = body["results"]
    assert body["model"] == MINILM
    assert results[0]["index"] == 1, results
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r["index"] for r in results) == list(range(len(documents)))
    assert all(-1.0 <= s <= 1.0 for s in scores)  # cosine similarities
    assert "document" not in results[0]
    assert body["usage"]["prompt_tokens"] > 0


def test_top_n_and_return_documents(server: LMXServer) -> None:
    query, relevant, others = SETS[0]
    documents: list[Any] = [{"text": others[0]}, {"text": relevant}, others[1], others[2]]
    full = _rerank(server, model=MINILM, query=query, documents=documents)
    top = _rerank(server, model=MINILM, query=query, documents=documents, top_n=2,
                  return_documents=True)
    assert len(top["results"]) == 2
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full["results"][:2]]
    texts = [d if isinstance(d, str) else d["text"] for d in documents]
    for r in top["results"]:
        assert r["document"] == {"text": texts[r["index"]]}
    # top_n above the number of documents returns them all.
    assert len(_rerank(server, model=MINILM, query=query, documents=texts,
                       top_n=50)["results"]) == 4


def test_cross_encoder(server: LMXServer, cross_encoder: tuple[Path, dict[str, Any]]) -> None:
    path, weights = cross_encoder
    loaded = server.load(str(path))
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["backend"] == "mlx_encoder"
    listed = {m["id"]: m for m in server.http.get("/v1/models").json()["data"]}[CROSS]
    assert listed["capabilities"] == ["rerank"]
    assert listed["rerank_mode"] == "cross-encoder"
    assert "embedding_dimensions" not in listed
    query, relevant, others = SETS[1]
    documents = [relevant, *others]
    first = _rerank(server, model=CROSS, query=query, documents=documents)
    again = _rerank(server, model=CROSS, query=query, documents=documents)
    assert first["results"] == again["results"]
    scores = {r["index"]: r["relevance_score"] for r in first["results"]}
    assert len(set(scores.values())) == len(documents)  # random weights still rank

    # Independent check: the same pairs through a numpy forward pass.
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    pairs = [(e.ids, e.type_ids) for e in tokenizer.encode_batch(
        [(query, doc) for doc in documents])]
    config = json.loads((path / "config.json").read_text())
    expected = numpy_cross_encoder_scores(weights, config, pairs)
    for i, want in enumerate(expected):
        assert abs(scores[i] - want) < 1e-4, (i, scores[i], want)

    # Stable across a reload: a new worker process gives the same scores.
    assert server.http.post("/admin/models/unload", json={"model_id": CROSS}).status_code == 200
    assert server.load(str(path)).status_code == 200
    reloaded = _rerank(server, model=CROSS, query=query, documents=documents)
    assert reloaded["results"] == first["results"]

    # A cross-encoder makes no embeddings.
    resp = server.http.post("/v1/embeddings", json={"model": CROSS, "input": "x"})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "model_lacks_capability"


DOCS = ["a", "b"]
BAD: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("empty documents", {"model": MINILM, "query": "q", "documents": []}, 400,
     "invalid_value", "documents"),
    ("missing documents", {"model": MINILM, "query": "q"}, 400,
     "missing_required_parameter", "documents"),
    ("documents not a list", {"model": MINILM, "query": "q", "documents": "a"}, 400,
     "invalid_type", "documents"),
    ("document of a wrong type", {"model": MINILM, "query": "q", "documents": ["a", 5]}, 400,
     "invalid_type", "documents[1]"),
    ("document object without text", {"model": MINILM, "query": "q",
                                      "documents": [{"title": "a"}]}, 400,
     "missing_required_parameter", "documents[0].text"),
    ("missing query", {"model": MINILM, "documents": DOCS}, 400,
     "missing_required_parameter", "query"),
    ("empty query", {"model": MINILM, "query": "", "documents": DOCS}, 400,
     "invalid_value", "query"),
    ("top_n zero", {"model": MINILM, "query": "q", "documents": DOCS, "top_n": 0}, 400,
     "invalid_value", "top_n"),
    ("top_n negative", {"model": MINILM, "query": "q", "documents": DOCS, "top_n": -3}, 400,
     "invalid_value", "top_n"),
    ("top_n wrong type", {"model": MINILM, "query": "q", "documents": DOCS, "top_n": "2"},
     400, "invalid_type", "top_n"),
    ("return_documents wrong type", {"model": MINILM, "query": "q", "documents": DOCS,
                                     "return_documents": "yes"}, 400, "invalid_type",
     "return_documents"),
    ("chat model", {"model": MODEL_ID, "query": "q", "documents": DOCS}, 400,
     "model_lacks_capability", "model"),
    ("unknown model", {"model": "nope", "query": "q", "documents": DOCS}, 404,
     "model-not-found", "model"),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
def test_bad_input(server: LMXServer, body: dict[str, Any], status: int, code: str,
                   param: str | None) -> None:
    resp = server.http.post("/v1/rerank", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert (error["code"], error["param"]) == (code, param), error
    assert error["message"]
