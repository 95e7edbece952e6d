"""`bsbr-serve up` as a user runs it: a subprocess that becomes ready, serves
what its `--config` says, and stops on Ctrl-C."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from conftest_serve import free_port

pytest_plugins = ["conftest_serve"]
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent / "bsbr-serve"


@pytest.mark.parametrize(("topology", "ingress"),
                         [("split", "serve"), ("fused", "serve"), ("split", "haproxy"), ("fused", "haproxy")])
def test_up_serves_what_its_config_says_and_stops_cleanly_on_sigint(dev_models, tmp_path, topology, ingress):
    """A Serve config (its first application's args) naming one of the two models
    in dev_models, with its own page size, token limit, session limit and body
    limit; in either topology (`--topology` over the config's), behind Serve's
    Python proxy or its HAProxy ingress (`--ingress`; fused then with two
    replicas, which HAProxy keeps each session on)."""
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": "bsbr", "route_prefix": "/", "import_path": "serve.app:build_app",
        "args": {
            "models": [{"name": "standard", "path": str(dev_models / "standard"), "num_replicas": 1,
                        "page_tokens": 32, "max_tokens": 500, "ray_actor_options": {"num_cpus": 0.25}}],
            "sessions": {"max_sessions": 2},
            "http": {"max_body_bytes": 4096, "pdf_workers": 1},
            "ingress": {"ray_actor_options": {"num_cpus": 0.25},
                        "num_replicas": 2 if (topology, ingress) == ("fused", "haproxy") else 1},
        },
    }]}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen(
        [str(BIN), "up", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
         "--config", str(config), "--object-store-mb", "150", "--topology", topology, "--ingress", ingress],
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
        _serves_what_the_config_says(url, topology)
        if ingress == "haproxy":
            _haproxy_answers(url, output, topology, proc.pid)
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).status_code == 200

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        output = (tmp_path / "up.log").read_text()
        assert "stopped." in output
        with socket.socket() as s:  # the HTTP port is free again, for a server (HAProxy
            # closes its client connections itself, leaving them in TIME_WAIT on the port)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
            from serve.cli import reap_stale_haproxy

            reap_stale_haproxy()  # a killed server's HAProxy would live on
        log.close()


def _serves_what_the_config_says(url: str, topology: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/readyz").json()["models"] == {"standard": True}
        (model,) = c.get("/v1/models").json()["models"]  # dev_models holds bsbr too
        assert (model["name"], model["page_tokens"], model["max_tokens"]) == ("standard", 32, 500)
        r = c.post("/v1/classify", json={"model": "bsbr", "text": "a page"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"
        r = c.post("/v1/classify", json={"model": "standard", "text": "a page\fanother page"})
        assert r.status_code == 200 and r.json()["num_pages"] == 2
        # The replica that read it: the model's own deployment, or the fused ingress.
        deployment = {"split": "standard", "fused": "api"}[topology]
        assert f"#{deployment}#" in r.headers["x-bsbr-replica"], r.headers["x-bsbr-replica"]
        words = "the kernel maps a page of memory " * 12  # no form feed: pages of 32 tokens
        r = c.post("/v1/classify", json={"model": "standard", "text": words}).json()
        assert r["num_tokens"] > 64 and r["num_pages"] == -(-r["num_tokens"] // 32)
        r = c.post("/v1/classify", json={"model": "standard", "text": "x" * 5000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = c.post("/v1/classify", json={"model": "standard", "text": "page " * 800})  # under 4096 bytes
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_tokens"
        made = [c.post("/v1/sessions", json={"model": "standard"}) for _ in range(3)]
        assert [r.status_code for r in made] == [201, 201, 429]
        assert made[2].json()["error"]["code"] == "too_many_sessions"
        for r in made[:2]:
            assert c.delete(f"/v1/sessions/{r.json()['session_id']}").status_code == 200


def _haproxy_answers(url: str, output: str, topology: str, up_pid: int) -> None:
    """The requests went through an HAProxy of this server's own (its config in
    the directory `up` printed, with the session balance), and in fused a
    session's pages stay on one of the two replicas while classify spreads,
    and a session goes on on the other replica when its own is killed."""
    from serve.router import HAPROXY_SESSION_BALANCE

    line = next(ln for ln in output.splitlines() if ln.strip().startswith("ingress  HAProxy"))
    run_dir = line.rsplit("under ", 1)[1].rstrip(")")
    configs = list(Path(run_dir).rglob("haproxy.cfg"))
    assert configs, run_dir
    assert f"balance {HAPROXY_SESSION_BALANCE}" in configs[0].read_text()
    from serve.cli import _processes

    assert any("haproxy" in cmd and str(configs[0]) in cmd for _, cmd in _processes())
    if topology != "fused":
        return
    with httpx.Client(base_url=url, timeout=60) as c:
        # Classify goes round robin over both replicas, once HAProxy has both:
        # Serve adds a replica to HAProxy's configuration shortly after it is
        # up, so `up` may report ready while HAProxy still knows only one.
        replicas, deadline = set(), time.time() + 60
        while len(replicas) < 2 and time.time() < deadline:
            r = c.post("/v1/classify", json={"model": "standard", "text": "a page"})
            assert r.status_code == 200, r.text
            replicas.add(r.headers["x-bsbr-replica"])
            time.sleep(0.2)
        assert len(replicas) == 2, replicas
        for _ in range(2):
            sid = c.post("/v1/sessions", json={"model": "standard"}).json()["session_id"]
            seen = set()
            for seq in range(3):
                r = c.post(f"/v1/sessions/{sid}/pages", json={"seq": seq, "text": f"page {seq} of the kernel"})
                assert r.status_code == 200, r.text
                seen.add(r.headers["x-bsbr-replica"])
            assert len(seen) == 1, seen
            assert c.delete(f"/v1/sessions/{sid}").status_code == 200
        # A session on each replica (the config allows 2), a page each; then kill
        # one replica: its session goes on on the other, which resumes it from
        # the store, and both sessions give their one-shot answers.
        texts = [f"page {i} of the kernel maps memory" for i in range(3)]
        on: dict[str, str] = {}  # replica -> session
        for _ in range(32):
            sid = c.post("/v1/sessions", json={"model": "standard"}).json()["session_id"]
            r = c.post(f"/v1/sessions/{sid}/pages", json={"seq": 0, "text": texts[0]})
            assert r.status_code == 200, r.text
            if r.headers["x-bsbr-replica"] in on:
                assert c.delete(f"/v1/sessions/{sid}").status_code == 200
                continue
            on[r.headers["x-bsbr-replica"]] = sid
            if len(on) == 2:
                break
        assert len(on) == 2, on
        pids = _pids_titled("ServeReplica:bsbr:api", up_pid)
        assert len(pids) == 2, pids
        os.kill(pids[0], signal.SIGKILL)
        # Both sessions' next pages at once, right after the kill: one of them
        # may go to the dead replica. Until HAProxy marks it down, HAProxy then
        # closes the connection without an answer, or answers its own
        # plain-text 500 (unlike Serve's proxy, it does not resend the request:
        # docs/architecture.md 3.8). The client sends the same seq again, as it
        # may, until the other replica answers it.
        dropped: dict[str, int] = {}

        def next_page(sid: str) -> httpx.Response:
            deadline = time.time() + 20
            while True:
                try:
                    r = c.post(f"/v1/sessions/{sid}/pages", json={"seq": 1, "text": texts[1]})
                    if r.status_code != 500:
                        return r
                    assert r.text == "Internal Server Error", r.text  # HAProxy's, not the server's JSON error
                except httpx.RemoteProtocolError:
                    pass
                dropped[sid] = dropped.get(sid, 0) + 1
                assert time.time() < deadline, f"seq 1 of {sid} unanswered after {dropped[sid]} tries"
                time.sleep(0.25)

        with ThreadPoolExecutor(2) as pool:
            firsts = dict(zip(on, pool.map(next_page, on.values())))
        assert len(dropped) <= 1, dropped  # only the dead replica's session
        moved = 0
        for replica, sid in on.items():
            answers = [firsts[replica], c.post(f"/v1/sessions/{sid}/pages", json={"seq": 2, "text": texts[2]})]
            assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
            moved += any(a.headers["x-bsbr-replica"] != replica for a in answers)
            whole = c.post("/v1/classify", json={"model": "standard", "pages": texts}).json()
            for label, v in whole["logits"].items():
                assert abs(answers[-1].json()["logits"][label] - v) < 1e-4
        # The dead replica's session moved (the other one may too, if Serve's
        # replacement replica joined HAProxy meanwhile and the hash moved it).
        assert moved >= 1


def _pids_titled(title: str, root: int) -> list[int]:
    """Descendants of process `root` whose command line (Ray's process title)
    holds `title`: only this server's, not those of the suite's shared cluster."""
    from serve.cli import _processes

    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue

    def under_root(pid: int) -> bool:
        seen = set()
        while pid in parent and pid not in seen:
            if pid == root:
                return True
            seen.add(pid)
            pid = parent[pid]
        return False

    return sorted(pid for pid, cmd in _processes() if cmd.startswith("ray::") and title in cmd and under_root(pid))


def test_models_dir_serves_every_model_there(dev_models):
    """Without --config, `up` serves each model directory of --models-dir (the
    rest of its path is the one above)."""
    import argparse

    from serve.cli import load_app_args
    from serve.config import AppConfig

    args = load_app_args(argparse.Namespace(config=None, models_dir=dev_models))
    cfg = AppConfig.model_validate(args).with_discovered_models()
    assert [m.name for m in cfg.models] == ["bsbr", "standard"]
    assert [Path(m.path) for m in cfg.models] == [dev_models / "bsbr", dev_models / "standard"]
