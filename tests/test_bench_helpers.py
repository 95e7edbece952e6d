"""The helpers the benches share (bench/serve_latency.py), which the benches alone would exercise."""
from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from serve_latency import bsbr_serve_up, free_port, wait_ready


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_wait_ready_waits_for_readyz_and_gives_up_when_the_server_dies():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        t0 = time.perf_counter()
        assert wait_ready(f"http://127.0.0.1:{server.server_address[1]}", alive, 30, "the test server") is None
        assert time.perf_counter() - t0 < 10
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait(30)
        t0 = time.perf_counter()
        with pytest.raises(SystemExit, match="the dead server never became ready"):
            wait_ready(f"http://127.0.0.1:{free_port()}", dead, 60, "the dead server")
        assert time.perf_counter() - t0 < 10  # it did not wait out its 60 s
    finally:
        alive.kill()
        alive.wait(30)
        server.shutdown()


def test_bsbr_serve_up_is_a_context_manager():
    cm = bsbr_serve_up("models")  # nothing starts before `with`
    assert hasattr(cm, "__enter__") and hasattr(cm, "__exit__")


def test_page_profile_summarises_py_spy_stacks_per_page():
    from page_profile import summarise

    raw = "\n".join([
        "thread (1): AsyncIO Thread: default;Thread.run (threading.py:982);Engine.append (serve/engine.py:470);"
        "tokenize_document (serve/pages.py:60) 30",
        "thread (1): AsyncIO Thread: default;Thread.run (threading.py:982);Engine.append (serve/engine.py:470) 10",
        "thread (2): model_0;StepBatcher._run_batch (serve/engine.py:140);"
        "StepBatcher._run_batch (serve/engine.py:145) 100",  # a recursion counts once
    ])
    out = summarise(raw, rate=100.0, pages=2)  # a sample is 10 ms; per page, 5 ms
    assert out["thread_busy_ms_per_page"] == {"model_0": 500.0, "AsyncIO Thread: default": 200.0}
    assert out["functions_ms_per_page"] == {"Engine.append on the loop": 200.0, "tokenising": 150.0,
                                            "the model step (model thread)": 500.0}


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers POST with the JSON it got and the number of the connection it came on;
    after the first answer of a connection it closes that connection without saying
    so (as a server whose keep-alive timeout ran out does)."""

    protocol_version = "HTTP/1.1"
    connections: typing.ClassVar[list[int]] = []

    def setup(self):
        super().setup()
        _Echo.connections.append(id(self))
        self.answered = 0

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.answered += 1
        if self.answered == 2:
            self.close_connection = True  # silently: no "Connection: close" was sent

    def do_POST(self):
        import json

        got = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status = 422 if got.get("bad") else 201
        self._answer(status, json.dumps({"got": got, "connection": len(_Echo.connections)}).encode())

    def do_DELETE(self):
        self._answer(200, b"{}")

    def log_message(self, *args):
        pass


def test_lean_client_posts_json_keeps_the_connection_and_reconnects_once_when_the_server_closed_it():
    from serve_latency import LeanClient, http_client

    _Echo.connections = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with http_client("lean", url, timeout=30) as c:
            assert isinstance(c, LeanClient)
            r = c.post("/v1/sessions/x/pages", json={"seq": 0, "pages": ["é"]})
            assert r.status_code == 201 and r.json() == {"got": {"seq": 0, "pages": ["é"]}, "connection": 1}
            assert r.raise_for_status() is r
            r = c.post("/p", json={"seq": 1})
            assert r.json()["connection"] == 1  # the same connection, kept alive
            # The server closed it after that answer, unannounced: sent again on a new one.
            time.sleep(0.2)
            r = c.post("/p", json={"seq": 2})
            assert r.json() == {"got": {"seq": 2}, "connection": 2}
            bad = c.post("/p", json={"bad": True})
            assert bad.status_code == 422
            with pytest.raises(RuntimeError, match="POST /p answered 422"):
                bad.raise_for_status()
            assert c.delete("/v1/sessions/x").status_code == 200
    finally:
        server.shutdown()
        server.server_close()
    # Nothing listening: a fresh connection's failure is raised, not retried.
    with LeanClient(f"http://127.0.0.1:{free_port()}", timeout=5) as c, pytest.raises(ConnectionRefusedError):
        c.post("/p", json={})
    with pytest.raises(ValueError, match="unknown client"):
        http_client("curl", url)


@pytest.mark.parametrize("topology", ["split", "fused"])
def test_serve_latency_layouts_place_replicas_and_threads_where_the_topology_runs_its_models(topology, tmp_path):
    """`--layouts RxT`: R replicas of T torch threads, on each model's deployment in
    split and on the ingress (which holds the models) in fused; without one, one
    replica with every core, as before the option."""
    import argparse
    import os

    from serve.config import AppConfig
    from serve_latency import Bench

    from serve_latency import parse_layout

    assert parse_layout("2x1") == (2, 1, None) and parse_layout("2x1/2") == (2, 1, 2)
    bench = Bench(argparse.Namespace(stream_pages=200, page_tokens=512))
    for layout, (replicas, threads, oneshot) in [((2, 1), (2, 1, None)), ((2, 1, 2), (2, 1, 2)),
                                                 (None, (1, os.cpu_count() or 2, None))]:
        cfg = AppConfig.model_validate(bench.app_args(tmp_path, topology, layout))
        assert cfg.topology == topology
        assert [m.torch_threads for m in cfg.models] == [threads, threads]
        assert [m.oneshot_torch_threads for m in cfg.models] == [oneshot, oneshot]
        assert cfg.sessions.store == "ray_actor"
        if topology == "split":
            assert [m.num_replicas for m in cfg.models] == [replicas, replicas]
            assert cfg.ingress.num_replicas == 1
        else:
            assert cfg.ingress.num_replicas == replicas
            assert [m.num_replicas for m in cfg.models] == [1, 1]
    redis = Bench(argparse.Namespace(stream_pages=200, page_tokens=512, redis_url="redis://127.0.0.1:6390/0"))
    cfg = AppConfig.model_validate(redis.app_args(tmp_path, topology, (2, 1, 2)))
    assert (cfg.sessions.store, cfg.sessions.redis_url) == ("redis", "redis://127.0.0.1:6390/0")
    assert redis.results["sessions"] == "redis" and bench.results["sessions"] == "ray_actor"


def test_page_overhead_takes_medians_of_request_minus_step_over_all_pages_and_page_one():
    from page_overhead import medians

    rows = [{"session": 0, "page": 1, "request_ms": 15.0, "step_ms": 10.0},
            {"session": 0, "page": 2, "request_ms": 12.0, "step_ms": 8.0},
            {"session": 0, "page": 3, "request_ms": 13.0, "step_ms": 10.0},
            {"session": 1, "page": 1, "request_ms": 21.0, "step_ms": 12.0}]
    m = medians(rows)
    assert m["first_session_page_1"]["n"] == 1 and m["first_session_page_1"]["overhead_ms"] == 5.0
    assert m["all"]["n"] == 4 and m["page_1"]["n"] == 2
    assert m["all"]["overhead_ms"] == 4.5  # median of 5, 4, 3, 9
    assert m["page_1"]["overhead_ms"] == 7.0 and m["page_1"]["step_ms"] == 11.0
    assert m["page_1"]["request_over_step"] == (1.5 + 1.75) / 2
    assert medians([])["all"]["overhead_ms"] is None
