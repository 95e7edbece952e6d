"""bench/load.py: the load test's checks, and a short run of it against `bsbr-serve up`.

The checks are tested first against a naive reference server (a thread of
this process, no Ray): correct, it must report no anomaly and count every
page and resume exactly; with a page applied twice, a page lost and 500s,
it must find each. Then the real thing: about a minute of a few clients
against the server `make up` runs, started and stopped by the script.

bench/load.py runs as a subprocess: Locust patches the standard library for
gevent on import, which must not happen inside the test runner.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOAD = ROOT / "bench" / "load.py"
REQUEST_TYPES = ["POST /v1/sessions", "POST /v1/sessions/{id}/pages", "POST /v1/sessions/{id}/pages (retry of a seq)",
                 "GET /v1/sessions/{id}", "DELETE /v1/sessions/{id}", "POST /v1/classify",
                 "POST /v1/classify (one-shot check of a session or stream)", "POST /v1/classify/stream"]
FIELDS = ["command", "machine", "code", "started_at", "server", "users", "duration_s", "plan", "load_average_before",
          "load_average_after", "interrupted", "client_exceptions", "elapsed_s", "requests", "status_counts", "errors_by_status",
          "server_errors_5xx", "no_answer", "pages", "pages_per_s", "pages_per_s_over_time", "documents",
          "integrity", "metrics", "rss", "png"]


def start_load(out: Path, *args: str) -> subprocess.Popen:
    log = out.with_suffix(".log").open("w")
    return subprocess.Popen([sys.executable, str(LOAD), "--out", str(out), *args], stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)


def finish_load(proc: subprocess.Popen, out: Path, timeout: float) -> dict:
    """Wait for bench/load.py; if it overruns (or the test is stopped), SIGINT it, which
    stops the server it started, rather than kill it and leave that server running."""
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=240)
            except subprocess.TimeoutExpired:
                proc.kill()
    log = out.with_suffix(".log").read_text(errors="replace")
    assert code == 0, log[-8000:]
    return json.loads(out.read_text())


def run_load(out: Path, *args: str, timeout: float) -> dict:
    return finish_load(start_load(out, *args), out, timeout)


# --- a naive reference server ---------------------------------------------------------------------


def answer(pages: list[str]) -> dict:
    """What the reference 'model' says about a document: counts over all its text."""
    words = " ".join(pages).split()
    return {"label": "a", "scores": {"a": 0.5, "b": 0.5}, "num_tokens": len(words), "num_pages": len(pages),
            "logits": {"a": float(len(words)), "b": float(sum(w.lower().startswith("k") for w in words))},
            "state_bytes": 0}


class Reference:
    """The HTTP API's session semantics, plainly, with optional faults:
    double_seq: that seq's pages are applied twice (in even-numbered sessions); lose_seq:
    that seq's pages are dropped (in odd-numbered ones); error_every: every n-th one-shot
    classify answers 500; store_every: every n-th resume is counted as a store resume."""

    def __init__(self, double_seq=None, lose_seq=None, error_every=None, store_every=None):
        self.faults = {"double_seq": double_seq, "lose_seq": lose_seq, "error_every": error_every,
                       "store_every": store_every}
        self.lock = threading.Lock()
        self.sessions: dict[str, dict] = {}
        self.classifies = self.created = 0
        self.resumes = {"hot": 0, "store": 0}
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.http.server_port}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def apply(self, sid: str, seq: int, pages: list[str]) -> tuple[int, dict]:
        with self.lock:
            s = self.sessions.get(sid)
            if s is None:
                return 404, {"error": {"code": "unknown_session", "message": sid}}
            if seq == s["next"] - 1:
                return 200, s["last"]
            if seq != s["next"]:
                return 409, {"error": {"code": "seq_gap", "message": f"expected {s['next']}"}}
            if seq == self.faults["double_seq"] and s["number"] % 2 == 0:
                pages = pages + pages
            if seq == self.faults["lose_seq"] and s["number"] % 2 == 1:
                pages = []
            s["pages"] += pages
            s["next"] += 1
            if seq > 0:
                n = sum(self.resumes.values()) + 1
                every = self.faults["store_every"]
                self.resumes["store" if every and n % every == 0 else "hot"] += 1
            s["last"] = {"session_id": sid, "seq": seq, **answer(s["pages"]), "final": False}
            return 200, s["last"]

    def metrics(self) -> str:
        lines = ["# TYPE ray_bsbr_session_resumes_total counter"]
        lines += [f'ray_bsbr_session_resumes_total{{model="bsbr",source="{k}"}} {v}' for k, v in self.resumes.items()]
        lines += ["# TYPE ray_bsbr_sessions_active gauge",
                  f'ray_bsbr_sessions_active{{model="bsbr",replica="r1"}} {len(self.sessions)}',
                  'ray_bsbr_sessions_active{model="bsbr",replica="r2"} 1',
                  "# TYPE ray_component_rss_bytes gauge",
                  'ray_component_rss_bytes{Component="ray::ServeReplica:bsbr:bsbr.handle_request"} 1.5e+08',
                  'ray_component_rss_bytes{Component="ray::ServeReplica:bsbr:api"} 1.0e+08']
        return "\n".join(lines) + "\n"

    def handler(self):
        ref = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def send(self, status: int, body, content_type="application/json"):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                        if size == 0:
                            return out
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                path = urlparse(self.path).path
                if path == "/readyz":
                    return self.send(200, {"status": "ready"})
                if path == "/v1/models":
                    return self.send(200, {"models": [{"name": "bsbr"}, {"name": "standard"}]})
                if path == "/metrics":
                    return self.send(200, ref.metrics(), "text/plain; version=0.0.4")
                m = re.fullmatch(r"/v1/sessions/(\w+)", path)
                with ref.lock:
                    s = ref.sessions.get(m.group(1)) if m else None
                    if s is None:
                        return self.send(404, {"error": {"code": "not_found", "message": path}})
                    return self.send(200, s["last"])

            def do_DELETE(self):
                m = re.fullmatch(r"/v1/sessions/(\w+)", urlparse(self.path).path)
                with ref.lock:
                    s = ref.sessions.pop(m.group(1), None) if m else None
                if s is None:
                    return self.send(404, {"error": {"code": "not_found", "message": self.path}})
                return self.send(200, {**s["last"], "final": True})

            def do_POST(self):
                url = urlparse(self.path)
                raw = self.body()
                if url.path == "/v1/classify/stream":
                    assert parse_qs(url.query)["model"]
                    pages = [json.loads(x)["text"] for x in raw.decode().splitlines() if x.strip()]
                    lines = [{**answer(pages[: k + 1]), "final": False} for k in range(len(pages))]
                    lines.append({**answer(pages), "final": True})
                    with ref.lock:
                        ref.resumes["hot"] += len(pages) - 1
                    return self.send(200, "".join(json.dumps(x) + "\n" for x in lines), "application/x-ndjson")
                req = json.loads(raw)
                if url.path == "/v1/classify":
                    with ref.lock:
                        ref.classifies += 1
                        fail = ref.faults["error_every"] and ref.classifies % ref.faults["error_every"] == 0
                    if fail:
                        return self.send(500, {"error": {"code": "internal", "message": "injected"}})
                    return self.send(200, {"model": req["model"], **answer(req["pages"])})
                if url.path == "/v1/sessions":
                    sid = uuid.uuid4().hex
                    with ref.lock:
                        ref.sessions[sid] = {"pages": [], "next": 0, "number": ref.created,
                                             "last": {"session_id": sid, **answer([])}}
                        ref.created += 1
                    return self.send(201, {"session_id": sid, "model": req["model"], "expires_in_s": 600})
                m = re.fullmatch(r"/v1/sessions/(\w+)/pages", url.path)
                if m:
                    return self.send(*ref.apply(m.group(1), req["seq"], req["pages"]))
                return self.send(404, {"error": {"code": "not_found", "message": url.path}})

        return Handler

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def reference_run(tmp_path: Path, ref: Reference, name: str) -> dict:
    try:
        return run_load(tmp_path / f"{name}.json", "--url", ref.url, "--metrics-url", f"{ref.url}/metrics",
                        "--users", "3", "--duration-s", "6", "--think-s", "0.02", "--check-p", "1",
                        "--retry-p", "0.3", "--sample-s", "1", "--growth-from-s", "1", "--settle-timeout-s", "5",
                        timeout=120)
    finally:
        ref.close()


def test_a_correct_server_gives_a_clean_report_that_counts_everything(tmp_path):
    ref = Reference(store_every=4)
    r = reference_run(tmp_path, ref, "clean")
    assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
    assert r["server_errors_5xx"] == 0 and r["no_answer"] == 0 and r["errors_by_status"] == {}
    assert r["client_exceptions"] == []
    i = r["integrity"]
    assert (i["lost_pages"], i["doubled_pages"], i["oneshot_mismatches"], i["anomalies"]) == (0, 0, 0, 0), i
    assert i["oneshot_checks"] > 0 and i["retries"] > 0
    for name in REQUEST_TYPES:
        assert r["requests"][name]["count"] > 0, name
    # The metrics are read as the reference counted them: every resume, a quarter from the store.
    m = r["metrics"]
    assert m["resumes_hot"] == ref.resumes["hot"] and m["resumes_store"] == ref.resumes["store"]
    assert m["resumes_hot"] + m["resumes_store"] == m["resumes_expected"] > 0
    assert m["hot_hit_rate"] == pytest.approx(ref.resumes["hot"] / sum(ref.resumes.values()))
    assert ref.resumes["store"] > 0
    # Pages: what the client counted is what the reference applied (sessions closed, streams, one-shots).
    assert r["pages"]["total"] == sum(r["pages"][k] for k in ("session", "stream", "oneshot", "check"))
    assert r["pages_per_s"] == pytest.approx(r["pages"]["total"] / r["elapsed_s"])
    # Without a server pid, RSS comes from Ray's component gauge, one series per process name.
    assert r["rss"]["source"] == "ray_component_rss_bytes"
    assert set(r["rss"]["series"]) == {"ray::ServeReplica:bsbr:bsbr", "ray::ServeReplica:bsbr:api"}
    assert r["rss"]["growth"]["ray::ServeReplica:bsbr:bsbr"]["growth_mib"] == 0
    # Sessions held hot: summed over a model's replicas (the reference's r2 always holds one).
    held = r["rss"]["held"]["hot sessions (bsbr)"]
    assert len(held) >= 3 and all(v >= 1 for _, v in held) and max(v for _, v in held) > 1
    assert Path(r["png"]).stat().st_size > 0


def test_doubled_and_lost_pages_and_500s_are_found(tmp_path):
    r = reference_run(tmp_path, Reference(double_seq=2, lose_seq=4, error_every=5), "faulty")
    i = r["integrity"]
    assert i["doubled_pages"] > 0 and i["lost_pages"] > 0, i
    kinds = {a["kind"] for a in i["anomaly_examples"]}
    assert {"doubled_pages", "lost_pages", "wrong_page_count"} & kinds
    assert i["oneshot_mismatches"] > 0  # a session that doubled or lost a page answers differently
    assert r["server_errors_5xx"] > 0 and r["errors_by_status"]["500"] == r["server_errors_5xx"]
    assert r["status_counts"]["500"] == r["server_errors_5xx"]


def test_sigterm_ends_the_run_early_with_a_report(tmp_path):
    """SIGTERM (or Ctrl-C) stops the load, lets users finish their document, and still writes
    the report, through the same path that stops a server the run started."""
    ref = Reference()
    out = tmp_path / "stopped.json"
    try:
        proc = start_load(out, "--url", ref.url, "--metrics-url", f"{ref.url}/metrics", "--users", "2",
                          "--duration-s", "300", "--think-s", "0.05", "--settle-timeout-s", "5")
        deadline = time.time() + 60
        while ref.created < 3 and time.time() < deadline:
            time.sleep(0.2)
        assert ref.created >= 3, out.with_suffix(".log").read_text()
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        r = finish_load(proc, out, timeout=120)
        assert time.time() - t0 < 60
    finally:
        ref.close()
    assert r["interrupted"] is True and r["elapsed_s"] < 120
    assert r["integrity"]["anomalies"] == 0 and r["documents"]["sessions_completed"] > 0


def test_replicas_config_serves_every_model_with_the_counts_asked_for(tmp_path):
    """--replicas writes the --config of the server the run starts: every model of the models
    directory (what `up` serves without a config), each with its replica count. In a
    subprocess: importing bench/load.py patches the standard library for gevent."""
    import yaml

    from serve.config import AppConfig

    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('load', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(m.replicas_config(None, {'bsbr': 2}))")
    out = subprocess.run([sys.executable, "-c", code, str(LOAD)], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, check=True).stdout.strip()
    cfg = AppConfig.model_validate(yaml.safe_load(Path(out).read_text()))
    Path(out).unlink()
    found = {m.name: m.num_replicas for m in AppConfig().with_discovered_models().models}
    assert {m.name: m.num_replicas for m in cfg.models} == {**found, "bsbr": 2}
    bad = subprocess.run([sys.executable, str(LOAD), "--replicas", "nosuchmodel=2", "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert bad.returncode != 0 and "nosuchmodel" in bad.stderr and not (tmp_path / "x.json").exists()


# --- the real server -------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_load_against_bsbr_serve_up(tmp_path):
    """About a minute of 4 clients against `make up`'s server (the shipped models): no 5xx,
    no page lost or doubled, every request type exercised, the report written in full."""
    r = run_load(tmp_path / "load.json", "--users", "4", "--duration-s", "50", "--growth-from-s", "20",
                 "--check-p", "0.5", timeout=840)
    assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
    assert r["server"]["started_here"] and r["server"]["exit_code"] == 0, r["server"]
    assert r["client_exceptions"] == [] and r["interrupted"] is False
    assert r["server_errors_5xx"] == 0 and r["no_answer"] == 0, (r["errors_by_status"], r["server"]["log_tail"])
    i = r["integrity"]
    assert (i["lost_pages"], i["doubled_pages"], i["oneshot_mismatches"], i["anomalies"]) == (0, 0, 0, 0), i
    assert i["oneshot_checks"] > 0 and i["retries"] > 0
    for name in REQUEST_TYPES:
        assert r["requests"][name]["count"] > 0, name
        assert r["requests"][name]["ok"] > 0 and "p99_ms" in r["requests"][name], name
    assert r["documents"]["sessions_completed"] > 0 and r["documents"]["streams_completed"] > 0
    m = r["metrics"]
    assert m["resumes_expected"] > 0 and m["hot_hit_rate"] is not None
    # Every model replica's RSS was sampled from /proc all along, and its growth computed.
    assert r["rss"]["source"] == "/proc"
    replicas = [k for k in r["rss"]["series"] if k.startswith("ray::ServeReplica:")]
    assert {k.split(" ")[0].rsplit(":", 1)[1] for k in replicas} >= {"api", "bsbr", "standard"}
    for k in replicas:
        assert r["rss"]["growth"][k]["from_s"] is not None, k
    assert Path(r["png"]).stat().st_size > 0
