"""The HTTP API of docs/architecture.md 3 on a real Ray Serve application (127.0.0.1)."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
from conftest_serve import (
    LOGIT_TOL,
    MAX_BODY_BYTES,
    MAX_SESSIONS,
    PAGE_TOKENS,
    STANDARD_MAX_TOKENS,
    app_args,
    document,
)

pytest_plugins = ["conftest_serve"]
pytestmark = pytest.mark.slow


def reference_logits(models, name: str, pages: list[str]) -> torch.Tensor:
    """One-shot logits of the model's parallel form, computed in this process."""
    from bsbr_core import load_model

    model, tok = load_model(models / name)
    ids = [i for p in pages for i in tok.encode(p, add_special_tokens=False).ids]
    with torch.no_grad():
        out = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
    return out.double(), list(model.config.labels)


def vec(labels, logits: dict) -> torch.Tensor:
    return torch.tensor([logits[k] for k in labels], dtype=torch.float64)


def assert_error(r, status: int, code: str | None = None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"code", "message"} and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body


def new_session(client, model="bsbr", **extra) -> str:
    r = client.post("/v1/sessions", json={"model": model, **extra})
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


# --- health and models ----------------------------------------------------------------------


def test_health_ready_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["models"] == {"bsbr": True, "standard": True}
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"bsbr", "standard"}
    for m in models.values():
        assert {"name", "arch", "labels", "chunk_size", "max_tokens", "page_tokens"} <= set(m)
        assert m["trained"] is False and m["page_tokens"] == PAGE_TOKENS
    assert models["standard"]["max_tokens"] == STANDARD_MAX_TOKENS < models["bsbr"]["max_tokens"]
    assert models["bsbr"]["arch"] == "bsbr" and models["standard"]["arch"] == "standard"


def test_openapi_and_docs(client):
    spec = client.get("/openapi.json").json()
    for path in ("/healthz", "/readyz", "/v1/models", "/v1/classify", "/v1/sessions",
                 "/v1/sessions/{session_id}/pages", "/v1/sessions/{session_id}", "/v1/classify/stream"):
        assert path in spec["paths"], path
    assert "delete" in spec["paths"]["/v1/sessions/{session_id}"]
    assert "application/x-ndjson" in spec["paths"]["/v1/classify/stream"]["post"]["requestBody"]["content"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# --- classify -----------------------------------------------------------------------------------


def test_classify_text_pages_and_form_feeds(client, serve_cluster):
    pages = document(4)
    a = client.post("/v1/classify", json={"model": "bsbr", "pages": pages})
    b = client.post("/v1/classify", json={"model": "bsbr", "text": "\f".join(pages) + "\f"})
    assert a.status_code == b.status_code == 200
    a, b = a.json(), b.json()
    assert a["num_pages"] == b["num_pages"] == 4 and a["num_tokens"] == b["num_tokens"]
    assert a["logits"] == pytest.approx(b["logits"], abs=1e-5)
    assert a["label"] in a["scores"] and sum(a["scores"].values()) == pytest.approx(1.0)
    assert len(a["timing"]["per_page_ms"]) == 4 and a["timing"]["total_ms"] > 0
    assert a["state_bytes"] > 0 and a["peak_memory_bytes"] > 0 and a["model"] == "bsbr"
    # Text without form feeds is cut into pages of page_tokens tokens.
    plain = client.post("/v1/classify", json={"model": "bsbr", "text": " ".join(pages)}).json()
    assert plain["num_pages"] == -(-plain["num_tokens"] // PAGE_TOKENS)


@pytest.mark.parametrize("model", ["bsbr", "standard"])
def test_fifty_page_session_and_stream_give_the_one_shot_answer(client, serve_cluster, model):
    pages = document(50, words_per_page=8, seed=7)  # fits the standard model's limit
    ref, labels = reference_logits(serve_cluster["models"], model, pages)
    one = client.post("/v1/classify", json={"model": model, "pages": pages}).json()
    assert (vec(labels, one["logits"]) - ref).abs().max() <= LOGIT_TOL

    sid = new_session(client, model)
    for i, p in enumerate(pages):
        r = client.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [p]})
        assert r.status_code == 200, r.text
    last = r.json()
    assert last["seq"] == 49 and last["num_pages"] == 50 and last["num_tokens"] == one["num_tokens"]
    assert (vec(labels, last["logits"]) - ref).abs().max() <= LOGIT_TOL
    final = client.delete(f"/v1/sessions/{sid}").json()
    assert final["final"] is True and final["logits"] == last["logits"]

    body = "".join(json.dumps({"text": p}) + "\n" for p in pages).encode()

    def chunked():  # a generator body goes out with Transfer-Encoding: chunked
        for k in range(0, len(body), 1000):
            yield body[k : k + 1000]

    with client.stream("POST", f"/v1/classify/stream?model={model}", content=chunked(),
                       headers={"content-type": "application/x-ndjson"}) as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(x) for x in s.iter_lines() if x.strip()]
    assert len(lines) == 51 and [x["seq"] for x in lines[:50]] == list(range(50))
    assert lines[-1]["final"] is True and not any(x["final"] for x in lines[:-1])
    assert (vec(labels, lines[-1]["logits"]) - ref).abs().max() <= LOGIT_TOL
    assert lines[-1]["num_pages"] == 50


# --- sessions -----------------------------------------------------------------------------------


def test_session_lifecycle(client):
    r = client.post("/v1/sessions", json={"model": "bsbr"})
    assert r.status_code == 201
    created = r.json()
    sid = created["session_id"]
    assert len(sid) == 32 and int(sid, 16) >= 0 and created["expires_in_s"] > 0 and created["model"] == "bsbr"
    empty = client.get(f"/v1/sessions/{sid}").json()
    assert empty["seq"] is None and empty["num_tokens"] == 0 and empty["label"] is None
    pages = document(3, seed=3)
    r0 = client.post(f"/v1/sessions/{sid}/pages", json={"seq": 0, "pages": pages[:1]}).json()
    r1 = client.post(f"/v1/sessions/{sid}/pages", json={"seq": 1, "text": "\f".join(pages[1:])}).json()
    assert r1["num_pages"] == 3 and r1["num_tokens"] > r0["num_tokens"] and len(r1["timing"]["page_ms"]) == 2
    assert {"session_id", "seq", "num_tokens", "num_pages", "label", "scores", "timing", "state_bytes"} <= set(r1)
    now = client.get(f"/v1/sessions/{sid}").json()
    assert now["seq"] == 1 and now["logits"] == r1["logits"]
    final = client.delete(f"/v1/sessions/{sid}").json()
    assert final["final"] is True and final["num_pages"] == 3
    assert_error(client.get(f"/v1/sessions/{sid}"), 404, "session_not_found")
    assert_error(client.delete(f"/v1/sessions/{sid}"), 404, "session_not_found")


def test_seq_is_idempotent_and_a_gap_is_409(client):
    sid = new_session(client)
    pages = document(3, seed=4)
    r0 = client.post(f"/v1/sessions/{sid}/pages", json={"seq": 0, "pages": [pages[0]]}).json()
    again = client.post(f"/v1/sessions/{sid}/pages", json={"seq": 0, "pages": [pages[0]]})
    assert again.status_code == 200 and again.json() == r0  # not applied twice
    assert_error(client.post(f"/v1/sessions/{sid}/pages", json={"seq": 2, "text": pages[1]}), 409, "seq_gap")
    r1 = client.post(f"/v1/sessions/{sid}/pages", json={"seq": 1, "pages": [pages[1]]}).json()
    assert r1["num_pages"] == 2 and r1["num_tokens"] > r0["num_tokens"]
    client.delete(f"/v1/sessions/{sid}")


def test_session_pages_stick_to_one_replica(client):
    """16 sessions over 2 bsbr replicas: every page of a session lands on one replica."""
    seen: dict[str, set[str]] = {}
    sids = [new_session(client) for _ in range(16)]
    for seq in range(3):
        for sid in sids:
            r = client.post(f"/v1/sessions/{sid}/pages", json={"seq": seq, "text": f"page {seq} of {sid}"})
            assert r.status_code == 200
            seen.setdefault(sid, set()).add(r.headers["x-bsbr-replica"])
    assert all(len(v) == 1 for v in seen.values()), seen
    assert len(set().union(*seen.values())) == 2  # and sessions spread over both
    for sid in sids:
        client.delete(f"/v1/sessions/{sid}")


def test_idle_sessions_expire(client):
    sid = new_session(client, ttl_s=1.0)
    assert client.post(f"/v1/sessions/{sid}/pages", json={"seq": 0, "text": "a first page"}).status_code == 200
    time.sleep(2.5)
    assert_error(client.post(f"/v1/sessions/{sid}/pages", json={"seq": 1, "text": "late"}), 404, "session_not_found")
    assert_error(client.get(f"/v1/sessions/{sid}"), 404, "session_not_found")


# --- bad input ------------------------------------------------------------------------------------


BAD_CLASSIFY = [
    (b"{not json", 400, "invalid_json"),
    (b"", 400, "invalid_json"),
    (b"\xff\xfe\x00garbage", 400, None),
    ('{"model": "bsbr", "text": "caf\xe9"}'.encode("latin-1"), 400, None),  # not UTF-8
    (b'[1, 2, 3]', 422, "validation_error"),
    (b'{"model": "bsbr", "text": 5}', 422, "validation_error"),
    (b'{"model": "bsbr", "pages": "not a list"}', 422, "validation_error"),
    (b'{"model": "bsbr", "pages": ["a", 7]}', 422, "validation_error"),
    (b'{"model": "bsbr"}', 422, "validation_error"),
    (b'{"model": "bsbr", "text": "a", "pages": ["b"]}', 422, "validation_error"),
    (b'{"model": "bsbr", "pages": []}', 422, "validation_error"),
    (b'{"model": "bsbr", "text": "x", "extra": 1}', 422, "validation_error"),
    (b'{"model": 7, "text": "x"}', 422, "validation_error"),
    (b'{"model": "bsbr", "text": ""}', 422, "empty_document"),
    (b'{"model": "bsbr", "text": "   \\n\\t  "}', 422, "empty_document"),
    (b'{"model": "bsbr", "pages": [" ", "\\f"]}', 422, "empty_document"),
    (b'{"model": "bsbr", "text": "bad \\ud800 surrogate"}', 400, "invalid_encoding"),
    (b'{"model": "no-such-model", "text": "x"}', 404, "unknown_model"),
]


@pytest.mark.parametrize("body,status,code", BAD_CLASSIFY)
def test_bad_classify_requests(client, body, status, code):
    r = client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    assert_error(r, status, code)


def test_bad_session_requests_leave_other_sessions_alone(client):
    sid = new_session(client)
    page = document(1, seed=9)[0]
    good = client.post(f"/v1/sessions/{sid}/pages", json={"seq": 0, "pages": [page]}).json()
    unknown = "0" * 32
    cases = [
        (client.post("/v1/sessions", json={"model": "nope"}), 404, "unknown_model"),
        (client.post("/v1/sessions", json={}), 422, "validation_error"),
        (client.post("/v1/sessions", json={"model": "bsbr", "ttl_s": -1}), 422, "validation_error"),
        (client.post(f"/v1/sessions/{unknown}/pages", json={"seq": 0, "text": "x"}), 404, "session_not_found"),
        (client.post("/v1/sessions/not-an-id/pages", json={"seq": 0, "text": "x"}), 404, "session_not_found"),
        (client.get(f"/v1/sessions/{unknown}"), 404, "session_not_found"),
        (client.delete("/v1/sessions/../../etc"), 404, None),
        (client.post(f"/v1/sessions/{sid}/pages", json={"seq": -1, "text": "x"}), 422, "validation_error"),
        (client.post(f"/v1/sessions/{sid}/pages", json={"seq": "1", "text": "x"}), 422, "validation_error"),
        (client.post(f"/v1/sessions/{sid}/pages", json={"seq": 1.5, "text": "x"}), 422, "validation_error"),
        (client.post(f"/v1/sessions/{sid}/pages", json={"seq": 1, "text": "  "}), 422, "empty_document"),
        (client.post(f"/v1/sessions/{sid}/pages", json={"seq": 1}), 422, "validation_error"),
        (client.post(f"/v1/sessions/{sid}/pages", content=b"\xc3\x28", headers={"content-type": "application/json"}),
         400, None),
        (client.post(f"/v1/sessions/{sid}/pages", json={"seq": 5, "text": "x"}), 409, "seq_gap"),
        (client.get("/v1/nothing-here"), 404, "not_found"),
        (client.put("/v1/classify", json={}), 405, "method_not_allowed"),
    ]
    for r, status, code in cases:
        assert_error(r, status, code)
    now = client.get(f"/v1/sessions/{sid}").json()
    assert now["seq"] == 0 and now["logits"] == good["logits"]
    nxt = client.post(f"/v1/sessions/{sid}/pages", json={"seq": 1, "pages": [page]})
    assert nxt.status_code == 200 and nxt.json()["num_pages"] == 2
    assert client.get("/readyz").status_code == 200
    client.delete(f"/v1/sessions/{sid}")


def test_documents_over_max_tokens_are_413_standard_first(client):
    pages = document(60, words_per_page=40, seed=11)  # more tokens than the standard limit
    r = client.post("/v1/classify", json={"model": "standard", "pages": pages})
    assert_error(r, 413, "too_many_tokens")
    assert client.post("/v1/classify", json={"model": "bsbr", "pages": pages}).status_code == 200
    # In a session the page that crosses the limit is refused; the session stays usable.
    sid = new_session(client, "standard")
    applied, seq = 0, 0
    for p in pages:
        r = client.post(f"/v1/sessions/{sid}/pages", json={"seq": seq, "pages": [p]})
        if r.status_code == 413:
            break
        assert r.status_code == 200
        applied, seq = r.json()["num_tokens"], seq + 1
    assert_error(r, 413, "too_many_tokens")
    now = client.get(f"/v1/sessions/{sid}").json()
    assert now["num_tokens"] == applied <= STANDARD_MAX_TOKENS and now["seq"] == seq - 1
    client.delete(f"/v1/sessions/{sid}")


def test_bodies_over_the_byte_limit_are_413(client):
    big = {"model": "bsbr", "text": "word " * (MAX_BODY_BYTES // 5 + 10)}
    assert_error(client.post("/v1/classify", json=big), 413, "body_too_large")

    def chunks():  # no Content-Length: the limit is enforced on the bytes received
        data = json.dumps(big).encode()
        for k in range(0, len(data), 65536):
            yield data[k : k + 65536]

    r = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "body_too_large")
    assert client.get("/readyz").status_code == 200


def test_too_many_sessions_is_429_with_retry_after(client):
    made = []
    try:
        for _ in range(MAX_SESSIONS + 5):
            r = client.post("/v1/sessions", json={"model": "bsbr"})
            if r.status_code != 201:
                break
            made.append(r.json()["session_id"])
        assert_error(r, 429, "too_many_sessions")
        assert int(r.headers["retry-after"]) >= 1
    finally:
        for sid in made:
            client.delete(f"/v1/sessions/{sid}")
    assert client.post("/v1/sessions", json={"model": "bsbr"}).status_code == 201


def test_bad_streams(client):
    def post(body: bytes, model="bsbr"):
        return client.post(f"/v1/classify/stream?model={model}", content=body,
                           headers={"content-type": "application/x-ndjson"})

    assert_error(post(b""), 422, "empty_document")
    assert_error(post(b"\n\n"), 422, "empty_document")
    assert_error(post(b'{"text": "x"}\n', model="nope"), 404, "unknown_model")
    assert_error(client.post("/v1/classify/stream", content=b'{"text": "x"}\n'), 422, "validation_error")
    assert_error(post(b"not json\n"), 400, "invalid_json")
    assert_error(post(b'{"txt": "x"}\n'), 422, "validation_error")
    assert_error(post(b'{"text": "  "}\n'), 422, "empty_document")
    assert_error(post(b'\xff\xff\n'), 400, "invalid_encoding")
    # A bad line after the first page ends the stream with one error line.
    r = post(b'{"text": "a good first page"}\n{"text": 12}\n{"text": "never read"}\n')
    assert r.status_code == 200
    lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
    assert lines[0]["seq"] == 0 and lines[-1]["error"]["code"] == "validation_error" and len(lines) == 2
    # A final line without a newline still counts.
    r = post(b'{"text": "one page"}\n{"text": "two pages"}')
    lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
    assert lines[-1]["final"] is True and lines[-1]["num_pages"] == 2


def test_stream_answers_each_page_before_the_next_is_sent(serve_cluster):
    """Full duplex: the result of page i arrives while the request body is still open."""
    import socket

    with socket.create_connection(("127.0.0.1", serve_cluster["http_port"]), timeout=60) as s:
        s.sendall(b"POST /v1/classify/stream?model=bsbr HTTP/1.1\r\nHost: test\r\n"
                  b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")

        def send_chunk(data: bytes) -> None:
            s.sendall(b"%x\r\n" % len(data) + data + b"\r\n")

        received = b""
        for i in range(3):
            send_chunk(json.dumps({"text": f"page {i} of an interactive stream"}).encode() + b"\n")
            while b'"seq":%d' % i not in received:
                data = s.recv(65536)  # times out (fails) if the answer waits for the whole body
                assert data, "connection closed early"
                received += data
        send_chunk(b"")
        while b'"final":true' not in received:
            data = s.recv(65536)
            assert data
            received += data


# --- limits, readiness and resumes, on a second application ---------------------------------------
#
# What the shared application must not have: bsbr with one replica that takes
# one request at a time and queues one more (max_queued_requests), no hot
# cache (hot_max_bytes 0: every page after a session's first resumes from the
# store), a store actor of its own, and a model `pending` whose replica no node
# can place (a resource none has), so that it is never ready: /readyz says so,
# and a request naming `pending` is 503 unavailable once no replica has taken it
# within http.replica_timeout_s (Serve's router alone would wait for ever).
# Under /limits on the shared cluster; deleted, and its store actor killed,
# after the module.

LIMITS_APP = "bsbr-limits"
# Long enough for bsbr's one queued request behind its one running request (the burst test).
LIMITS_REPLICA_TIMEOUT_S = 8.0
NEVER_RESOURCE = "bsbr_test_no_node_has_this"


@pytest.fixture(scope="module")
def limits(serve_cluster):
    """(client of /limits, its store actor's name)."""
    import httpx
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.store import RayActorSessionStore

    models = serve_cluster["models"]
    store_name = f"limits_store_{os.getpid()}"
    args = app_args(models, store_name)
    args["models"] = [
        {"name": "bsbr", "path": str(models / "bsbr"), "num_replicas": 1, "page_tokens": PAGE_TOKENS,
         "ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 1, "max_queued_requests": 1},
        {"name": "pending", "path": str(models / "standard"), "num_replicas": 1,
         "ray_actor_options": {"num_cpus": 0.25, "resources": {NEVER_RESOURCE: 1}}},
    ]
    args["sessions"]["hot_max_bytes"] = 0
    args["http"].update(ready_timeout_s=1.0, replica_timeout_s=LIMITS_REPLICA_TIMEOUT_S)
    # Not waiting for the application to run: `pending` never does.
    serve.run_many([serve.RunTarget(build_app(args), name=LIMITS_APP, route_prefix="/limits")],
                   wait_for_applications_running=False)
    try:
        with httpx.Client(base_url=serve_cluster["url"] + "/limits", timeout=120) as c:
            deadline = time.time() + 120
            while True:  # the ingress and bsbr answer (pending never will)
                try:
                    r = c.post("/v1/classify", json={"model": "bsbr", "text": "is anyone there"}, timeout=10)
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.time() < deadline, "the limits application never answered"
                time.sleep(0.5)
            yield c, store_name
    finally:
        # Not waiting either: Serve gives the replica it never placed its whole
        # graceful-shutdown timeout (20 s); the controller finishes without us.
        serve.delete(LIMITS_APP, _blocking=False)
        try:
            ray.kill(ray.get_actor(store_name, namespace=RayActorSessionStore.NAMESPACE), no_restart=True)
        except ValueError:  # never made, or already gone
            pass


def test_a_model_that_is_not_ready_makes_readyz_503_with_retry_after(limits):
    c, _ = limits
    r = c.get("/readyz")
    assert_error(r, 503, "not_ready")
    assert r.json()["models"] == {"bsbr": True, "pending": False}
    assert int(r.headers["retry-after"]) >= 1
    assert c.get("/healthz").status_code == 200  # alive, only not ready


def test_a_model_with_no_running_replica_is_503_unavailable_with_retry_after_not_a_hang(limits):
    """`pending` has no replica: its requests answer 503 after http.replica_timeout_s
    (a classify, a new session), and the model that runs still answers."""
    c, _ = limits
    for path, body in (("/v1/classify", {"model": "pending", "text": "is anyone there"}),
                       ("/v1/sessions", {"model": "pending"})):
        t0 = time.perf_counter()
        r = c.post(path, json=body, timeout=60)
        took = time.perf_counter() - t0
        assert_error(r, 503, "unavailable")
        assert int(r.headers["retry-after"]) >= 1
        assert LIMITS_REPLICA_TIMEOUT_S <= took < LIMITS_REPLICA_TIMEOUT_S + 20, took
    assert c.post("/v1/classify", json={"model": "bsbr", "text": "still here"}).status_code == 200


def test_a_call_slower_than_replica_timeout_s_is_answered_not_cut_off(serve_cluster):
    """http.replica_timeout_s bounds the wait for a replica to take a call, not
    the call: a replica that takes 4x that long still answers. Under Serve's
    gRPC transport (RAY_SERVE_USE_GRPC_BY_DEFAULT=1, which RAY_ENV_DEFAULTS sets
    off) a response counted as assigned only once the replica had answered, so
    this deadline cut such calls off as 503 unavailable: this test fails there.
    The call is made from a replica, as the ingress makes it, with the
    cluster's Ray settings."""
    from ray import serve

    timeout_s, slow_s = 0.5, 2.0

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Slow:
        async def classify(self, text, pages):
            import asyncio

            await asyncio.sleep(float(text))
            return {"result": {"slept_s": float(text)}, "replica": "slow"}

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Caller:
        def __init__(self, slow):
            from serve.engine_client import RayEngineClient

            self.client = RayEngineClient("slow", slow, replica_timeout_s=timeout_s, retry_s=5)

        async def __call__(self, seconds: float) -> dict:
            import time as _time

            from serve.errors import ServeError

            t0 = _time.perf_counter()
            try:
                reply = await self.client.classify(str(seconds), None)
            except ServeError as e:
                return {"error": f"{e.status} {e.code}: {e}", "took_s": _time.perf_counter() - t0}
            return {**reply.result, "took_s": _time.perf_counter() - t0}

    handle = serve.run(Caller.bind(Slow.bind()), name="slow-call", route_prefix=None)
    try:
        out = handle.remote(slow_s).result(timeout_s=60)
    finally:
        serve.delete("slow-call", _blocking=False)
    assert "error" not in out, out
    assert out["slept_s"] == slow_s and slow_s <= out["took_s"] < slow_s + 20, out


def _counter(text: str, name: str, **labels: str) -> dict[str, float]:
    """Values of the series `name` with these labels, by their `source` label."""
    import re

    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            out[have.get("source", "")] = out.get(have.get("source", ""), 0.0) + float(m.group(2))
    return out


def test_pages_resumed_from_the_store_give_the_one_shot_answer_and_are_counted(limits, serve_cluster):
    """No hot copy is kept here, so each page after the first is read from the
    store's checkpoint chain: the answers stay the one-shot answer, and
    bsbr_session_resumes_total{source="store"} counts every one (and "hot" none)."""
    import httpx

    c, _ = limits
    pages = document(6, words_per_page=12, seed=41)
    ref, labels = reference_logits(serve_cluster["models"], "bsbr", pages)
    sid = new_session(c)
    replicas = set()
    for i, p in enumerate(pages):
        r = c.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [p]})
        assert r.status_code == 200, r.text
        replicas.add(r.headers["x-bsbr-replica"])
    assert len(replicas) == 1  # one replica: not a move to another, a resume from the store
    assert r.json()["num_pages"] == 6
    assert (vec(labels, r.json()["logits"]) - ref).abs().max() <= LOGIT_TOL
    assert c.delete(f"/v1/sessions/{sid}").status_code == 200

    deadline = time.time() + 60  # Ray exports a replica's counters every few seconds
    while True:
        text = httpx.get(f"http://127.0.0.1:{serve_cluster['metrics_port']}/metrics", timeout=10).text
        resumes = _counter(text, "ray_bsbr_session_resumes_total", application=LIMITS_APP, model="bsbr")
        if resumes.get("store", 0) >= 5 or time.time() > deadline:
            break
        time.sleep(1)
    assert resumes.get("store") == 5 and resumes.get("hot", 0) == 0, resumes


def test_a_burst_past_max_queued_requests_is_429_overloaded_with_retry_after(limits):
    """bsbr here reads one document at a time and queues one more: of a burst of
    8 at once, the rest are refused at once (429 overloaded), not queued or 500."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    c, _ = limits
    pages = document(60, words_per_page=20, seed=42)  # long enough that the burst arrives while one is read
    n = 8
    start = threading.Barrier(n)

    def one(_):
        with httpx.Client(base_url=c.base_url, timeout=120) as ci:
            start.wait()
            return ci.post("/v1/classify", json={"model": "bsbr", "pages": pages})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as ex:
        answers = list(ex.map(one, range(n)))
    took = time.perf_counter() - t0
    served = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert served and refused, ([r.status_code for r in answers], took)
    for r in refused:
        assert_error(r, 429, "overloaded")
        assert int(r.headers["retry-after"]) >= 1
    assert all(r.json()["logits"] == served[0].json()["logits"] for r in served)
    assert c.post("/v1/classify", json={"model": "bsbr", "pages": pages[:2]}).status_code == 200  # and it recovers


def test_losing_the_store_actor_is_503_store_unavailable_not_500(limits):
    """The default store is an actor: killed, a session request answers 503
    store_unavailable with Retry-After; the next call makes a new, empty
    actor, which knows none of the old sessions (404), and takes new ones."""
    import ray

    from serve.store import RayActorSessionStore

    c, store_name = limits
    sid = new_session(c)
    assert c.post(f"/v1/sessions/{sid}/pages", json={"seq": 0, "text": "before"}).status_code == 200
    actor = ray.get_actor(store_name, namespace=RayActorSessionStore.NAMESPACE)
    ray.kill(actor, no_restart=True)
    deadline = time.time() + 30
    while True:  # until Ray reports it dead, so the replica's next call cannot reach it
        try:
            ray.get(actor.ping.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            break
        assert time.time() < deadline, "the store actor outlived ray.kill"
        time.sleep(0.2)

    r = c.post(f"/v1/sessions/{sid}/pages", json={"seq": 1, "text": "after"})
    assert_error(r, 503, "store_unavailable")
    assert int(r.headers["retry-after"]) >= 1
    assert_error(c.post(f"/v1/sessions/{sid}/pages", json={"seq": 1, "text": "after"}), 404, "session_not_found")
    fresh = new_session(c)
    assert c.post(f"/v1/sessions/{fresh}/pages", json={"seq": 0, "text": "anew"}).status_code == 200
    assert c.delete(f"/v1/sessions/{fresh}").status_code == 200
