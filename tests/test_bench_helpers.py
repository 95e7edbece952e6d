"""The helpers the benches share (bench/serve_latency.py), which the benches alone would exercise."""
from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
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
