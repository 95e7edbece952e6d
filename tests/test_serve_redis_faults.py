"""Faults with the Redis session store, on a `bsbr-serve up` server of its own.

- Redis is killed (SIGKILL) mid-session: session requests answer 503
  store_unavailable with Retry-After (not 500, not a hang: every request has
  a client timeout), one-shot requests still answer, nothing is applied twice,
  and once Redis is back (its AOF, same directory) the session goes on exactly.
- Every process of the server is killed (SIGKILL: the `bsbr-serve up` driver,
  Ray's GCS, raylet and every worker) mid-session and the server is started
  again: a repeated seq returns its stored answer and the document ends with
  the one-shot answer.

One server for the module (bsbr only, one replica), started twice.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from conftest_serve import PAGE_TOKENS, document, free_port, wait_ready

pytest_plugins = ["conftest_serve", "redis_helpers"]
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent / "bsbr-serve"
TAG = "BSBR_FAULT_TEST_SERVER"  # in the environment of every process the server starts


def _wait_until_free(port: int, timeout_s: float = 60.0) -> None:
    """Until a server could listen on 127.0.0.1:port (as `bsbr-serve up` checks it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                assert time.monotonic() < deadline, f"port {port} is still taken"
        time.sleep(0.2)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class UpServer:
    """`bsbr-serve up --config` in a subprocess. Every Ray process it starts
    inherits TAG=<id> in its environment, which is how `processes()` finds
    them all, wherever Ray re-parented them."""

    def __init__(self, config: Path, log: Path):
        self.config, self.log = config, log
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 240.0) -> None:
        _wait_until_free(self.port)  # a restart listens where the clients are sent
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {TAG: self.id}
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [str(BIN), "up", "--config", str(self.config), "--host", "127.0.0.1", "--port", str(self.port),
                 "--metrics-port", str(self.metrics_port), "--object-store-mb", "100"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        if not wait_ready(self.url, timeout_s, alive=lambda: self.proc.poll() is None):
            raise AssertionError(f"bsbr-serve up never became ready:\n{self.log.read_text()[-3000:]}")

    def processes(self) -> list[int]:
        needle = f"{TAG}={self.id}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:  # gone, or not ours
                continue
        return found

    def kill_all(self) -> int:
        """SIGKILL every process of the server until none is left; how many were killed."""
        killed: set[int] = set()
        for _ in range(100):
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"processes of the server survived SIGKILL: {self.processes()}")
        if self.proc is not None:
            self.proc.wait(30)
        # A dying process loses its environment before its sockets: wait until
        # each is gone or a zombie (which holds no file any more).
        deadline = time.monotonic() + 60
        while any(_running(pid) for pid in killed):
            assert time.monotonic() < deadline, "killed processes of the server never exited"
            time.sleep(0.1)
        return len(killed)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                pass
        self.kill_all()


@pytest.fixture(scope="module")
def server(dev_models, redis_server, tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    config = d / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": "bsbr", "path": str(dev_models / "bsbr"), "num_replicas": 1,
                    "page_tokens": PAGE_TOKENS, "ray_actor_options": {"num_cpus": 0.25}}],
        "ingress": {"ray_actor_options": {"num_cpus": 0.25}},
        "sessions": {"store": "redis", "redis_url": redis_server.url(), "store_name": f"faults-{os.getpid()}",
                     "ttl_s": 600},
        "http": {"pdf_workers": 1},
    }))
    up = UpServer(config, d / "up.log")
    up.start()
    yield up
    up.stop()


def vec(labels, logits) -> torch.Tensor:
    return torch.tensor([logits[k] for k in labels], dtype=torch.float64)


def assert_store_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "store_unavailable"
    assert int(r.headers["retry-after"]) >= 1


def page(c: httpx.Client, sid: str, seq: int, text: str) -> httpx.Response:
    return c.post(f"/v1/sessions/{sid}/pages", json={"seq": seq, "pages": [text]})


def assert_document_ends_as_one_shot(c, sid, answers, whole, n_pages) -> None:
    final = c.delete(f"/v1/sessions/{sid}")
    assert final.status_code == 200, final.text
    final = final.json()
    assert [answers[i]["num_pages"] for i in range(n_pages)] == list(range(1, n_pages + 1))  # none doubled
    assert final["num_pages"] == n_pages and final["num_tokens"] == whole["num_tokens"]
    labels = sorted(whole["logits"])
    assert (vec(labels, final["logits"]) - vec(labels, whole["logits"])).abs().max() <= 1e-5


def test_killing_redis_mid_session_is_503_then_the_session_goes_on_exactly(server, redis_server):
    pages = document(10, words_per_page=8, seed=31)
    with httpx.Client(base_url=server.url, timeout=60) as c:  # a hang fails here, as a timeout
        whole = c.post("/v1/classify", json={"model": "bsbr", "pages": pages}).json()
        sid = c.post("/v1/sessions", json={"model": "bsbr"}).json()["session_id"]
        answers = {}
        for i in range(5):
            r = page(c, sid, i, pages[i])
            assert r.status_code == 200, r.text
            answers[i] = r.json()

        redis_server.kill()  # right after seq 4 was answered
        try:
            for _ in range(2):
                assert_store_unavailable(page(c, sid, 5, pages[5]))
            assert_store_unavailable(c.get(f"/v1/sessions/{sid}"))
            assert_store_unavailable(c.delete(f"/v1/sessions/{sid}"))
            assert_store_unavailable(c.post("/v1/sessions", json={"model": "bsbr"}))
            assert_store_unavailable(c.get(f"/v1/sessions/{uuid.uuid4().hex}"))  # unknown here: the store can't say
            alone = c.post("/v1/classify", json={"model": "bsbr", "pages": pages})  # needs no store
            assert alone.status_code == 200 and alone.json()["logits"] == whole["logits"]
        finally:
            redis_server.start()  # same port and directory: the AOF

        again = page(c, sid, 4, pages[4])  # answered before the kill: in the AOF
        assert again.status_code == 200, again.text
        assert again.json() == answers[4]
        for i in range(5, 10):
            r = page(c, sid, i, pages[i])
            assert r.status_code == 200, r.text
            answers[i] = r.json()
        assert_document_ends_as_one_shot(c, sid, answers, whole, 10)


def test_the_store_fill_is_exported_with_redis_too(server):
    """One series of each store gauge (the lease holder exports it), the limit as configured."""
    deadline = time.monotonic() + 90
    while True:
        text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
        series = {name: [line for line in text.splitlines() if line.startswith(f"ray_{name}{{")]
                  for name in ("bsbr_session_store_bytes", "bsbr_session_store_max_bytes", "bsbr_session_store_sessions")}
        if all(series.values()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert all(len(lines) == 1 for lines in series.values()), series
    assert float(series["bsbr_session_store_max_bytes"][0].rsplit(" ", 1)[1]) == 4 << 30  # the default


def test_killing_every_ray_process_mid_session_loses_nothing(server):
    pages = document(12, words_per_page=8, seed=32)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        whole = c.post("/v1/classify", json={"model": "bsbr", "pages": pages}).json()
        sid = c.post("/v1/sessions", json={"model": "bsbr"}).json()["session_id"]
        answers, replicas = {}, set()
        for i in range(6):
            r = page(c, sid, i, pages[i])
            assert r.status_code == 200, r.text
            answers[i] = r.json()
            replicas.add(r.headers["x-bsbr-replica"])

    assert server.kill_all() >= 4  # the driver, GCS, raylet, the replicas ...
    assert server.processes() == []
    server.start()

    with httpx.Client(base_url=server.url, timeout=60) as c:
        again = page(c, sid, 5, pages[5])  # a client retrying its last page gets the stored answer
        assert again.status_code == 200, again.text
        assert again.json() == answers[5]
        gap = page(c, sid, 7, pages[7])
        assert gap.status_code == 409 and gap.json()["error"]["code"] == "seq_gap"
        for i in range(6, 12):
            r = page(c, sid, i, pages[i])
            assert r.status_code == 200, r.text
            answers[i] = r.json()
            assert r.headers["x-bsbr-replica"] not in replicas  # a new replica resumed it from Redis
        assert_document_ends_as_one_shot(c, sid, answers, whole, 12)
