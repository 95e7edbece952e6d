"""The HTTP layer over in-process engines: FastAPI's TestClient, no Ray.

serve.api's routes call each model through serve.engine_client's
EngineClient; here that is InProcessEngineClient around a serve.engine
Engine, so status codes, error bodies, headers and answers are checked
without a cluster. RayEngineClient's deadline is checked with a handle
that never finds a replica.
"""
from __future__ import annotations

import asyncio
import json

import pytest
import torch
from conftest_serve import LOGIT_TOL, document

from serve.config import ModelSpec, SessionConfig
from serve.engine import load_engine
from serve.engine_client import (
    EngineClient,
    InProcessEngineClient,
    RayEngineClient,
    Reply,
)
from serve.errors import Unavailable
from serve.store import MemorySessionStore

pytest_plugins = ["conftest_serve"]

PAGE_TOKENS = 64


def vec(labels, logits: dict) -> torch.Tensor:
    return torch.tensor([logits[k] for k in labels], dtype=torch.float64)


def reference(engine, pages: list[str]) -> torch.Tensor:
    ids = [i for p in pages for i in engine.tokenizer.encode(p, add_special_tokens=False).ids]
    with torch.no_grad():
        return engine.model(torch.tensor([ids]))[0].double()


class DownClient(InProcessEngineClient):
    """A model whose deployment has no replica: what RayEngineClient raises then."""

    async def info(self) -> Reply:
        return Reply({**self.engine.info(), "name": "down"}, self.replica)

    async def classify(self, text, pages) -> Reply:
        raise Unavailable("model 'down' has no replica taking requests", retry_after_s=2.0)


@pytest.fixture(scope="module")
def api(dev_models):
    """(TestClient, engines by name) over bsbr, standard and a model that is down."""
    from fastapi.testclient import TestClient

    from serve.api import app, local_app

    engines = {
        name: load_engine(name, ModelSpec(name=name, path=str(dev_models / name), page_tokens=PAGE_TOKENS,
                                          max_tokens=3000 if name == "standard" else None),
                          SessionConfig(), MemorySessionStore())
        for name in ("bsbr", "standard")
    }
    clients: dict[str, EngineClient] = {n: InProcessEngineClient(e, replica=f"in-process-{n}") for n, e in engines.items()}
    clients["down"] = DownClient(engines["bsbr"])
    local_app(clients, {"sessions": {"store": "memory"}, "http": {"max_body_bytes": 1 << 20}})
    try:
        with TestClient(app) as c:  # one event loop for the module: the engines' batchers live on it
            yield c, engines
    finally:
        app.dependency_overrides.clear()


def test_the_clients_are_engine_clients():
    assert issubclass(InProcessEngineClient, EngineClient) and issubclass(RayEngineClient, EngineClient)


def test_classify_session_and_stream_give_the_parallel_forms_answer(api):
    c, engines = api
    pages = document(30, words_per_page=8, seed=3)
    ref, labels = reference(engines["bsbr"], pages), engines["bsbr"].labels
    one = c.post("/v1/classify", json={"model": "bsbr", "pages": pages})
    assert one.status_code == 200, one.text
    assert one.headers["x-bsbr-replica"] == "in-process-bsbr"
    body = one.json()
    assert (vec(labels, body["logits"]) - ref).abs().max() <= LOGIT_TOL
    assert body["num_pages"] == 30 and len(body["timing"]["per_page_ms"]) == 30

    created = c.post("/v1/sessions", json={"model": "bsbr"})
    assert created.status_code == 201
    sid = created.json()["session_id"]
    for i, p in enumerate(pages):
        r = c.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [p]})
        assert r.status_code == 200, r.text
    assert (vec(labels, r.json()["logits"]) - ref).abs().max() <= LOGIT_TOL
    again = c.post(f"/v1/sessions/{sid}/pages", json={"seq": 29, "pages": [pages[29]]})
    assert again.json() == r.json()  # a repeated seq: the stored answer
    assert c.get(f"/v1/sessions/{sid}").json()["logits"] == r.json()["logits"]
    final = c.delete(f"/v1/sessions/{sid}").json()
    assert final["final"] is True and final["num_pages"] == 30

    ndjson = "".join(json.dumps({"text": p}) + "\n" for p in pages)
    s = c.post("/v1/classify/stream?model=bsbr", content=ndjson, headers={"content-type": "application/x-ndjson"})
    lines = [json.loads(x) for x in s.text.splitlines() if x.strip()]
    assert len(lines) == 31 and lines[-1]["final"] is True
    assert (vec(labels, lines[-1]["logits"]) - ref).abs().max() <= LOGIT_TOL


@pytest.mark.parametrize("method,path,body,status,code", [
    ("post", "/v1/classify", {"model": "nope", "text": "x"}, 404, "unknown_model"),
    ("post", "/v1/classify", {"model": "bsbr", "text": ""}, 422, "empty_document"),
    ("post", "/v1/classify", {"model": "bsbr"}, 422, "validation_error"),
    ("post", "/v1/sessions", {"model": "nope"}, 404, "unknown_model"),
    ("post", f"/v1/sessions/{'0' * 32}/pages", {"seq": 0, "text": "x"}, 404, "session_not_found"),
    ("get", "/v1/sessions/not-an-id", None, 404, "session_not_found"),
    ("put", "/v1/classify", {}, 405, "method_not_allowed"),
])
def test_errors_are_mapped_in_one_place(api, method, path, body, status, code):
    c, _ = api
    r = c.request(method, path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_a_seq_gap_is_409_and_too_many_tokens_is_413(api):
    c, _ = api
    sid = c.post("/v1/sessions", json={"model": "standard"}).json()["session_id"]
    assert c.post(f"/v1/sessions/{sid}/pages", json={"seq": 3, "text": "x"}).json()["error"]["code"] == "seq_gap"
    r = c.post("/v1/classify", json={"model": "standard", "pages": document(60, words_per_page=40, seed=11)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_tokens"
    c.delete(f"/v1/sessions/{sid}")


def test_a_model_with_no_replica_is_503_with_retry_after(api):
    c, _ = api
    r = c.post("/v1/classify", json={"model": "down", "text": "anyone?"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    assert int(r.headers["retry-after"]) >= 1
    assert c.post("/v1/classify", json={"model": "bsbr", "text": "still here"}).status_code == 200


def test_models_and_readiness(api):
    c, _ = api
    names = [m["name"] for m in c.get("/v1/models").json()["models"]]
    assert names == ["bsbr", "standard", "down"]
    assert c.get("/readyz").status_code == 200 and c.get("/healthz").json() == {"status": "ok"}


# --- RayEngineClient's deadline, with a handle that never gets a replica -------------------------


class _NeverAssigned:
    """A DeploymentResponse whose request no replica takes (Serve's router waits)."""

    def __init__(self):
        self.cancelled = False

    async def _fetch_future_result_async(self):
        await asyncio.Event().wait()

    def cancel(self):
        self.cancelled = True

    def __await__(self):
        raise AssertionError("awaited a response that was never assigned")


class _Handle:
    def __init__(self):
        self.sent: list[_NeverAssigned] = []

    def __getattr__(self, method):
        return self

    def options(self, **kw):
        return self

    def remote(self, *args):
        self.sent.append(_NeverAssigned())
        return self.sent[-1]


def test_no_replica_within_replica_timeout_is_unavailable_and_the_request_is_cancelled():
    import time

    handle = _Handle()
    client = RayEngineClient("bsbr", handle, replica_timeout_s=0.3, retry_s=30)
    t0 = time.perf_counter()
    with pytest.raises(Unavailable) as e:
        asyncio.run(client.append("a" * 32, 0, "text", None))
    took = time.perf_counter() - t0
    assert 0.3 <= took < 5 and e.value.status == 503 and e.value.retry_after_header == "2"
    assert len(handle.sent) == 1 and handle.sent[0].cancelled  # not retried: 503 now, the client retries
