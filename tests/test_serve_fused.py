"""`topology: fused` on a real Ray Serve application: the ingress replicas hold the models.

A second application of the shared test cluster, at /fused, with two fused
replicas (each serving HTTP and holding both models) on the same kind of
session store (its own ray_actor store). It must answer what the split
topology answers: one-shot, session and stream equal to the in-process
one-shot logits, sessions that stick to one replica (the proxy's router
reads the session id from the request path), and a session that moves to
the other replica when its own is gone, resumed from the store.
"""
from __future__ import annotations

import os
import time

import pytest
from conftest_serve import LOGIT_TOL, app_args, document, wait_ready
from test_serve_http import assert_error, reference_logits, vec

pytest_plugins = ["conftest_serve"]
pytestmark = pytest.mark.slow

PREFIX = "/fused"


def _kill_store(name: str) -> None:
    """The application's own store actor (detached: it would outlive the app)."""
    import ray

    from serve.store import RayActorSessionStore

    try:
        ray.kill(ray.get_actor(name, namespace=RayActorSessionStore.NAMESPACE), no_restart=True)
    except ValueError:  # never made
        pass


@pytest.fixture(scope="module")
def fused(serve_cluster):
    import httpx
    from ray import serve

    from serve.app import build_app

    store_name = f"fused_store_{os.getpid()}"
    args = app_args(serve_cluster["models"], store_name)
    for m in args["models"]:
        m.pop("num_replicas", None)
    args["topology"] = "fused"
    args["ingress"] = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}
    serve.run(build_app(args), name="fused", route_prefix=PREFIX)
    url = serve_cluster["url"] + PREFIX
    if not wait_ready(url, 120):
        pytest.fail("the fused application never became ready")
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            yield c
    finally:
        serve.delete("fused")
        _kill_store(store_name)


def test_fused_app_is_one_deployment_holding_every_model(fused):
    from ray import serve

    status = serve.status().applications["fused"]
    assert set(status.deployments) == {"api"}
    assert {m["name"] for m in fused.get("/v1/models").json()["models"]} == {"bsbr", "standard"}
    assert fused.get("/readyz").status_code == 200


@pytest.mark.parametrize("model", ["bsbr", "standard"])
def test_fused_oneshot_session_and_stream_give_the_in_process_answer(fused, serve_cluster, model):
    import json

    pages = document(20, words_per_page=8, seed=11)
    ref, labels = reference_logits(serve_cluster["models"], model, pages)
    one = fused.post("/v1/classify", json={"model": model, "pages": pages})
    assert one.status_code == 200, one.text
    assert (vec(labels, one.json()["logits"]) - ref).abs().max() <= LOGIT_TOL

    sid = fused.post("/v1/sessions", json={"model": model}).json()["session_id"]
    for i, p in enumerate(pages):
        r = fused.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [p]})
        assert r.status_code == 200, r.text
    again = fused.post(f"/v1/sessions/{sid}/pages", json={"seq": 5, "pages": ["not applied twice"]})
    assert again.status_code == 200 and again.json()["seq"] == 5  # the stored answer of seq 5
    assert (vec(labels, r.json()["logits"]) - ref).abs().max() <= LOGIT_TOL
    assert_error(fused.post(f"/v1/sessions/{sid}/pages", json={"seq": 30, "text": "a gap"}), 409)
    final = fused.delete(f"/v1/sessions/{sid}").json()
    assert final["final"] is True and final["logits"] == r.json()["logits"]

    body = "".join(json.dumps({"text": p}) + "\n" for p in pages).encode()
    s = fused.post(f"/v1/classify/stream?model={model}", content=body,
                   headers={"content-type": "application/x-ndjson"})
    assert s.status_code == 200, s.text
    last = json.loads(s.text.strip().splitlines()[-1])
    assert last["final"] is True and (vec(labels, last["logits"]) - ref).abs().max() <= LOGIT_TOL


def test_fused_sessions_stick_to_one_replica_and_spread_over_both(fused):
    seen: dict[str, set[str]] = {}
    sids = [fused.post("/v1/sessions", json={"model": "bsbr"}).json()["session_id"] for _ in range(16)]
    for seq in range(3):
        for sid in sids:
            r = fused.post(f"/v1/sessions/{sid}/pages", json={"seq": seq, "text": f"page {seq} of {sid}"})
            assert r.status_code == 200, r.text
            seen.setdefault(sid, set()).add(r.headers["x-bsbr-replica"])
    assert all(len(v) == 1 for v in seen.values()), seen
    assert len(set().union(*seen.values())) == 2
    for sid in sids:
        assert fused.get(f"/v1/sessions/{sid}").headers["x-bsbr-replica"] in seen[sid]
        fused.delete(f"/v1/sessions/{sid}")


def test_fused_session_moves_to_the_other_replica_when_its_own_dies(fused, serve_cluster):
    import ray

    pages = document(6, words_per_page=10, seed=23)
    ref, labels = reference_logits(serve_cluster["models"], "bsbr", pages)
    sid = fused.post("/v1/sessions", json={"model": "bsbr"}).json()["session_id"]
    for i, p in enumerate(pages[:3]):
        r = fused.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [p]})
        assert r.status_code == 200, r.text
    first = r.headers["x-bsbr-replica"]  # the replica's actor name
    ray.kill(ray.get_actor(first, namespace="serve"), no_restart=True)
    statuses = []
    deadline = time.time() + 90
    for i, p in enumerate(pages[3:], start=3):
        while True:
            r = fused.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [p]})
            statuses.append(r.status_code)
            if r.status_code == 200 or time.time() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 200, (statuses, r.text)
    print("statuses after the kill:", statuses)
    assert r.headers["x-bsbr-replica"] != first
    assert r.json()["num_pages"] == 6
    assert (vec(labels, r.json()["logits"]) - ref).abs().max() <= LOGIT_TOL
    assert fused.delete(f"/v1/sessions/{sid}").status_code == 200
    assert wait_ready(str(fused.base_url).rstrip("/"), 120)


def test_a_fused_replica_past_its_queue_refuses_with_429_and_retry_after(serve_cluster):
    """One request at a time and one queued (ingress.max_ongoing_requests 1, the
    model's max_queued_requests 1): of a burst of 8 at once, the rest are refused
    at once by Serve's proxy (429 with Retry-After, as split answers), not queued."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from ray import serve

    from serve.app import build_app

    store_name = f"fused_limits_{os.getpid()}"
    args = app_args(serve_cluster["models"], store_name)
    args["models"] = [{**args["models"][0], "max_queued_requests": 1}]
    args["models"][0].pop("num_replicas", None)
    args["topology"] = "fused"
    args["ingress"] = {"num_replicas": 1, "max_ongoing_requests": 1, "ray_actor_options": {"num_cpus": 0.25}}
    serve.run(build_app(args), name="fused-limits", route_prefix="/fused-limits")
    url = serve_cluster["url"] + "/fused-limits"
    try:
        assert wait_ready(url, 120)
        pages = document(60, words_per_page=20, seed=42)
        n = 8
        start = threading.Barrier(n)

        def one(_):
            with httpx.Client(base_url=url, timeout=120) as c:
                start.wait()
                return c.post("/v1/classify", json={"model": "bsbr", "pages": pages})

        with ThreadPoolExecutor(n) as ex:
            answers = list(ex.map(one, range(n)))
        served = [r for r in answers if r.status_code == 200]
        refused = [r for r in answers if r.status_code != 200]
        assert served and refused, [r.status_code for r in answers]
        for r in refused:
            assert r.status_code == 429, (r.status_code, r.text)
            assert int(r.headers["retry-after"]) >= 1
        assert all(r.json()["logits"] == served[0].json()["logits"] for r in served)
        assert httpx.post(f"{url}/v1/classify", json={"model": "bsbr", "pages": pages[:2]}, timeout=60).status_code == 200
    finally:
        serve.delete("fused-limits")
        _kill_store(store_name)
