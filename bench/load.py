"""Load and soak test of the HTTP API with Locust (as a library).

N concurrent clients (Locust users) read documents against a server on
127.0.0.1 for a bounded time. Each user, in a closed loop:

- reads a document through a session: create, append its pages with seq
  0, 1, ... (sometimes several pages in one request, sometimes the same seq
  again as a client retry would), get, delete;
- streams a document through POST /v1/classify/stream (NDJSON both ways);
- classifies a document in one request.

Every answer is checked against what the client sent: each session's page
count after every append, get and delete (a page the server lost or applied
twice shows as a wrong count), a retried seq returns the stored answer
unchanged, each stream line counts its pages, and for a sample of sessions
and streams the final answer equals a one-shot classify of the same pages
(logits within --logit-tol).

Reported (JSON, and a PNG of each replica's RSS over time): pages/s, p50/p95/
p99 latency per request type, answers by status code, lost or doubled pages,
the RSS of every Serve replica (and the session store actor, proxy and
controller) sampled from /proc, each one's growth from --growth-from-s to the
end, and the hot hit rate: bsbr_session_resumes_total{source="hot"} over all
resumes, read from the Prometheus metrics before and after the load.

By default it starts `make up`'s server itself (`bsbr-serve up` with the
models under models/, on free ports) and stops it after; `--url` (with
`--metrics-url`, and `--server-pid` for RSS from /proc) targets a running one.

    python bench/load.py --users 32 --duration-s 600        # the soak: bench/results/load.json + load.png
    python bench/load.py --users 4 --duration-s 60 --out /tmp/load.json   # a short run
    python bench/load.py --url http://127.0.0.1:8000 --metrics-url http://127.0.0.1:8080/metrics
"""
from __future__ import annotations

# Locust patches the standard library for gevent on import: first, before
# anything opens a socket or starts a thread.
from locust import HttpUser, between, task  # isort: skip
from locust.env import Environment  # isort: skip

import argparse
import itertools
import json
import math
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import gevent
import gevent.event
import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve.devmodels import sample_text  # no torch, no Ray

# Request names, as Locust's statistics and this report key them.
CREATE = "POST /v1/sessions"
APPEND = "POST /v1/sessions/{id}/pages"
RETRY = "POST /v1/sessions/{id}/pages (retry of a seq)"
GET = "GET /v1/sessions/{id}"
DELETE = "DELETE /v1/sessions/{id}"
CLASSIFY = "POST /v1/classify"
CHECK = "POST /v1/classify (one-shot check of a session or stream)"
STREAM = "POST /v1/classify/stream"
REQUEST_TYPES = (CREATE, APPEND, RETRY, GET, DELETE, CLASSIFY, CHECK, STREAM)
EXPECTED_STATUS = {CREATE: 201}
# Which processes' RSS is sampled: every Serve replica, and the shared pieces
# a soak could grow (the session store actor holds every checkpoint).
# Set by SIGINT or SIGTERM: the run stops starting documents and shuts its server down.
STOP = gevent.event.Event()
# What the replicas hold, sampled beside the RSS (metric, series name).
HELD_GAUGES = (("ray_bsbr_sessions_active", "hot sessions"), ("ray_bsbr_session_store_bytes", "session store bytes"))
SAMPLED_PREFIXES = ("ray::ServeReplica:", "ray::SessionStoreActor", "ray::ProxyActor", "ray::ServeController")


# --- what the users record --------------------------------------------------------------


class Tally:
    """Everything the users observe, for the report."""

    def __init__(self) -> None:
        self.latency_ms: dict[str, list[float]] = defaultdict(list)
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.pages: Counter = Counter()  # pages the server read, by how they were sent
        self.page_times: list[float] = []  # monotonic time of every page read (pages/s over time)
        self.docs: Counter = Counter()  # sessions / streams / oneshots completed, abandoned
        self.anomalies: list[dict] = []  # every answer that disagrees with what was sent
        self.lost_pages = 0
        self.doubled_pages = 0
        self.retries = 0
        self.checks = 0
        self.check_mismatches = 0
        self.max_logit_diff = 0.0
        self.expected_resumes = 0  # appends the server must count in bsbr_session_resumes_total

    def on_request(self, request_type, name, response_time, response_length, response=None, exception=None,
                   **kw) -> None:
        """Locust's request event: every request, timed and by status (0: no answer)."""
        self.latency_ms[name].append(float(response_time))
        code = getattr(response, "status_code", None) if response is not None else None
        self.status[name][str(code or 0)] += 1

    def read(self, kind: str, n: int) -> None:
        self.pages[kind] += n
        self.page_times.extend([time.monotonic()] * n)

    def anomaly(self, kind: str, **detail) -> str:
        self.anomalies.append({"kind": kind, **detail})
        return f"{kind}: {detail}"

    def count_pages(self, where: str, sent: int, answered: int, final: bool, **detail) -> str | None:
        """Compare the server's page count with the pages sent; None when they agree. Every
        wrong answer is an anomaly; a document's final answer (the session's delete, the
        stream's last line, a one-shot answer) counts its pages lost or doubled."""
        if answered == sent:
            return None
        if not final:
            return self.anomaly("wrong_page_count", where=where, sent=sent, answered=answered, **detail)
        if answered < sent:
            self.lost_pages += sent - answered
            return self.anomaly("lost_pages", where=where, sent=sent, answered=answered, **detail)
        self.doubled_pages += answered - sent
        return self.anomaly("doubled_pages", where=where, sent=sent, answered=answered, **detail)


def logit_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over labels (inf if the label sets differ)."""
    if set(a) != set(b):
        return math.inf
    return max((abs(a[k] - b[k]) for k in a), default=0.0)


class Reader(HttpUser):
    """One client reading documents; the plan (models, sizes, rates) is the environment's."""

    wait_time = between(0, 0.5)  # replaced from --think-s in run()
    numbers = itertools.count()

    def on_start(self) -> None:
        plan = self.environment.plan
        self.tally: Tally = self.environment.tally
        self.rng = random.Random(plan["seed"] * 100003 + next(Reader.numbers))  # reproducible per user

    # --- documents ---

    def document(self) -> tuple[str, list[str]]:
        p = self.environment.plan
        n = self.rng.randint(p["min_pages"], p["max_pages"])
        pages = [sample_text(self.rng, self.rng.randint(p["min_words"], p["max_words"])) for _ in range(n)]
        return self.rng.choice(p["models"]), pages

    def call(self, name: str, method: str, path: str, expect_pages: int | None = None, final: bool = False, **kw):
        """One request; (status, body or None, headers). A wrong status, or a page count that
        is not expect_pages, marks the request failed in Locust's statistics; `final`: the
        answer is the document's last (Tally.count_pages)."""
        kw.setdefault("timeout", self.environment.plan["timeout_s"])
        with self.client.request(method, path, name=name, catch_response=True, **kw) as r:
            status = r.status_code or 0
            if status != EXPECTED_STATUS.get(name, 200):
                r.failure(f"status {status}: {(r.text or '')[:300]}")
                return status, None, r.headers
            try:
                body = r.json()
            except ValueError:
                r.failure(self.tally.anomaly("bad_json", request=name, body=(r.text or "")[:300]))
                return status, None, r.headers
            if expect_pages is not None:
                bad = self.tally.count_pages(name, expect_pages, body.get("num_pages", -1), final,
                                             session_id=body.get("session_id"), seq=body.get("seq"))
                if bad:
                    r.failure(bad)
            return status, body, r.headers

    def compare_oneshot(self, model: str, pages: list[str], final: dict, where: str) -> None:
        """The final answer of a session or stream must equal a one-shot classify of its pages."""
        _, body, _ = self.call(CHECK, "POST", "/v1/classify", expect_pages=len(pages), final=True,
                                    json={"model": model, "pages": pages})
        if body is None:
            return
        self.tally.read("check", len(pages))
        self.tally.checks += 1
        diff = logit_diff(final["logits"], body["logits"])
        self.tally.max_logit_diff = max(self.tally.max_logit_diff, diff)
        if diff > self.environment.plan["logit_tol"] or final["num_tokens"] != body["num_tokens"]:
            self.tally.check_mismatches += 1
            self.tally.anomaly("final_differs_from_oneshot", where=where, model=model, logit_diff=diff,
                               tokens=[final["num_tokens"], body["num_tokens"]])

    # --- tasks ---

    @task(6)
    def read_session(self) -> None:
        p, t = self.environment.plan, self.tally
        model, pages = self.document()
        _, body, _ = self.call(CREATE, "POST", "/v1/sessions", json={"model": model})
        if body is None:
            t.docs["sessions_not_created"] += 1
            return
        sid = body["session_id"]
        url = f"/v1/sessions/{sid}"
        sent, seq, last, i = 0, 0, None, 0
        while i < len(pages):
            group = pages[i : i + (1 if self.rng.random() >= p["multi_page_p"] else self.rng.randint(2, 3))]
            answer = self.append(url, seq, group, sent)
            if answer is None:
                t.docs["sessions_abandoned"] += 1
                self.call(DELETE, "DELETE", url)
                return
            t.read("session", len(group))
            if seq > 0:
                t.expected_resumes += 1
            if self.rng.random() < p["retry_p"]:
                self.retry(url, seq, group, answer)
            sent, last, i, seq = sent + len(group), answer, i + len(group), seq + 1
            if self.rng.random() < p["get_p"]:
                self.call(GET, "GET", url, expect_pages=sent)
        _, now, _ = self.call(GET, "GET", url, expect_pages=sent)
        _, final, _ = self.call(DELETE, "DELETE", url, expect_pages=sent, final=True)
        if final is None:
            return
        for where, b in (("get", now), ("delete", final)):
            if b is not None and logit_diff(b["logits"], last["logits"]) > 0:
                t.anomaly("answer_changed", where=where, session_id=sid)
        t.docs["sessions_completed"] += 1
        if self.rng.random() < p["check_p"]:
            self.compare_oneshot(model, pages, final, "session")

    def append(self, url: str, seq: int, group: list[str], sent: int) -> dict | None:
        """Append one request's pages; a 429/503 is retried with the same seq after its
        Retry-After (as a client should), up to 3 times."""
        for _ in range(4):
            status, body, headers = self.call(APPEND, "POST", f"{url}/pages", expect_pages=sent + len(group),
                                              json={"seq": seq, "pages": group})
            if body is not None:
                if body.get("seq") != seq:
                    self.tally.anomaly("wrong_seq", sent=seq, answered=body.get("seq"), url=url)
                return body
            if status not in (429, 503):
                return None
            gevent.sleep(min(float(headers.get("Retry-After") or 1), 10.0))
        return None

    def retry(self, url: str, seq: int, group: list[str], answer: dict) -> None:
        """The same seq again: the stored answer, nothing applied twice."""
        self.tally.retries += 1
        _, again, _ = self.call(RETRY, "POST", f"{url}/pages", expect_pages=answer["num_pages"],
                                json={"seq": seq, "pages": group})
        if again is not None and (again.get("seq") != seq or again["num_tokens"] != answer["num_tokens"]
                                  or logit_diff(again["logits"], answer["logits"]) > 0):
            self.tally.anomaly("retry_answer_differs", url=url, seq=seq)

    @task(2)
    def read_stream(self) -> None:
        p, t = self.environment.plan, self.tally
        model, pages = self.document()
        payload = [(json.dumps({"text": page}) + "\n").encode() for page in pages]
        t0 = time.perf_counter()
        with self.client.post(f"/v1/classify/stream?model={model}", name=STREAM, data=iter(payload),
                              headers={"Content-Type": "application/x-ndjson"}, stream=True,
                              catch_response=True, timeout=p["timeout_s"]) as r:
            try:
                lines = [json.loads(x) for x in r.iter_lines() if x.strip()] if r.status_code == 200 else []
            except (ValueError, requests.RequestException) as e:
                r.failure(f"stream broke: {e}")
                return
            finally:
                # Locust times a stream=True request to its headers: time the whole stream.
                r.request_meta["response_time"] = (time.perf_counter() - t0) * 1000
            if r.status_code != 200:
                r.failure(f"status {r.status_code}: {(r.text or '')[:300]}")
                return
            errors = [x for x in lines if "error" in x]
            counts = [x.get("num_pages") for x in lines if "error" not in x]
            if errors or len(lines) != len(pages) + 1 or not lines[-1].get("final"):
                r.failure(t.anomaly("stream_incomplete", pages=len(pages), lines=len(lines), errors=errors[:2]))
                return
            bad = [t.count_pages(STREAM, k + 1, c, False, line=k) for k, c in enumerate(counts[:-1])]
            bad.append(t.count_pages(STREAM, len(pages), counts[-1], True, line="final"))
            if any(bad):
                r.failure(next(b for b in bad if b))
        t.read("stream", len(pages))
        t.expected_resumes += len(pages) - 1
        t.docs["streams_completed"] += 1
        if self.rng.random() < p["check_p"]:
            self.compare_oneshot(model, pages, lines[-1], "stream")

    @task(2)
    def read_oneshot(self) -> None:
        model, pages = self.document()
        _, body, _ = self.call(CLASSIFY, "POST", "/v1/classify", expect_pages=len(pages), final=True,
                               json={"model": model, "pages": pages})
        if body is not None:
            self.tally.read("oneshot", len(pages))
            self.tally.docs["oneshots_completed"] += 1


# --- the server, its metrics and its processes -------------------------------------------------


def free_port() -> int:
    """Outside the kernel's ephemeral range, so none of the sockets Ray opens
    while the server starts can take it first (serve.cli.free_port)."""
    from serve.cli import free_port as pick

    return pick()


def replicas_config(models_dir: str | None, replicas: dict[str, int]) -> str:
    """A --config serving every model of models_dir (as `up` does without one) with the
    replica counts asked for; the path of its YAML."""
    import yaml

    from serve.config import discover_models, repo_models_dir

    found = discover_models(Path(models_dir) if models_dir else repo_models_dir())
    unknown = set(replicas) - {m.name for m in found}
    if unknown:
        raise SystemExit(f"error: --replicas names no model of the models directory: {sorted(unknown)}")
    args = {"models": [{"name": m.name, "path": m.path, "num_replicas": replicas.get(m.name, 1)} for m in found]}
    fd, path = tempfile.mkstemp(prefix="bsbr-load-config-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(args, f)
    return path


class Server:
    """`bsbr-serve up` (what `make up` runs) on free ports of 127.0.0.1, stopped with Ctrl-C's SIGINT."""

    def __init__(self, models_dir: str | None, config: str | None, ready_timeout_s: float,
                 replicas: dict[str, int] | None = None):
        self.port, self.metrics_port = free_port(), free_port()
        if replicas:
            config = replicas_config(models_dir, replicas)
        cmd = [str(Path(sys.executable).parent / "bsbr-serve"), "up", "--host", "127.0.0.1",
               "--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        cmd += ["--models-dir", models_dir] if models_dir else []
        cmd += ["--config", config] if config else []
        self.cmd = cmd
        self.log_path = Path(tempfile.mkstemp(prefix="bsbr-load-server-", suffix=".log")[1])
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        deadline = time.time() + ready_timeout_s
        while time.time() < deadline and self.proc.poll() is None and not STOP.is_set():
            try:
                if requests.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            STOP.wait(1)
        self.stop()
        why = "was interrupted" if STOP.is_set() else f"did not become ready in {ready_timeout_s:.0f} s"
        raise RuntimeError(f"the server {why}; its log:\n" + self.log_tail(60))

    def log_tail(self, n: int) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()
        return self.proc.returncode


def scrape(metrics_url: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} of a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(metrics_url, timeout=30).text
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def total(samples: dict[tuple, float], **match) -> float:
    """Sum of the samples whose labels include `match`."""
    return sum(v for labels, v in samples.items() if match.items() <= dict(labels).items())


def bsbr_counters(metrics_url: str) -> dict:
    """The counters the report needs, summed over replicas (Ray prefixes `ray_`)."""
    m = scrape(metrics_url)
    resumes = m.get("ray_bsbr_session_resumes_total", {})
    errors = m.get("ray_bsbr_errors_total", {})
    return {
        "resumes_hot": total(resumes, source="hot"),
        "resumes_store": total(resumes, source="store"),
        "errors_by_code": {c: total(errors, code=c) for c in sorted({dict(k).get("code", "?") for k in errors})},
    }


def wait_for_resumes(metrics_url: str, before: dict, expected: int, timeout_s: float) -> dict:
    """Counters after the load, once Ray's periodic export has caught up with the `expected`
    resumes (or they stopped moving for 30 s, or timeout_s passed)."""
    deadline, last, still_since = time.time() + timeout_s, None, time.time()
    while True:
        now = bsbr_counters(metrics_url)
        seen = now["resumes_hot"] + now["resumes_store"] - before["resumes_hot"] - before["resumes_store"]
        if seen >= expected or time.time() > deadline or STOP.is_set():
            return now
        if last is not None and now != last:
            still_since = time.time()
        if time.time() - still_since > 30:
            return now
        last = now
        STOP.wait(2)


def proc_table() -> dict[int, tuple[int, str]]:
    """{pid: (ppid, cmdline)} of every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            ppid = int(next(x for x in (d / "status").read_text().splitlines() if x.startswith("PPid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def process_name(title: str) -> str:
    """A Ray worker's title without the method it runs now (`ray::ServeReplica:app:bsbr.handle_request`
    is `ray::ServeReplica:app:bsbr`): one name per process for its whole life."""
    return title.split()[0].split(".", 1)[0]


def server_processes(root_pid: int) -> dict[int, str]:
    """{pid: process title} of the sampled Ray processes below root_pid."""
    table = proc_table()
    children = defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    found, todo = {}, [root_pid]
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            todo.append(c)
            title = table[c][1]
            if title.startswith(SAMPLED_PREFIXES):
                found[c] = process_name(title)
    return found


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Every `every_s`, the RSS of each sampled server process: from /proc below `root_pid`,
    or, without one, Ray's ray_component_rss_bytes (one series per process title, summed
    over processes of the same title). Beside it, from the metrics, what the replicas hold
    (sessions held hot per model, the session store's bytes), so that growth can be told
    from a working set."""

    def __init__(self, root_pid: int | None, metrics_url: str | None, every_s: float):
        self.root_pid, self.metrics_url, self.every_s = root_pid, metrics_url, every_s
        self.source = "/proc" if root_pid else "ray_component_rss_bytes"
        self.series: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self.held: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.t0 = time.monotonic()
        self.greenlet = None

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        if self.root_pid:
            for pid, title in server_processes(self.root_pid).items():
                rss = rss_bytes(pid)
                if rss is not None:
                    self.series[f"{title} (pid {pid})"].append((t, rss))
        if not self.metrics_url:
            return
        m = scrape(self.metrics_url)
        if not self.root_pid:
            now: Counter = Counter()
            for labels, v in m.get("ray_component_rss_bytes", {}).items():
                title = dict(labels).get("Component", "")
                if title.startswith(SAMPLED_PREFIXES):
                    now[process_name(title)] += int(v)
            for name, v in now.items():
                self.series[name].append((t, v))
        for metric, what in HELD_GAUGES:
            by_model: Counter = Counter()
            for labels, v in m.get(metric, {}).items():
                by_model[dict(labels).get("model")] += v
            for model, v in by_model.items():
                self.held[f"{what} ({model})" if model else what].append((t, v))

    def run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - a missed sample is not a failed run
                print(f"rss sample failed: {e}", file=sys.stderr)
            gevent.sleep(self.every_s)

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.greenlet = gevent.spawn(self.run)

    def stop(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill()
        self.sample()

    def growth(self, from_s: float) -> dict[str, dict]:
        """Per process: RSS at the first sample at or after from_s, at the end, and the change."""
        out = {}
        for name, pts in self.series.items():
            later = [p for p in pts if p[0] >= from_s]
            if len(later) < 2:
                out[name] = {"from_s": None, "note": f"fewer than 2 samples after {from_s:.0f} s"}
                continue
            (t_a, a), (t_b, b) = later[0], later[-1]
            out[name] = {"from_s": t_a, "to_s": t_b, "rss_from_mib": a / 2**20, "rss_to_mib": b / 2**20,
                         "growth_mib": (b - a) / 2**20, "growth_pct": 100.0 * (b - a) / a if a else None,
                         "rss_max_mib": max(v for _, v in pts) / 2**20}
        return out


# --- the run ------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), None)
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_bytes": mem, "platform": platform.platform(),
            "python": platform.python_version()}


def code_version() -> dict:
    """The commit the server ran, and the served code's files that differed from it."""
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
            return out.stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--", "serve", "bsbr_core", "models").splitlines()
    return {"commit": git("rev-parse", "HEAD").strip() or None, "uncommitted": [x[3:] for x in changed if x.strip()]}


def latency_table(tally: Tally) -> dict[str, dict]:
    out = {}
    for name in REQUEST_TYPES:
        xs = np.array(tally.latency_ms.get(name, []), dtype=float)
        codes = tally.status.get(name, Counter())
        ok = codes.get(str(EXPECTED_STATUS.get(name, 200)), 0)
        row = {"count": int(xs.size), "ok": ok, "status": dict(sorted(codes.items()))}
        if xs.size:
            p50, p95, p99 = np.percentile(xs, [50, 95, 99])
            row.update(p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99), mean_ms=float(xs.mean()),
                       max_ms=float(xs.max()))
        out[name] = row
    return out


def run(a: argparse.Namespace) -> dict:
    result: dict = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
                    "code": code_version(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    server = None
    if a.url:
        url, metrics_url, root_pid = a.url.rstrip("/"), a.metrics_url, a.server_pid
        result["server"] = {"url": url, "metrics_url": metrics_url, "started_here": False}
        if root_pid:  # what the server was started with: its flags are part of the result
            try:
                argv = Path(f"/proc/{root_pid}/cmdline").read_bytes().split(b"\0")
                result["server"]["command"] = shlex.join(x.decode(errors="replace") for x in argv if x)
            except OSError:
                pass
    else:
        print("starting bsbr-serve up ...", flush=True)
        server = Server(a.models_dir, a.config, a.ready_timeout_s, a.replicas)
        url, metrics_url, root_pid = server.url, server.metrics_url, server.proc.pid
        result["server"] = {"url": url, "metrics_url": metrics_url, "started_here": True,
                            "command": shlex.join(server.cmd), "replicas": a.replicas, "log": str(server.log_path)}
    try:
        models = [m["name"] for m in requests.get(f"{url}/v1/models", timeout=60).json()["models"]]
        use = [m for m in a.models.split(",") if m]
        missing = set(use) - set(models)
        if missing:
            raise SystemExit(f"error: the server has no model {sorted(missing)} (it has {models})")
        for m in use:  # warm-up, outside the measurement
            requests.post(f"{url}/v1/classify", json={"model": m, "pages": ["warm up"]}, timeout=600).raise_for_status()
        plan = {"models": use, "seed": a.seed, "min_pages": a.min_pages, "max_pages": a.max_pages,
                "min_words": a.min_words, "max_words": a.max_words, "retry_p": a.retry_p, "get_p": a.get_p,
                "multi_page_p": a.multi_page_p, "check_p": a.check_p, "logit_tol": a.logit_tol,
                "timeout_s": a.timeout_s, "think_s": a.think_s}
        result.update(users=a.users, duration_s=a.duration_s, plan=plan)
        result["load_average_before"] = list(os.getloadavg())
        before = bsbr_counters(metrics_url) if metrics_url else None

        Reader.wait_time = between(0, a.think_s)
        env = Environment(user_classes=[Reader], host=url, stop_timeout=a.stop_timeout_s)
        env.plan, env.tally = plan, Tally()
        env.events.request.add_listener(env.tally.on_request)
        sampler = RssSampler(root_pid, metrics_url, a.sample_s)
        runner = env.create_local_runner()
        print(f"load: {a.users} users for {a.duration_s:.0f} s against {url} (models {', '.join(use)})", flush=True)
        t0 = time.monotonic()
        sampler.start()
        runner.start(a.users, spawn_rate=max(1.0, a.users / 5))
        while time.monotonic() - t0 < a.duration_s and not STOP.is_set():
            STOP.wait(min(10.0, a.duration_s - (time.monotonic() - t0)))
            pages = sum(env.tally.pages.values())
            print(f"  {time.monotonic() - t0:5.0f} s  {pages} pages  {sum(env.tally.docs.values())} documents  "
                  f"{len(env.tally.anomalies)} anomalies", flush=True)
        runner.quit()  # users finish the document they are reading (up to --stop-timeout-s)
        elapsed = time.monotonic() - t0
        result["interrupted"] = STOP.is_set()
        sampler.stop()
        result["load_average_after"] = list(os.getloadavg())
        tally = env.tally
        # Exceptions raised in the users' own code (Locust logs and counts them): a broken client.
        result["client_exceptions"] = [{"count": e["count"], "msg": e["msg"], "traceback": e["traceback"][-2000:]}
                                       for e in runner.exceptions.values()]

        after = (wait_for_resumes(metrics_url, before, tally.expected_resumes, a.settle_timeout_s)
                 if metrics_url else None)
    finally:
        if server is not None:
            result["server"]["exit_code"] = server.stop()
            result["server"]["log_tail"] = server.log_tail(40).splitlines()

    statuses = Counter()
    for codes in tally.status.values():
        statuses.update(codes)
    pages = sum(tally.pages.values())
    # Pages/s over time, in whole windows of --sample-s from the start of the load.
    windows = Counter(int((t - t0) // a.sample_s) for t in tally.page_times)
    result.update({
        "elapsed_s": elapsed,
        "requests": latency_table(tally),
        "status_counts": dict(sorted(statuses.items())),
        "errors_by_status": {c: n for c, n in sorted(statuses.items()) if c not in ("200", "201")},
        "server_errors_5xx": sum(n for c, n in statuses.items() if c.startswith("5")),
        "no_answer": statuses.get("0", 0),
        "pages": {**dict(tally.pages), "total": pages},
        "pages_per_s": pages / elapsed,
        "pages_per_s_over_time": {"window_s": a.sample_s,
                                  "values": [windows.get(k, 0) / a.sample_s for k in range(int(elapsed // a.sample_s))]},
        "documents": dict(tally.docs),
        "integrity": {"lost_pages": tally.lost_pages, "doubled_pages": tally.doubled_pages,
                      "retries": tally.retries, "oneshot_checks": tally.checks,
                      "oneshot_mismatches": tally.check_mismatches, "max_logit_diff": tally.max_logit_diff,
                      "logit_tol": a.logit_tol, "anomalies": len(tally.anomalies),
                      "anomaly_examples": tally.anomalies[:20]},
    })
    if before is not None and after is not None:
        hot = after["resumes_hot"] - before["resumes_hot"]
        store = after["resumes_store"] - before["resumes_store"]
        result["metrics"] = {"before": before, "after": after, "resumes_hot": hot, "resumes_store": store,
                             "resumes_expected": tally.expected_resumes,
                             "hot_hit_rate": hot / (hot + store) if hot + store else None}
    else:
        result["metrics"] = None
    result["rss"] = {"source": sampler.source, "sample_s": a.sample_s, "growth_from_s": a.growth_from_s,
                     "growth": sampler.growth(a.growth_from_s),
                     "series": {k: [[round(t, 2), v] for t, v in pts] for k, pts in sampler.series.items()},
                     "held": {k: [[round(t, 2), v] for t, v in pts] for k, pts in sampler.held.items()}}
    return result


def summary(r: dict) -> str:
    lines = [(f"{r['users']} users, {r['elapsed_s']:.0f} s, {r['pages']['total']} pages = {r['pages_per_s']:.2f} "
              f"pages/s (load average {r['load_average_before'][0]:.2f} before, "
              f"{r['load_average_after'][0]:.2f} after)")]
    lines.append(f"{'request':<56}{'count':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}  status")
    for name, row in r["requests"].items():
        q = [f"{row[k]:>9.0f}" if k in row else f"{'-':>9}" for k in ("p50_ms", "p95_ms", "p99_ms")]
        lines.append(f"{name:<56}{row['count']:>7}{''.join(q)}  {row['status']}")
    i = r["integrity"]
    lines.append(f"5xx: {r['server_errors_5xx']}  no answer: {r['no_answer']}  other errors: {r['errors_by_status']}")
    lines.append(f"lost pages: {i['lost_pages']}  doubled pages: {i['doubled_pages']}  retries: {i['retries']}  "
                 f"one-shot checks: {i['oneshot_checks']} ({i['oneshot_mismatches']} differ, max |dlogit| "
                 f"{i['max_logit_diff']:.2e})  anomalies: {i['anomalies']}")
    m = r.get("metrics")
    if m:
        rate = "n/a" if m["hot_hit_rate"] is None else f"{m['hot_hit_rate']:.4f}"
        lines.append(f"resumes: hot {m['resumes_hot']:.0f}, store {m['resumes_store']:.0f} (expected "
                     f"{m['resumes_expected']}): hot hit rate {rate}")
    lines.append(f"RSS growth from {r['rss']['growth_from_s']:.0f} s to the end ({r['rss']['source']}):")
    for name, g in sorted(r["rss"]["growth"].items()):
        if g.get("from_s") is None:
            lines.append(f"  {name:<52} {g['note']}")
        else:
            lines.append(f"  {name:<52} {g['rss_from_mib']:8.1f} -> {g['rss_to_mib']:8.1f} MiB "
                         f"({g['growth_mib']:+.1f} MiB, max {g['rss_max_mib']:.1f})")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Each sampled process's RSS over the run, and pages/s over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hx, bx) = plt.subplots(3, 1, figsize=(11, 9), sharex=True, gridspec_kw={"height_ratios": [3, 1, 1]})
    colors = plt.get_cmap("tab20").colors
    for k, (name, pts) in enumerate(sorted(r["rss"]["series"].items())):
        if pts:
            ts, vs = zip(*pts)
            ax.plot(ts, [v / 2**20 for v in vs], label=name, color=colors[k % len(colors)])
    ax.axvline(r["rss"]["growth_from_s"], color="grey", ls=":", lw=1, label="growth measured from here")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"server processes under load: {r['users']} users, {r['elapsed_s']:.0f} s "
                 f"({r['rss']['source']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for name, pts in sorted(r["rss"].get("held", {}).items()):
        if pts and name.startswith("hot sessions"):
            ts, vs = zip(*pts)
            hx.step(ts, vs, where="post", label=name)
    hx.set_ylabel("sessions held hot")
    hx.grid(alpha=0.3)
    if hx.lines:
        hx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    w = r["pages_per_s_over_time"]
    if w["values"]:  # each window's rate drawn across its window
        n = len(w["values"])
        bx.step([k * w["window_s"] for k in range(n + 1)], [*w["values"], w["values"][-1]], where="post")
    bx.set_ylabel("pages/s")
    bx.set_xlabel("seconds since the load started")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=32, help="concurrent clients")
    p.add_argument("--duration-s", type=float, default=600.0, help="how long users start new documents")
    p.add_argument("--models", default="bsbr,standard", help="models the documents go to (one per document)")
    p.add_argument("--url", default=None, help="a running server (default: start bsbr-serve up here)")
    p.add_argument("--metrics-url", default=None, help="its Prometheus metrics (with --url)")
    p.add_argument("--server-pid", type=int, default=None,
                   help="with --url: the bsbr-serve up process, to sample its replicas' RSS from /proc")
    p.add_argument("--models-dir", default=None, help="models for the server started here (default models/)")
    p.add_argument("--config", default=None, help="--config for the server started here")
    p.add_argument("--replicas", default=None,
                   help="NAME=N,...: replicas per model for the server started here (default 1 each, as "
                        "`make up`); e.g. bsbr=2 puts session affinity, and so the hot hit rate, to the test")
    p.add_argument("--min-pages", type=int, default=2)
    p.add_argument("--max-pages", type=int, default=24)
    p.add_argument("--min-words", type=int, default=40, help="words per page (about 1.3 tokens each)")
    p.add_argument("--max-words", type=int, default=300)
    p.add_argument("--retry-p", type=float, default=0.1, help="chance an append is sent again with its seq")
    p.add_argument("--get-p", type=float, default=0.1, help="chance of a GET after an append")
    p.add_argument("--multi-page-p", type=float, default=0.2, help="chance an append carries 2-3 pages")
    p.add_argument("--check-p", type=float, default=0.25,
                   help="share of sessions and streams whose final answer is checked against a one-shot classify")
    p.add_argument("--logit-tol", type=float, default=1e-4)
    p.add_argument("--think-s", type=float, default=0.5, help="each user waits 0..think-s between documents")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per request; beyond it: no answer (0)")
    p.add_argument("--stop-timeout-s", type=float, default=180.0,
                   help="after --duration-s, how long users may take to finish their document")
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling and pages/s window")
    p.add_argument("--growth-from-s", type=float, default=120.0, help="RSS growth is measured from here to the end")
    p.add_argument("--ready-timeout-s", type=float, default=300.0)
    p.add_argument("--settle-timeout-s", type=float, default=90.0,
                   help="how long to wait for Ray's metrics export to catch up after the load")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.json"))
    p.add_argument("--replot", action="store_true", help="only redraw the table and PNG from --out")
    a = p.parse_args()
    # Handlers of our own: a background job inherits SIGINT ignored, and SIGTERM would end the
    # process without stopping the server it started.
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, STOP.set)
    out = Path(a.out)
    if a.replot:
        r = json.loads(out.read_text())
        plot(r, out.with_suffix(".png"))
        print(summary(r))
        return 0
    if not 1 <= a.min_pages <= a.max_pages or not 1 <= a.min_words <= a.max_words or a.users < 1:
        p.error("need 1 <= --min-pages <= --max-pages, 1 <= --min-words <= --max-words and --users >= 1")
    try:
        a.replicas = {k: int(v) for k, v in (x.split("=", 1) for x in a.replicas.split(",") if x)} \
            if a.replicas else None
    except ValueError:
        p.error("--replicas is NAME=N[,NAME=N...]")
    if a.replicas and (a.url or a.config):
        p.error("--replicas sets up the server started here from the models directory: not with --url or --config")
    if a.url and not a.metrics_url:
        print("note: without --metrics-url there is no hot hit rate, and RSS only with --server-pid", file=sys.stderr)
    r = run(a)
    out.parent.mkdir(parents=True, exist_ok=True)
    r["png"] = str(out.with_suffix(".png"))
    out.write_text(json.dumps(r, indent=2) + "\n")
    plot(r, out.with_suffix(".png"))
    print(summary(r))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
