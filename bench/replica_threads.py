"""Where the CPU of 8 concurrent sessions goes: the engine in-process against
the same engine served fused behind HAProxy, per process and per thread.

The shipped bsbr model reads 8 documents of `--pages` pages of 512 tokens,
8 sessions at a time, over and over for `--seconds`:

- `inprocess`: the engine in this process (memory store, 2 torch threads),
  as bench/serve_latency.py's in-process reference reads them;
- `served RxT` for each layout of `--layouts`: `bsbr-serve up`'s application
  (build_app, as bench/serve_latency.py serves it) in topology fused behind
  HAProxy, R replicas of T torch threads, the pages sent over HTTP by 8
  client threads (serve_latency's LeanClient).

Meanwhile it reads the CPU time (utime + stime, /proc/<pid>/task/<tid>/stat)
of every process of the machine and of every thread of the process that
holds the engine (each replica, or this process), and reports CPU ms per
page: the machine's, each process's, and each engine process's busiest
threads. Ray renames a replica's threads, so a thread is known by its rank:
on 2 torch threads the two busiest are the torch thread and its OpenMP
worker, the third the event loop. The pages are counted over the same window.

    python bench/replica_threads.py --layouts 1x2,2x1   # writes bench/results/replica_threads.json

Run it on a quiet machine: its figures are CPU time per page, not wall time,
but what other processes take changes how long a team's threads wait for
each other. The JSON records the load average before and after.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_latency import (  # noqa: E402
    Bench, LeanClient, cpu_ms, git_revision, local_serve, machine, machine_cpu, make_text, page_texts, write_result,
)


def processes() -> dict[str, tuple[int, str]]:
    """pid -> (CPU ms so far, command line) of every process."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            out[pid] = (cpu_ms(pid), cmd[:80])
        except (OSError, ValueError, IndexError):
            continue
    return out


def threads(pid: int | str) -> dict[str, int]:
    """tid -> CPU ms so far of each thread of pid."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[tid] = cpu_ms(f"{pid}/task/{tid}")  # a thread's stat reads as a process's
        except (OSError, ValueError, IndexError):
            continue
    return out


class Window:
    """CPU per page of the machine, its processes and the engine processes' threads, over a window."""

    def __init__(self, engine_pids: list[int], count):
        self.engine_pids, self.count = [str(p) for p in engine_pids], count

    def __enter__(self):
        self.m0, self.p0, self.c0 = machine_cpu(), processes(), self.count()
        self.t0 = {p: threads(p) for p in self.engine_pids}
        self.w0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.w0
        self.m1, self.p1, self.c1 = machine_cpu(), processes(), self.count()
        self.t1 = {p: threads(p) for p in self.engine_pids}

    def result(self) -> dict:
        pages = self.c1 - self.c0
        per_page = 1 / max(pages, 1)
        procs = sorted(((t - self.p0[p][0]) * per_page, p, cmd) for p, (t, cmd) in self.p1.items() if p in self.p0)
        engine_threads = {}
        for p in self.engine_pids:
            spent = sorted((t - self.t0[p].get(tid, 0) for tid, t in self.t1[p].items()), reverse=True)
            engine_threads[p] = [round(t * per_page, 2) for t in spent[:4]]
        d = {k: self.m1[k] - self.m0[k] for k in self.m0}
        return {
            "pages": pages, "seconds": self.seconds, "pages_per_s": pages / self.seconds,
            "machine_busy_share": d["busy"] / max(d["all"], 1),
            "machine_cpu_ms_per_page": d["busy"] * 1000 / os.sysconf("SC_CLK_TCK") * per_page,
            "engine_processes_cpu_ms_per_page": sum(x for x, p, _ in procs if p in self.engine_pids),
            "engine_threads_cpu_ms_per_page": engine_threads,
            "processes_cpu_ms_per_page": [{"pid": int(p), "cmd": cmd, "ms": round(x, 2)}
                                          for x, p, cmd in reversed(procs) if x >= 0.05],
        }


def inprocess(root: Path, docs: list[list[str]], seconds: float) -> dict:
    import torch

    from serve.config import ModelSpec, SessionConfig
    from serve.engine import load_engine
    from serve.store import MemorySessionStore

    torch.set_num_threads(os.cpu_count() or 2)
    spec = ModelSpec(name="bsbr", path=str(root / "bsbr"), page_tokens=512, max_tokens=64 * 512, max_batch_size=16)
    eng = load_engine("bsbr", spec, SessionConfig(max_store_bytes=16 << 30), MemorySessionStore(max_store_bytes=16 << 30))
    done = [0]

    async def go():
        async def read(pages):
            sid = (await eng.create_session())["session_id"]
            for i, p in enumerate(pages):
                await eng.append(sid, i, pages=[p])
                done[0] += 1
            await eng.close(sid)

        await read(docs[0][:2])  # warm-up
        end = time.perf_counter() + seconds + 2

        async def reader(d):
            while time.perf_counter() < end:
                await read(d)

        tasks = [asyncio.create_task(reader(d)) for d in docs]
        await asyncio.sleep(2)  # past the start
        with Window([os.getpid()], lambda: done[0]) as w:
            await asyncio.sleep(seconds)
        await asyncio.gather(*tasks)
        return w.result()

    try:
        r = asyncio.run(go())
    finally:
        eng.shutdown()
    r["batches"], r["batched_steps"] = eng.batcher.batches, eng.batcher.batched_steps
    return r


def replica_pids(app: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and f"ServeReplica:{app}:api" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                out.append(int(pid))
        except OSError:
            continue
    return out


def served(bench: Bench, root: Path, docs: list[list[str]], layout: tuple[int, int], seconds: float) -> dict:
    from ray import serve

    from serve.app import build_app

    with local_serve("haproxy", 512) as port:
        serve.run(build_app(bench.app_args(root, "fused", layout)), name="rt", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with LeanClient(url) as c:
            for _ in range(2 * layout[0]):  # every replica (classify is balanced round robin)
                c.post("/v1/classify", json={"model": "bsbr", "pages": ["warm up"]}).raise_for_status()
        done, lock, end = [0], threading.Lock(), time.perf_counter() + seconds + 3
        errors: list[BaseException] = []

        def reader(pages):
            try:
                with LeanClient(url) as c:
                    while time.perf_counter() < end:
                        sid = c.post("/v1/sessions", json={"model": "bsbr"}).raise_for_status().json()["session_id"]
                        for i, p in enumerate(pages):
                            c.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [p]}).raise_for_status()
                            with lock:
                                done[0] += 1
                        c.delete(f"/v1/sessions/{sid}").raise_for_status()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        workers = [threading.Thread(target=reader, args=(d,)) for d in docs]
        for t in workers:
            t.start()
        time.sleep(3)  # past the start
        with Window(replica_pids("rt"), lambda: done[0]) as w:
            time.sleep(seconds)
        for t in workers:
            t.join()
        if errors:
            raise errors[0]
        return {"replicas": layout[0], "torch_threads": layout[1], **w.result()}


def summary(r: dict) -> str:
    lines = [f"{'':<14}{'pages/s':>8}{'busy':>6}{'machine ms/p':>13}{'engine procs':>13}  busiest engine threads, ms/page"]
    for name, x in [("inprocess", r["inprocess"]), *r["served"].items()]:
        th = "; ".join(", ".join(f"{t:.1f}" for t in ts[:3]) for ts in x["engine_threads_cpu_ms_per_page"].values())
        lines.append(f"{name:<14}{x['pages_per_s']:>8.1f}{x['machine_busy_share']:>6.0%}"
                     f"{x['machine_cpu_ms_per_page']:>13.1f}{x['engine_processes_cpu_ms_per_page']:>13.1f}  {th}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--layouts", default="1x2,2x1", help="comma-separated RxT: replicas x torch threads")
    p.add_argument("--pages", type=int, default=12, help="pages per document (8 documents)")
    p.add_argument("--seconds", type=float, default=15.0, help="the measured window of each")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "replica_threads.json"))
    a = p.parse_args()
    from tokenizers import Tokenizer

    root = Path(a.models_dir)
    tok = Tokenizer.from_file(str(root / "bsbr" / "tokenizer.json"))
    docs = [page_texts(tok, make_text(tok, a.pages * 512, seed=100 + i), 512) for i in range(8)]
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "machine": machine(),
           "loadavg": {"before": list(os.getloadavg())}, "code": git_revision(), "pages_per_document": a.pages}
    print("in-process engine", flush=True)
    out["inprocess"] = inprocess(root, docs, a.seconds)
    bench = Bench(argparse.Namespace(stream_pages=200, page_tokens=512))
    out["served"] = {}
    for lay in [tuple(int(x) for x in s.split("x")) for s in a.layouts.split(",") if s]:
        print(f"served fused+haproxy {lay[0]}x{lay[1]}", flush=True)
        out["served"][f"{lay[0]}x{lay[1]}"] = served(bench, root, docs, lay, a.seconds)
    print(summary(out))
    write_result(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
