"""Where a session page's CPU goes in the process that serves it: a py-spy profile, summarised.

For each path of --paths, serves the shipped bsbr model, warms up one
session, then profiles the serving process with py-spy (`record
--nonblocking --threads`, --rate Hz: the process is not paused, so the
requests' timing is not disturbed) while one client sends that session's
pages of 512 tokens one after the other for --seconds. py-spy drops samples
of idle threads, so each thread's samples are its busy time. Reported per
page (samples / rate / pages): each thread's busy ms, and the inclusive ms
of the functions that make up a page request (FUNCTIONS), on the event-loop
thread and on the model thread.

Paths:
- `uvicorn_memory`: bench/serve_floor.py's path with no Ray (uvicorn over
  the in-process engine, memory store); the process profiled is uvicorn's;
- `fused_haproxy`: `bsbr-serve up --topology fused --ingress haproxy` (every
  shipped model, the store actor over its TCP channel); the process
  profiled is the fused `api` replica, which holds the models.

Needs py-spy (`pip install py-spy`; not a dependency of bsbr-serve) and the
right to trace a child process (ptrace; root, or kernel.yama.ptrace_scope 0).

    python bench/page_profile.py            # writes bench/results/page_profile.json

The raw py-spy output is written beside the JSON (`page_profile.<path>.txt.gz`,
collapsed stacks: `zcat` it into a flame-graph tool). The JSON records the load average before and after.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_latency import (
    bsbr_serve_up,
    descendants,
    free_port,
    machine,
    make_text,
    page_texts,
    wait_ready,
    write_result,
)

# (label, a frame's function as py-spy names it, file) whose inclusive time is reported.
FUNCTIONS = [
    ("the whole ASGI request", "RequestResponseCycle.run_asgi", "uvicorn/protocols/http/httptools_impl.py"),
    ("the whole ASGI request (Serve's direct ingress)", "Replica._direct_ingress_asgi", "ray/serve/_private/replica.py"),
    ("HTTP parsing (uvicorn)", "HttpToolsProtocol.data_received", "uvicorn/protocols/http/httptools_impl.py"),
    ("FastAPI app", "FastAPI.__call__", "fastapi/applications.py"),
    ("the route's handler", "ApiServer.append_pages", "serve/api.py"),
    ("request body parse and validation", "_json_body", "serve/api.py"),
    ("Engine.append on the loop", "Engine.append", "serve/engine.py"),
    ("tokenising", "tokenize_document", "serve/pages.py"),
    ("the store commit (client side)", "RayActorSessionStore._call", "serve/store.py"),
    ("the store channel's answers", "Channel._read_answers", "serve/store_channel.py"),
    ("ray.util.metrics records", "Metric._record", "ray/util/metrics.py"),
    ("JSON encoding", "dumps", "json/__init__.py"),
    ("the model step (model thread)", "StepBatcher._run_batch", "serve/engine.py"),
    ("peak-memory reset and read (model thread)", "PeakMemory.reset", "serve/metrics.py"),
    ("the checkpoint (model thread)", "_checkpoint", "serve/engine.py"),
]


def summarise(raw: str, rate: float, pages: int) -> dict:
    threads: collections.Counter = collections.Counter()
    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\d+\): ", "", frames[0])
        threads[thread] += int(n)
        seen = set()
        for f in frames[1:]:
            m = re.match(r"(.*) \((.*):\d+\)$", f)
            key = (m.group(1), m.group(2)) if m else (f, "")
            if key not in seen:
                seen.add(key)
                incl[thread][key] += int(n)
    per_page = 1000.0 / rate / max(pages, 1)
    funcs = {}
    for label, fn, path in FUNCTIONS:
        total = sum(c for t in incl.values() for (name, file), c in t.items() if name == fn and file.endswith(path))
        if total:
            funcs[label] = round(total * per_page, 3)
    top = {t: [{"function": f"{name} ({file})", "ms_per_page": round(c * per_page, 3)}
               for (name, file), c in incl[t].most_common(40)]
           for t, _ in threads.most_common(4)}
    return {"thread_busy_ms_per_page": {t: round(c * per_page, 3) for t, c in threads.most_common()},
            "functions_ms_per_page": funcs, "top_inclusive_ms_per_page": top}


def profile(pid: int, url: str, pages: list[str], seconds: float, rate: float, raw_path: Path) -> dict:
    c = httpx.Client(base_url=url, timeout=60)
    sid = c.post("/v1/sessions", json={"model": "bsbr"}).json()["session_id"]
    for i in range(10):  # warm
        c.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [pages[i]]}).raise_for_status()
    spy = subprocess.Popen(["py-spy", "record", "-p", str(pid), "-r", str(int(rate)), "-d", str(int(seconds) + 2),
                            "--nonblocking", "--threads", "-f", "raw", "-o", str(raw_path)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    req, step, seq = [], [], 10
    t_end = time.time() + seconds
    while time.time() < t_end:
        t0 = time.perf_counter()
        r = c.post(f"/v1/sessions/{sid}/pages", json={"seq": seq, "pages": [pages[seq % len(pages)]]})
        req.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
        step.append(r.json()["timing"]["page_ms"][0])
        seq += 1
    _, err = spy.communicate(timeout=120)
    if spy.returncode != 0 or not raw_path.exists():
        raise SystemExit(f"py-spy failed: {err.decode()[-2000:]}")
    raw = raw_path.read_text()
    with gzip.open(raw_path.with_name(raw_path.name + ".gz"), "wt") as f:  # kept compressed beside the JSON
        f.write(raw)
    raw_path.unlink()
    return {"pages": len(req), "request_ms": statistics.median(req), "step_ms": statistics.median(step),
            **summarise(raw, rate, len(req))}


@contextlib.contextmanager
def uvicorn_memory(models: Path):
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "bench" / "serve_floor.py"), "--serve-local", str(port),
                               "--models-dir", str(models)], cwd=str(ROOT))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server, 120, "the uvicorn server")
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(30)


@contextlib.contextmanager
def fused_haproxy(models: Path):
    with bsbr_serve_up(models, "fused", "haproxy") as (url, up):
        time.sleep(5)  # Serve adds the replica to HAProxy shortly after ready
        pids = [p for p, cmd in descendants(up.pid) if cmd.startswith("ray::ServeReplica") and cmd.endswith(":api")]
        if len(pids) != 1:
            raise SystemExit(f"expected one fused api replica, found {pids}")
        yield url, pids[0]


PATHS = {"uvicorn_memory": uvicorn_memory, "fused_haproxy": fused_haproxy}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "page_profile.json"))
    a = p.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("needs py-spy on PATH: pip install py-spy")
    from tokenizers import Tokenizer

    models = Path(a.models_dir)
    tok = Tokenizer.from_file(str(models / "bsbr" / "tokenizer.json"))
    pages = page_texts(tok, make_text(tok, 1200 * 512, seed=3), 512)
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "machine": machine(),
           "rate_hz": a.rate, "seconds": a.seconds, "loadavg": {"before": list(os.getloadavg())}, "paths": {}}
    for name in [x for x in a.paths.split(",") if x]:
        raw = Path(a.out).with_name(f"{Path(a.out).stem}.{name}.txt")
        with PATHS[name](models) as (url, pid):
            r = out["paths"][name] = profile(pid, url, pages, a.seconds, a.rate, raw)
        print(f"== {name}: {r['pages']} pages, request {r['request_ms']:.1f} ms around a {r['step_ms']:.1f} ms step",
              flush=True)
        for t, ms in list(r["thread_busy_ms_per_page"].items())[:5]:
            print(f"   thread {t}: {ms:.2f} ms busy per page")
        for label, ms in r["functions_ms_per_page"].items():
            print(f"   {label}: {ms:.2f} ms per page")
    write_result(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
