"""`bsbr-serve up` as a user runs it: a subprocess that becomes ready and stops on Ctrl-C."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest_serve import free_port

pytest_plugins = ["conftest_serve"]
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent / "bsbr-serve"


def test_up_answers_readyz_and_stops_cleanly_on_sigint(dev_models, tmp_path):
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen(
        [str(BIN), "up", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
         "--models-dir", str(dev_models), "--object-store-mb", "150"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        ready = False
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    ready = True
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        output = (tmp_path / "up.log").read_text()
        assert ready, output
        deadline = time.time() + 30  # the URLs are printed once serve.run returns
        while "Ctrl-C" not in output and time.time() < deadline:
            time.sleep(0.5)
            output = (tmp_path / "up.log").read_text()
        assert f"{url}/docs" in output and f"127.0.0.1:{metrics_port}/metrics" in output
        r = httpx.post(f"{url}/v1/classify", json={"model": "bsbr", "text": "a page\fanother page"}, timeout=60)
        assert r.status_code == 200 and r.json()["num_pages"] == 2
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).status_code == 200

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        output = (tmp_path / "up.log").read_text()
        assert "stopped." in output
        with socket.socket() as s:  # the HTTP port is free again
            s.bind(("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
