"""Serving latency and throughput of bsbr vs standard, as deployed (issue 4's closing note).

Starts a local Ray and serves the application in each topology of
--topologies (default `split,fused`, serve.config AppConfig.topology) in
turn, in the same run, one replica per model, the machine's cores for torch.
For each one it measures over real HTTP on 127.0.0.1:

1. one-shot classify latency of a 10-page and a 100-page document (best of
   3), and the same 100-page document read in-process one-shot
   (`model(ids)`, no server): `oneshot_over_inprocess` is the server's wall
   time over that (target <= 1.3). Both sides read the document once, untimed,
   before the 3 timed reads (`first_http_ms`, `first_ms`): a process's first
   document of that size allocates what the next ones reuse (before 7fcd739
   the server had no such read and the in-process one a 512-token one);
2. per-page latency along `--stream-repeats` (3) streamed documents (a
   session, page by page), reported at pages 1, 50 and 200 as the median
   over the documents: `page_ms` is the model step (what
   bsbr_page_latency_seconds records), `request_ms` the whole HTTP request
   including the checkpoint of the state to the session store, and
   `request_over_step` their ratio (target <= 1.5 at pages 1 and 200);
3. throughput (pages/s) of 8 documents of 12 pages read by 1 session at a
   time vs 8 concurrent sessions (best of `--repeats` 3 runs);
4. HTTP end-to-end throughput of (3, 8 concurrent) as a fraction of the
   engine's in-process throughput on the same documents (same engine code,
   an in-memory store, no Ray, no HTTP, best of 3 runs too):
   `http_over_engine` (target >= 0.8). Each throughput run records how busy
   the machine was (`cpu`: busy and stolen shares of the cores, CPU ms per
   page of the machine and of this process, from /proc).

The requests are sent with `--client lean` (default: LeanClient, on
http.client) or `--client httpx`. The load generator runs on the same cores as
the server; httpx's own work, 3.2 ms of CPU per page at 8 concurrent
sessions here against 0.3-0.4 ms for LeanClient, so the figures moved with the
client (`client` in each throughput result; the JSONs of before the option
were taken with httpx).

Each topology is served behind each ingress of --ingresses (default
`serve,haproxy`: Serve's Python HTTP proxy, and Serve's HAProxy ingress as
`bsbr-serve up --ingress haproxy` starts it), one Ray per ingress. Results
are under `servers.<topology>` (Serve's proxy) and
`servers.<topology>+haproxy`; the in-process references are shared.

`--layouts RxT,...` serves each topology once per layout: R replicas of T
torch threads each (in fused the ingress's replicas, which hold the models;
in split each model's), under `servers.<name> RxT`; by default one replica
with every core for torch. On 2 cores, `1x2` against `2x1` is one process
whose OpenMP team spans both cores against two that use one each
(README, "Replicas and threads"). `RxT/O` also reads one-shot documents on O
torch threads (ModelSpec.oneshot_torch_threads): `2x1/2` is two replicas of
one thread whose one-shot classifies use both cores.

Page 1 is also measured over `--page1-sessions` (12) more sessions of 2
pages each, one after the other (`page1_sessions`: the median of their page
1's request over step): the streamed documents give only `--stream-repeats`
samples of it.

`--redis-url URL` keeps the sessions in that running Redis (`sessions.store:
redis`) instead of the default store actor; the JSON's `sessions` says which.

The JSON records the load average before and after the run (`loadavg`):
figures taken on a loaded machine are only comparable side by side.

A page is about `page_tokens` (512) tokens of generated prose, sent as an
element of `pages`. Models: `--models-dir` (default models/), else random-init
reference-size models (hidden 256, 4 layers, chunk 128, vocab 16384) written
to a temporary directory, labelled untrained in the JSON.

    python bench/serve_latency.py                      # writes bench/results/serve_latency.json
    python bench/serve_latency.py --quick              # bsbr only (a few minutes)
    python bench/serve_latency.py --smoke              # tiny sizes, a smoke run
    python bench/serve_latency.py --cpu-profile        # where a page request's CPU goes (below)

`--cpu-profile` starts `bsbr-serve up --topology T` for each topology
(every model under --models-dir, as `make up` does), sends 40 sequential session pages of ~680 tokens to bsbr
and then 40 one-shot classifies of the same text, and reads each server
process's CPU time (utime + stime, /proc/<pid>/stat) before and after:
CPU ms per request of the proxy, the `api` ingress, the Serve controller,
the bsbr replica, the session store actor, the GCS and the raylet, next to
the request's wall time and the model step it reports. Writes
bench/results/serve_cpu_profile.json.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve.cli import free_port as pick_free_port
from serve.cli import haproxy_env, haproxy_run_dir, ray_env_defaults
from serve.config import ModelSpec, SessionConfig, discover_models, is_trained
from serve.devmodels import sample_text, write_random_models


def free_port() -> int:
    return pick_free_port()  # outside the ephemeral range: Ray's sockets cannot take it first


def wait_ready(url: str, proc, timeout_s: float, what: str) -> None:
    """Until GET {url}/readyz answers 200; SystemExit if `proc` exits or timeout_s passes first."""
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            raise SystemExit(f"{what} never became ready")
        time.sleep(0.5)


@contextlib.contextmanager
def bsbr_serve_up(models_dir: str | Path, topology: str | None = None, ingress: str = "serve",
                  env: dict[str, str] | None = None, ready_s: float = 600, code_dir: str | Path | None = None,
                  config: str | Path | None = None):
    """`bsbr-serve up` serving every model of models_dir on a free port of
    127.0.0.1, as `make up` does; yields (url, its process) once /readyz
    answers 200, and stops it with Ctrl-C (SIGINT) after. `code_dir`: serve the
    bsbr-serve code of that checkout (a git worktree of another commit) instead of
    this one's: it is the server's working directory and first on its PYTHONPATH,
    which its Ray workers inherit. `config`: serve that --config file instead of models_dir."""
    import signal
    import subprocess

    port = free_port()
    argv = [sys.executable, "-m", "serve.cli", "up", "--host", "127.0.0.1", "--port", str(port),
            *(["--config", str(config)] if config else ["--models-dir", str(models_dir)]),
            "--metrics-port", str(free_port()), "--ingress", ingress]
    env = {**os.environ, **(env or {})}
    if code_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(code_dir), env.get("PYTHONPATH", "")) if x)
    up = subprocess.Popen(argv + (["--topology", topology] if topology else []), cwd=str(code_dir or ROOT),
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, up, ready_s, f"bsbr-serve up ({topology or 'its'} topology, {ingress} ingress)")
        yield url, up
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(120)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(30)


class LeanResponse:
    """What the measurements read of an answer (the part of httpx.Response they use)."""

    def __init__(self, status_code: int, content: bytes, method: str, path: str):
        self.status_code, self.content, self._what = status_code, content, f"{method} {path}"

    def json(self):
        return json.loads(self.content)

    def raise_for_status(self) -> LeanResponse:
        if self.status_code >= 400:
            raise RuntimeError(f"{self._what} answered {self.status_code}: {self.content[:300]!r}")
        return self


class LeanClient:
    """A keep-alive HTTP/1.1 client on the standard library's http.client, with
    the calls of httpx.Client that the measurements make (post(json=), delete,
    a context manager). The load generator shares the machine's cores with the
    server it measures; with httpx the bench process took 3.2 ms of CPU per
    page at 8 concurrent sessions here, with this client 0.3-0.4 ms
    (bench/results/serve_latency_httpx_client.json against
    serve_latency_idle_teams.json). `--client httpx` measures with httpx.

    A request sent over a kept-alive connection that the server had already
    closed (its keep-alive timeout) is sent again once on a new connection;
    every request the measurements repeat this way is idempotent or harmless
    (a session page by its seq, a session created and never used)."""

    def __init__(self, base_url: str, timeout: float = 600):
        from urllib.parse import urlsplit

        u = urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"LeanClient speaks plain http to a host: {base_url!r}")
        self.host, self.port, self.timeout = u.hostname, u.port or 80, timeout
        self._conn = None

    def request(self, method: str, path: str, json_body=None) -> LeanResponse:
        import http.client

        body = None if json_body is None else json.dumps(json_body).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (0, 1):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=headers)
                r = self._conn.getresponse()
                content = r.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if reused and attempt == 0:
                    continue  # the server had closed the idle connection: once more on a new one
                raise
            if r.will_close:
                self.close()
            return LeanResponse(r.status, content, method, path)
        raise AssertionError("unreachable")

    def post(self, path: str, json=None) -> LeanResponse:
        return self.request("POST", path, json)

    def get(self, path: str) -> LeanResponse:
        return self.request("GET", path)

    def delete(self, path: str) -> LeanResponse:
        return self.request("DELETE", path)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> LeanClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def http_client(kind: str, base_url: str, timeout: float = 600):
    """The measurements' HTTP client: `lean` (LeanClient) or `httpx`."""
    if kind == "lean":
        return LeanClient(base_url, timeout)
    if kind == "httpx":
        return httpx.Client(base_url=base_url, timeout=timeout)
    raise ValueError(f"unknown client {kind!r}: lean or httpx")


def machine_cpu() -> dict[str, int]:
    """The machine's CPU time so far, in clock ticks of all cores together
    (/proc/stat): busy (user, nice, system, irq, softirq), steal (time the
    hypervisor gave another guest) and all (idle and iowait included)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return {"busy": user + nice + system + irq + softirq, "steal": steal,
            "all": user + nice + system + idle + iowait + irq + softirq + steal}


def cpu_use(before: dict[str, int], after: dict[str, int], pages: int, proc_cpu_s: float) -> dict:
    """How busy the machine was between two machine_cpu() readings: busy and
    stolen shares of all cores, and the CPU ms per page of the whole machine
    and of this process (the load generator, or the in-process engine)."""
    hz = os.sysconf("SC_CLK_TCK")
    d = {k: after[k] - before[k] for k in before}
    return {"machine_busy_share": d["busy"] / max(d["all"], 1), "steal_share": d["steal"] / max(d["all"], 1),
            "machine_cpu_ms_per_page": d["busy"] * 1000 / hz / pages,
            "this_process_cpu_ms_per_page": proc_cpu_s * 1000 / pages}


def git_revision() -> str | None:
    """The checkout's commit, with "+changes" when its tracked files differ from it."""
    import subprocess

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT), capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=str(ROOT), check=False).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+changes" if dirty else "")


def machine() -> dict:
    """The machine a bench ran on, as every bench's JSON records it."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def write_result(out: dict, path: str | Path) -> None:
    """Record the load average after the run (and the code's commit) in `out` and write it as JSON to `path`."""
    out["loadavg"]["after"] = list(os.getloadavg())
    out.setdefault("code", git_revision())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
    print(f"load average before {out['loadavg']['before']}, after {out['loadavg']['after']}; wrote {path}")


def make_text(tokenizer, n_tokens: int, seed: int) -> str:
    """Generated prose of at least n_tokens tokens."""
    import random

    rng = random.Random(seed)
    parts, have = [], 0
    while have < n_tokens:
        chunk = sample_text(rng, 400)
        parts.append(chunk)
        have += len(tokenizer.encode(chunk, add_special_tokens=False).ids)
    text = "\n".join(parts)
    ids = tokenizer.encode(text, add_special_tokens=False).ids[:n_tokens]
    return tokenizer.decode(ids)


@contextlib.contextmanager
def local_serve(ingress: str, object_store_mb: int):
    """A local Ray with Serve's HTTP on a free port of 127.0.0.1, started as
    `bsbr-serve up` starts it (serve.cli.ray_env_defaults; for ingress "haproxy"
    Serve's HAProxy ingress, which is chosen when Ray starts); yields the port,
    and shuts Serve and Ray down and restores the environment after."""
    import ray
    from ray import serve

    saved, run_dir = dict(os.environ), haproxy_run_dir()
    if ingress == "haproxy":
        os.environ.update(haproxy_env(run_dir))
    ray_env_defaults()
    port = free_port()
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 2) + 4, include_dashboard=False,
             _metrics_export_port=free_port(), object_store_memory=object_store_mb << 20,
             logging_level="warning", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(run_dir, ignore_errors=True)


def page_texts(tokenizer, text: str, page_tokens: int) -> list[str]:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return [tokenizer.decode(ids[i : i + page_tokens]) for i in range(0, len(ids), page_tokens)]


class Bench:
    def __init__(self, args):
        self.args = args
        self.replicas = 1  # of the server being measured (its warm-up reaches each one)
        self.results: dict = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                              "machine": machine(),
                              "loadavg": {"before": list(os.getloadavg())},
                              "code": git_revision(),  # at the start: what the servers run
                              "sessions": "redis" if getattr(args, "redis_url", None) else "ray_actor"}

    # --- setup ---------------------------------------------------------------------------

    def models(self) -> tuple[Path, bool]:
        root = Path(self.args.models_dir) if self.args.models_dir else ROOT / "models"
        found = discover_models(root)
        names = {s.name for s in found}
        if {"bsbr", "standard"} <= names:
            trained = all(is_trained(root / n) for n in ("bsbr", "standard"))
            return root, trained
        tmp = Path(tempfile.mkdtemp(prefix="bsbr-bench-models-"))
        size = "tiny" if self.args.smoke else "reference"
        print(f"no bsbr+standard under {root}: writing random-init {size} models to {tmp}", flush=True)
        write_random_models(tmp, ("bsbr", "standard"), size=size, vocab_size=16384 if size == "reference" else 300)
        return tmp, False

    def app_args(self, root: Path, topology: str, layout: tuple[int, int] | None = None) -> dict:
        """The application as served: `layout` (replicas, torch threads per replica),
        default one replica with every core for torch. In split the replicas are each
        model's, in fused the ingress deployment's (which holds the models)."""
        cpus = os.cpu_count() or 2
        replicas, threads, oneshot = (*layout, None)[:3] if layout else (1, cpus, None)  # (R, T) or (R, T, O)
        max_tokens = (self.args.stream_pages + 8) * self.args.page_tokens
        common = {"page_tokens": self.args.page_tokens, "max_tokens": max(max_tokens, 110 * self.args.page_tokens),
                  "torch_threads": threads, "ray_actor_options": {"num_cpus": 1}, "max_batch_size": 16,
                  **({"oneshot_torch_threads": oneshot} if oneshot else {}),
                  **({"num_replicas": replicas} if topology == "split" else {})}
        return {
            "models": [{"name": n, "path": str(root / n), **common} for n in ("bsbr", "standard")],
            "sessions": {"max_store_bytes": 16 << 30, "store_name": f"bench_store_{os.getpid()}",
                         **({"store": "redis", "redis_url": self.args.redis_url}
                            if getattr(self.args, "redis_url", None) else {})},
            "http": {"max_body_bytes": 64 << 20},
            "ingress": {"ray_actor_options": {"num_cpus": 0.5},
                        **({"num_replicas": replicas} if topology == "fused" else {})},
            "topology": topology,
        }

    # --- measurements -------------------------------------------------------------------------

    def oneshot(self, c, model: str, pages: list[str], repeats: int = 3) -> dict:
        """The document in one classify request: the best of `repeats` after one
        untimed read of it by each replica (`first_http_ms`, their mean: a replica's
        first document of this size allocates the memory that the next ones reuse),
        as the in-process reference is taken."""
        n_pages, walls = len(pages), []
        t0 = time.perf_counter()
        for _ in range(getattr(self, "replicas", 1)):  # one per replica: classify is balanced round robin
            c.post("/v1/classify", json={"model": model, "pages": pages}).raise_for_status()
        first = (time.perf_counter() - t0) * 1000 / getattr(self, "replicas", 1)
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = c.post("/v1/classify", json={"model": model, "pages": pages})
            walls.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            body = r.json()
        return {"pages": n_pages, "tokens": body["num_tokens"], "http_ms": min(walls), "all_http_ms": walls,
                "first_http_ms": first, "server_ms": body["timing"]["total_ms"],
                "peak_memory_bytes": body["peak_memory_bytes"], "state_bytes": body["state_bytes"]}

    def stream(self, c, model: str, pages: list[str]) -> dict:
        sid = c.post("/v1/sessions", json={"model": model}).json()["session_id"]
        page_ms, request_ms, state_bytes = [], [], []
        for i, p in enumerate(pages):
            t0 = time.perf_counter()
            r = c.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [p]})
            request_ms.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            body = r.json()
            page_ms.append(body["timing"]["page_ms"][0])
            state_bytes.append(body["state_bytes"])
            if (i + 1) % 25 == 0:
                print(f"    {model}: page {i + 1}/{len(pages)}  step {page_ms[-1]:.0f} ms  "
                      f"request {request_ms[-1]:.0f} ms  state {state_bytes[-1] / 2**20:.1f} MiB", flush=True)
        c.delete(f"/v1/sessions/{sid}")
        at = {str(k): {"page_ms": page_ms[k - 1], "request_ms": request_ms[k - 1], "state_bytes": state_bytes[k - 1],
                       "request_over_step": request_ms[k - 1] / page_ms[k - 1]}
              for k in (1, 50, 200) if k <= len(pages)}
        return {"at_page": at, "page_ms": page_ms, "request_ms": request_ms, "state_bytes": state_bytes}

    def inprocess_oneshot(self, root: Path, model: str, pages: list[str], repeats: int = 3) -> dict:
        """The document read by the model in this process, one-shot: `model(ids)` (best of
        `repeats` after one untimed read of the whole document, `first_ms`, as the server's
        are taken; `ms`, the reference), and in steps of 4096 tokens (`steps_4096_ms`,
        what the engine's one-shot runs). On a thread of its own that ends before the
        in-process engine starts: a thread's OpenMP team lives as long as the thread, and
        a second team in this process would slow the engine reference (docs/architecture.md 3.9)."""
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from bsbr_core import load_model

        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference")

        def on_torch_thread(fn):
            return thread.submit(fn).result()

        torch.set_num_threads(os.cpu_count() or 2)
        m, tok = on_torch_thread(lambda: load_model(root / model))
        ids = torch.tensor([[i for p in pages for i in tok.encode(p, add_special_tokens=False).ids]])

        def best(fn) -> tuple[float, list[float]]:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
            return min(times), times

        def stepped():
            state = m.init_state(1)
            for lo in range(0, ids.shape[1], 4096):
                _, state = m.step(ids[:, lo : lo + 4096], state)

        def measure():
            with torch.no_grad():  # thread-local: inside the torch thread's call
                t0 = time.perf_counter()
                m(ids)  # warm-up: the whole document, as the server's first read
                first = (time.perf_counter() - t0) * 1000
                return first, best(lambda: m(ids)), best(stepped)

        try:
            first, (ms, all_ms), (steps_ms, _) = on_torch_thread(measure)
        finally:
            thread.shutdown(wait=True)
        return {"pages": len(pages), "tokens": int(ids.shape[1]), "ms": ms, "all_ms": all_ms, "first_ms": first,
                "steps_4096_ms": steps_ms}

    def http_throughput(self, url: str, model: str, docs: list[list[str]], concurrency: int) -> dict:
        """pages/s for reading every doc as a session, `concurrency` sessions at a time
        (the best of `repeats` runs, as for the engine)."""

        def once() -> float:
            todo = list(docs)
            lock = threading.Lock()
            failures: list[BaseException] = []

            def worker():
                try:
                    with http_client(self.args.client, url, timeout=3600) as c:
                        while True:
                            with lock:
                                if not todo:
                                    return
                                pages = todo.pop()
                            sid = c.post("/v1/sessions", json={"model": model}).json()["session_id"]
                            for i, p in enumerate(pages):
                                c.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [p]}).raise_for_status()
                            c.delete(f"/v1/sessions/{sid}")
                except BaseException as e:  # noqa: BLE001 - reported below, not lost with the thread
                    failures.append(e)

            cpu0, proc0, t0 = machine_cpu(), time.process_time(), time.perf_counter()
            threads = [threading.Thread(target=worker) for _ in range(concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if failures:
                raise failures[0]
            secs = time.perf_counter() - t0
            return secs, cpu_use(cpu0, machine_cpu(), n, time.process_time() - proc0)

        n = sum(len(d) for d in docs)
        runs = [once() for _ in range(self.args.repeats)]
        best = min(range(len(runs)), key=lambda i: runs[i][0])
        secs = runs[best][0]
        return {"concurrency": concurrency, "pages": n, "seconds": secs, "all_seconds": [r[0] for r in runs],
                "pages_per_s": n / secs, "client": self.args.client,
                "cpu": runs[best][1]}  # this process: the load generator (and the Ray driver, idle)

    def engine_throughput(self, root: Path, model: str, docs: list[list[str]], concurrency: int) -> dict:
        """The same sessions through the engine in this process (memory store, no HTTP, no Ray)."""
        import torch

        from serve.engine import load_engine
        from serve.store import MemorySessionStore

        torch.set_num_threads(os.cpu_count() or 2)
        spec = ModelSpec(name=model, path=str(root / model), page_tokens=self.args.page_tokens,
                         max_tokens=(self.args.stream_pages + 8) * self.args.page_tokens, max_batch_size=16)
        eng = load_engine(model, spec, SessionConfig(max_store_bytes=16 << 30), MemorySessionStore(max_store_bytes=16 << 30))

        async def go():
            sem = asyncio.Semaphore(concurrency)

            async def read(pages):
                async with sem:
                    sid = (await eng.create_session())["session_id"]
                    for i, p in enumerate(pages):
                        await eng.append(sid, i, pages=[p])
                    await eng.close(sid)

            await read(docs[0][:1])  # warm-up
            out = []
            for _ in range(self.args.repeats):
                cpu0, proc0, t0 = machine_cpu(), time.process_time(), time.perf_counter()
                await asyncio.gather(*(read(d) for d in docs))
                secs = time.perf_counter() - t0
                out.append((secs, cpu_use(cpu0, machine_cpu(), n, time.process_time() - proc0)))
            return out

        n = sum(len(d) for d in docs)
        try:
            runs = asyncio.run(go())
        finally:
            eng.shutdown()  # its OpenMP team with it: the next engine here must be the only one
        best = min(range(len(runs)), key=lambda i: runs[i][0])
        secs = runs[best][0]
        return {"concurrency": concurrency, "pages": n, "seconds": secs, "all_seconds": [r[0] for r in runs],
                "pages_per_s": n / secs, "batches": eng.batcher.batches, "batched_steps": eng.batcher.batched_steps,
                "cpu": runs[best][1]}

    def server(self, url: str, all_pages: list[str], docs: list[list[str]]) -> dict:
        """Every HTTP measurement against the application being served at url."""
        a, out = self.args, {}
        with http_client(a.client, url, timeout=7200) as c:
            for m in ("bsbr", "standard"):  # warm-up, of every replica (classify is balanced round robin)
                for _ in range(2 * self.replicas):
                    c.post("/v1/classify", json={"model": m, "pages": ["warm up"]}).raise_for_status()
            for m in a.models:
                print(f"[{m}] one-shot classify", flush=True)
                out.setdefault("oneshot", {})[m] = {str(n): self.oneshot(c, m, all_pages[:n]) for n in (10, 100)}
                print(f"[{m}] {a.stream_repeats} streamed documents, {a.stream_pages} pages", flush=True)
                out.setdefault("stream", {})[m] = self.streams(c, m, all_pages[: a.stream_pages])
                if a.page1_sessions:
                    print(f"[{m}] page 1 of {a.page1_sessions} more sessions", flush=True)
                    out.setdefault("page1_sessions", {})[m] = self.page1_sessions(c, m, all_pages, a.page1_sessions)
        for m in a.models:
            print(f"[{m}] throughput 1 vs 8 concurrent sessions", flush=True)
            out.setdefault("throughput_http", {})[m] = {str(k): self.http_throughput(url, m, docs, k) for k in (1, 8)}
        for m in a.models:
            ref = self.results["oneshot_inprocess"][m]
            out.setdefault("oneshot_over_inprocess", {})[m] = out["oneshot"][m]["100"]["http_ms"] / ref["ms"]
            http8 = out["throughput_http"][m]["8"]["pages_per_s"]
            eng8 = self.results["throughput_engine"][m]["8"]["pages_per_s"]
            out.setdefault("http_over_engine", {})[m] = http8 / eng8
        return out

    def page1_sessions(self, c, model: str, pages: list[str], n: int) -> dict:
        """`n` sessions of 2 pages, one after the other (each a new session, as a
        streamed document's page 1 is): the median over them of page 1's step,
        request and request over step (and page 2's, for comparison)."""
        import statistics

        rows = []
        for k in range(n):
            r = self.stream(c, model, [pages[(2 * k) % len(pages)], pages[(2 * k + 1) % len(pages)]])
            rows.append([(q, s) for q, s in zip(r["request_ms"], r["page_ms"])])
        out = {"sessions": n}
        for i in (0, 1):
            req, step = [row[i][0] for row in rows], [row[i][1] for row in rows]
            out[str(i + 1)] = {"page_ms": statistics.median(step), "request_ms": statistics.median(req),
                               "request_over_step": statistics.median(q / s for q, s in zip(req, step)),
                               "runs_request_over_step": [q / s for q, s in zip(req, step)]}
        return out

    def streams(self, c, model: str, pages: list[str]) -> dict:
        """`stream_repeats` documents streamed one after the other; at pages 1, 50 and
        200 the median over them of the step, the request and their ratio (one
        request is one sample of a noisy 2-core machine)."""
        import statistics

        runs = [self.stream(c, model, pages) for _ in range(self.args.stream_repeats)]
        at = {}
        for k in (1, 50, 200):
            if k > len(pages):
                continue
            step = [r["page_ms"][k - 1] for r in runs]
            req = [r["request_ms"][k - 1] for r in runs]
            at[str(k)] = {"page_ms": statistics.median(step), "request_ms": statistics.median(req),
                          "state_bytes": runs[0]["state_bytes"][k - 1],
                          "request_over_step": statistics.median(q / s for q, s in zip(req, step)),
                          "runs_request_over_step": [q / s for q, s in zip(req, step)]}
        return {"at_page": at, "page_ms": runs[0]["page_ms"], "request_ms": runs[0]["request_ms"],
                "state_bytes": runs[0]["state_bytes"], "runs": len(runs)}

    # --- run --------------------------------------------------------------------------------------

    def run(self) -> dict:
        from ray import serve
        from tokenizers import Tokenizer

        from serve.app import build_app

        a = self.args
        root, trained = self.models()
        self.results.update({"models_dir": str(root), "trained": trained, "page_tokens": a.page_tokens,
                             "config": {n: json.loads((root / n / "config.json").read_text()) for n in ("bsbr", "standard")}})
        tok = Tokenizer.from_file(str(root / "bsbr" / "tokenizer.json"))
        n_long = max(a.stream_pages, 100)
        long_text = make_text(tok, n_long * a.page_tokens, seed=1)
        all_pages = page_texts(tok, long_text, a.page_tokens)
        docs = [page_texts(tok, make_text(tok, a.tp_pages * a.page_tokens, seed=100 + i), a.page_tokens)
                for i in range(a.tp_docs)]

        # In-process references first, before Ray starts (its processes would
        # compete for the cores, and they wind down for seconds after shutdown).
        for m in a.models:
            print(f"[{m}] in-process one-shot, {len(all_pages[:100])} pages", flush=True)
            self.results.setdefault("oneshot_inprocess", {})[m] = self.inprocess_oneshot(root, m, all_pages[:100])
            print(f"[{m}] in-process engine throughput", flush=True)
            self.results.setdefault("throughput_engine", {})[m] = {
                str(k): self.engine_throughput(root, m, docs, k) for k in (1, 8)}

        # One Ray per ingress (HAProxy's is chosen when Ray starts), every topology in it.
        for ingress in a.ingresses:
            with local_serve(ingress, a.object_store_mb) as port:
                for topo, layout in [(t, lay) for t in a.topologies for lay in a.layouts]:
                    name = topo if ingress == "serve" else f"{topo}+{ingress}"
                    if layout is not None:
                        name += f" {layout[0]}x{layout[1]}" + (f"/{layout[2]}" if layout[2] else "")
                    print(f"== {name}", flush=True)
                    self.replicas = layout[0] if layout else 1
                    serve.run(build_app(self.app_args(root, topo, layout)), name=f"bench-{topo}", route_prefix="/")
                    self.results.setdefault("servers", {})[name] = {
                        "topology": topo, "ingress": ingress,
                        "replicas": self.replicas, "torch_threads": layout[1] if layout else os.cpu_count() or 2,
                        "oneshot_torch_threads": (layout[2] if layout else None) or None,
                        **self.server(f"http://127.0.0.1:{port}", all_pages, docs)}
                    serve.delete(f"bench-{topo}")
        self.results["loadavg"]["after"] = list(os.getloadavg())
        return self.results


def summary(r: dict) -> str:
    lines = [(f"models: {r['models_dir']} ({'trained' if r['trained'] else 'UNTRAINED random init'}), "
              f"page = {r['page_tokens']} tokens, {r['machine']['cpus']} CPUs")]
    la = r.get("loadavg", {})
    lines.append(f"load average (1, 5, 15 min) before {la.get('before')}, after {la.get('after')}")
    clients = {t.get("client", "httpx") for srv in r.get("servers", {}).values()
               for m in srv.get("throughput_http", {}).values() for t in m.values()}
    lines.append(f"HTTP client: {', '.join(sorted(clients)) or '-'}")
    lines.append(f"{'':<28}{'1-shot 10p ms':>14}{'1-shot 100p ms':>15}{'in-proc ms':>11}{'1shot/inp':>10}"
                 f"{'p1 step':>8}{'p50 step':>9}{'p200 step':>10}"
                 f"{'p1 req':>7}{'p50 req':>8}{'p200 req':>9}{'req/step p1':>12}{'p1 n':>6}{'p200':>6}"
                 f"{'1 sess p/s':>11}{'8 sess p/s':>11}{'engine 8':>9}{'http/eng':>9}")
    for topo, srv in r.get("servers", {}).items():
        for m in srv.get("oneshot", {}):
            o, at = srv["oneshot"][m], srv["stream"][m]["at_page"]
            t = srv["throughput_http"][m]

            def g(k, f, at=at):
                return f"{at[k][f]:.0f}" if k in at else "-"

            def ratio(k, at=at):
                return f"{at[k]['request_over_step']:.2f}" if k in at else "-"

            inp = r.get("oneshot_inprocess", {}).get(m, {}).get("ms")
            s1 = srv.get("page1_sessions", {}).get(m)
            p1n = f"{s1['1']['request_over_step']:.2f}" if s1 else "-"
            over = srv.get("oneshot_over_inprocess", {}).get(m)
            eng8 = r["throughput_engine"][m]["8"]["pages_per_s"]
            lines.append(f"{m + ' ' + topo:<28}{o['10']['http_ms']:>14.0f}{o['100']['http_ms']:>15.0f}"
                         f"{(f'{inp:.0f}' if inp else '-'):>11}{(f'{over:.2f}' if over else '-'):>10}{g('1', 'page_ms'):>8}"
                         f"{g('50', 'page_ms'):>9}{g('200', 'page_ms'):>10}{g('1', 'request_ms'):>7}{g('50', 'request_ms'):>8}"
                         f"{g('200', 'request_ms'):>9}{ratio('1'):>12}{p1n:>6}{ratio('200'):>6}"
                         f"{t['1']['pages_per_s']:>11.2f}{t['8']['pages_per_s']:>11.2f}{eng8:>9.2f}"
                         f"{srv['http_over_engine'][m]:>9.2f}")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Per-page latency along one streamed document, each model and topology: step and whole request."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = iter(("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                   "tab:gray", "tab:olive", "tab:cyan"))
    for topo, srv in r.get("servers", {}).items():
        for m in srv["stream"]:
            st, color = srv["stream"][m], next(colors)
            xs = range(1, len(st["page_ms"]) + 1)
            ax.plot(xs, st["page_ms"], color=color, lw=0.8, label=f"{m} ({topo}): model step")
            ax.plot(xs, st["request_ms"], color=color, ls="--", alpha=0.7, label=f"{m} ({topo}): HTTP request")
    ax.set_yscale("log")
    ax.set_xlabel(f"page index ({r['page_tokens']} tokens per page)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("per-page latency along one streamed document")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- where a page request's CPU goes -------------------------------------------------------------

# Process titles Ray gives the server's processes (`ray::<actor class>`), and the
# names they are reported by.
PROCESS_TITLES = (("ServeController", "controller"), ("ProxyActor", "proxy"), ("ServeReplica:bsbr:api", "api"),
                  ("ServeReplica:bsbr:bsbr", "bsbr"), ("SessionStoreActor", "store"), ("gcs_server", "gcs"),
                  ("raylet", "raylet"))


def cpu_ms(pid: int) -> float:
    """utime + stime of a process, in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000.0 / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below pid."""
    import subprocess

    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for line in out.splitlines():
        p, pp, *args = line.split(None, 2)
        children.setdefault(int(pp), []).append((int(p), args[0] if args else ""))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def cpu_profile(a) -> dict:
    """The CPU profile of each topology in a.topologies, one after the other."""
    out = {"loadavg": {"before": list(os.getloadavg())}, "topologies": {}}
    for topo in a.topologies:
        print(f"== topology {topo}", flush=True)
        out["topologies"][topo] = cpu_profile_one(a, topo)
    out["loadavg"]["after"] = list(os.getloadavg())
    return out


def cpu_profile_one(a, topology: str) -> dict:
    from tokenizers import Tokenizer

    root = Path(a.models_dir) if a.models_dir else ROOT / "models"
    out: dict = {"models_dir": str(root), "topology": topology, "requests": a.profile_requests,
                 "loadavg": {"before": list(os.getloadavg())}}
    with bsbr_serve_up(root, topology) as (url, up):
        tok = Tokenizer.from_file(str(root / "bsbr" / "tokenizer.json"))
        text = make_text(tok, 680, seed=3)
        n = a.profile_requests
        with httpx.Client(base_url=url, timeout=600) as c:
            for _ in range(3):  # warm-up
                c.post("/v1/classify", json={"model": "bsbr", "text": text}).raise_for_status()
            sid = c.post("/v1/sessions", json={"model": "bsbr"}).json()["session_id"]
            c.post(f"/v1/sessions/{sid}/pages", json={"seq": 0, "text": text}).raise_for_status()
            # After the first session page: the store actor starts with the first session.
            procs: dict[str, int] = {}
            for pid, cmd in descendants(up.pid):
                for title, name in PROCESS_TITLES:
                    if title in cmd and name not in procs:
                        procs[name] = pid
            for mode in ("session", "oneshot"):
                before = {k: cpu_ms(p) for k, p in procs.items()}
                steps, t0 = [], time.perf_counter()
                for i in range(1, n + 1):
                    if mode == "session":
                        r = c.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "text": text})
                        r.raise_for_status()
                        steps.append(sum(r.json()["timing"]["page_ms"]))
                    else:
                        r = c.post("/v1/classify", json={"model": "bsbr", "text": text})
                        r.raise_for_status()
                        steps.append(sum(r.json()["timing"]["per_page_ms"]))
                wall = (time.perf_counter() - t0) * 1000 / n
                after = {k: cpu_ms(p) for k, p in procs.items()}
                out[mode] = {"wall_ms_per_request": wall, "model_ms_per_request": sum(steps) / n,
                             "cpu_ms_per_request": {k: (after[k] - before[k]) / n for k in procs}}
            c.delete(f"/v1/sessions/{sid}")
        out["tokens"] = len(tok.encode(text, add_special_tokens=False).ids)
    out["loadavg"]["after"] = list(os.getloadavg())
    return out


def profile_summary(all_r: dict) -> str:
    return "\n".join(f"topology {t}: " + profile_summary_one(r) for t, r in all_r["topologies"].items())


def profile_summary_one(r: dict) -> str:
    names = sorted({k for m in ("session", "oneshot") for k in r[m]["cpu_ms_per_request"]})
    lines = [(f"CPU ms per request ({r['requests']} sequential requests of {r['tokens']} tokens to bsbr; "
              f"load average before {r['loadavg']['before']}, after {r['loadavg']['after']})"),
             f"{'':<9}{'wall ms':>9}{'model ms':>9}" + "".join(f"{k:>11}" for k in names)]
    for m in ("session", "oneshot"):
        x = r[m]
        lines.append(f"{m:<9}{x['wall_ms_per_request']:>9.1f}{x['model_ms_per_request']:>9.1f}"
                     + "".join(f"{x['cpu_ms_per_request'].get(k, float('nan')):>11.1f}" for k in names))
    return "\n".join(lines)


def parse_layout(s: str) -> tuple[int, int, int | None]:
    """"RxT" or "RxT/O" -> (replicas, torch threads, one-shot threads or None)."""
    rt, _, o = s.partition("/")
    r, t = (int(x) for x in rt.split("x"))
    return r, t, int(o) if o else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=None)
    p.add_argument("--models", default="bsbr,standard")
    p.add_argument("--page-tokens", type=int, default=512)
    p.add_argument("--stream-pages", type=int, default=200)
    p.add_argument("--tp-docs", type=int, default=8, help="documents for the throughput runs")
    p.add_argument("--tp-pages", type=int, default=12, help="pages per throughput document")
    p.add_argument("--object-store-mb", type=int, default=3072)
    p.add_argument("--quick", action="store_true", help="bsbr only, every measurement at full size (a few minutes)")
    p.add_argument("--smoke", action="store_true", help="tiny models and few pages: a smoke run")
    p.add_argument("--cpu-profile", action="store_true", help="only the CPU per request of each server process")
    p.add_argument("--profile-requests", type=int, default=40)
    p.add_argument("--topologies", default="split,fused",
                   help="serve each in turn, same run (serve.config AppConfig.topology)")
    p.add_argument("--ingresses", default="serve,haproxy",
                   help="serve: Serve's Python HTTP proxy; haproxy: Serve's HAProxy ingress (bsbr-serve up --ingress); "
                        "each in a Ray of its own, every topology in it")
    p.add_argument("--layouts", default="",
                   help="comma-separated RxT or RxT/O: serve each topology with R replicas of T torch threads each "
                        "(fused: the ingress's replicas, split: each model's), one-shots on O threads; "
                        "default one replica with every core")
    p.add_argument("--redis-url", default=None,
                   help="sessions in this (running) Redis instead of the ray_actor store (recorded as `sessions`)")
    p.add_argument("--page1-sessions", type=int, default=12,
                   help="more sessions of 2 pages for the page-1 figure (`page1_sessions`)")
    p.add_argument("--stream-repeats", type=int, default=3, help="streamed documents per model (medians)")
    p.add_argument("--repeats", type=int, default=3, help="throughput runs (the best of them, engine and HTTP alike)")
    p.add_argument("--client", choices=("lean", "httpx"), default="lean",
                   help="the HTTP client the measurements send with (LeanClient: less of this machine's CPU)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_latency.json"))
    p.add_argument("--replot", action="store_true", help="only redraw the table and PNG from --out")
    a = p.parse_args()
    a.topologies = [t for t in a.topologies.split(",") if t]
    a.ingresses = [i for i in a.ingresses.split(",") if i]
    a.layouts = [parse_layout(lay) for lay in a.layouts.split(",") if lay] or [None]
    if a.cpu_profile:
        out = Path(a.out if a.out != p.get_default("out") else ROOT / "bench" / "results" / "serve_cpu_profile.json")
        r = cpu_profile(a)
        r.setdefault("code", git_revision())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=2) + "\n")
        print(profile_summary(r))
        print(f"wrote {out}")
        return 0
    out = Path(a.out)
    if a.replot:
        r = json.loads(out.read_text())
        plot(r, out.with_suffix(".png"))
        print(summary(r))
        return 0
    a.models = [m for m in a.models.split(",") if m]
    if a.quick:
        a.models = ["bsbr"]
    if a.smoke:
        a.stream_pages, a.page_tokens, a.object_store_mb = 60, 64, 300
    r = Bench(a).run()
    r.setdefault("code", git_revision())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    plot(r, out.with_suffix(".png"))
    print(summary(r))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
