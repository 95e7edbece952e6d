"""Failover: the replica holding a session dies mid-document; the session goes on from the store."""
from __future__ import annotations

import pytest
import torch
from conftest_serve import document

pytest_plugins = ["conftest_serve"]
pytestmark = pytest.mark.slow


def vec(labels, logits):
    return torch.tensor([logits[k] for k in labels], dtype=torch.float64)


def test_killing_the_replica_holding_a_session_loses_nothing(client, serve_cluster):
    import ray

    pages = document(30, words_per_page=8, seed=21)
    whole = client.post("/v1/classify", json={"model": "bsbr", "pages": pages}).json()
    labels = sorted(whole["logits"])

    sid = client.post("/v1/sessions", json={"model": "bsbr"}).json()["session_id"]
    before, after, answers = set(), set(), {}
    for i in range(15):
        r = client.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [pages[i]]})
        assert r.status_code == 200, r.text
        before.add(r.headers["x-bsbr-replica"])
        answers[i] = r.json()
    assert len(before) == 1
    holder = before.pop()

    ray.kill(ray.get_actor(holder, namespace="serve"), no_restart=True)

    # The next pages go out at once: the ingress retries while Serve notices the
    # dead replica, then another replica resumes the session from the store.
    for i in range(15, 30):
        r = client.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [pages[i]]})
        assert r.status_code == 200, r.text
        after.add(r.headers["x-bsbr-replica"])
        answers[i] = r.json()
    assert holder not in after

    # A client retry of a page answered before the failure gets the same answer.
    again = client.post(f"/v1/sessions/{sid}/pages", json={"seq": 14, "pages": [pages[14]]})
    assert again.status_code == 200 and again.json()["logits"] == answers[14]["logits"]

    final = client.delete(f"/v1/sessions/{sid}").json()
    assert final["num_pages"] == 30 and final["num_tokens"] == whole["num_tokens"]  # nothing lost or doubled
    assert [answers[i]["num_pages"] for i in range(30)] == list(range(1, 31))
    assert (vec(labels, final["logits"]) - vec(labels, whole["logits"])).abs().max() <= 1e-4
