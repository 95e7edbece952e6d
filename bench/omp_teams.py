"""What a second OpenMP team costs a model step (why serve.engine runs all torch work on one thread).

libgomp, the OpenMP of torch's CPU builds, gives each thread that opens a
parallel region its own team of worker threads, and once a process holds
more OpenMP threads than cores it throttles the workers' spin-wait, so every
parallel region of a step then waits on futex wake-ups. Before serve.engine
kept all torch work on one thread, a replica had such a second team: the
model was loaded in the constructor's thread and checkpoints were written
in a state-io thread, while steps ran in the model thread.

Each variant runs in its own child process, the variants in turn for
`--rounds` rounds, over one document of `--pages` pages of 512 tokens
(the shipped bsbr model, `--threads` torch threads; medians over pages 6
to the last):

- `one_team`: the model loaded and stepped (`step_many`, as the engine's
  batcher calls it) on one worker thread, nothing else touching torch;
- `two_teams`: the same, after another thread ran one parallel copy (as the
  old engine's load or a checkpoint did);
- `passive`: one_team under OMP_WAIT_POLICY=PASSIVE (no spinning at all: the
  cost of the wake-ups alone);
- `engine`: `Engine.append` of a session page as the engine now runs it
  (memory store): `model_step` and the whole `append`;
- `engine_two_teams`: the same after another thread ran one parallel copy;
- `two_teams_active` / `fused_own_threads_active`: two_teams and
  fused_own_threads under OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=300000, what
  `bsbr-serve up` sets (libgomp's throttled spin at 1000 spins, not 100);
- `fused_own_threads` / `fused_shared_thread`: a fused replica's choice, the
  bsbr and standard engines in one process, each on a torch thread of its
  own (what serve.engine does) or both on one: bsbr session pages alone
  (`alone_ms`), then beside a one-shot classify of `--fused-pages` pages
  (512 tokens each) by the standard model (`beside_ms`, p50 and max;
  `standard_oneshot_ms`).

    python bench/omp_teams.py      # writes bench/results/omp_teams.json

The JSON records the load average before and after; `ratios` are each
variant's median step over one_team's (engine_two_teams over engine).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VARIANTS = ("one_team", "two_teams", "passive", "engine", "engine_two_teams", "fused_own_threads",
            "fused_shared_thread", "two_teams_active", "fused_own_threads_active")
# What bsbr-serve up sets for libgomp (serve.cli.RAY_ENV_DEFAULTS), for the *_active variants.
ACTIVE_ENV = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def open_second_team() -> None:
    """Run one parallel torch op on a thread of its own (which stays alive, as a
    replica's threads do), so the process holds a second OpenMP team."""
    import torch

    def copy():
        torch.ones(1 << 22).clone()  # 4M elements: far above ATen's grain size, so a parallel region

    keeper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="other")
    keeper.submit(copy).result()
    open_second_team.keeper = keeper  # type: ignore[attr-defined]


def pages_ids(tokenizer, n: int) -> list[list[int]]:
    from serve_latency import make_text

    ids = tokenizer.encode(make_text(tokenizer, n * 512, seed=1), add_special_tokens=False).ids
    return [ids[i : i + 512] for i in range(0, n * 512, 512)]


def measure_steps(models: Path, pages_n: int, threads: int, second_team: bool) -> dict:
    import torch

    from bsbr_core.backends import load_backend
    from bsbr_core.tokenizer import load_tokenizer

    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
    model = worker.submit(load_backend, "torch", models / "bsbr", device="cpu", threads=threads).result()
    pages = pages_ids(load_tokenizer(models / "bsbr" / "tokenizer.json"), pages_n)
    if second_team:
        open_second_team()

    def step(ids, state):
        t0 = time.perf_counter()
        (_, new), = model.step_many([torch.tensor([ids])], [state])
        return new, (time.perf_counter() - t0) * 1000

    state, ms = model.init_state(1), []
    for ids in pages:
        state, t = worker.submit(step, ids, state).result()
        ms.append(t)
    return {"model_step": statistics.median(ms[5:])}


def measure_engine(models: Path, pages_n: int, threads: int, second_team: bool) -> dict:
    from serve_latency import make_text, page_texts
    from tokenizers import Tokenizer

    from serve.config import ModelSpec, SessionConfig
    from serve.engine import load_engine
    from serve.store import MemorySessionStore

    spec = ModelSpec(name="bsbr", path=str(models / "bsbr"), page_tokens=512, torch_threads=threads)
    eng = load_engine("bsbr", spec, SessionConfig(), MemorySessionStore())
    tok = Tokenizer.from_file(str(models / "bsbr" / "tokenizer.json"))
    pages = page_texts(tok, make_text(tok, pages_n * 512, seed=1), 512)[:pages_n]
    if second_team:
        open_second_team()
    steps: list[float] = []
    real = eng.model.step_many

    def timed(*a):
        t0 = time.perf_counter()
        try:
            return real(*a)
        finally:
            steps.append((time.perf_counter() - t0) * 1000)

    eng.model.step_many = timed

    async def go() -> list[float]:
        sid = (await eng.create_session())["session_id"]
        out = []
        for seq, page in enumerate(pages):
            t0 = time.perf_counter()
            await eng.append(sid, seq, None, [page])
            out.append((time.perf_counter() - t0) * 1000)
        return out

    appends = asyncio.run(go())
    return {"model_step": statistics.median(steps[5:]), "append": statistics.median(appends[5:])}


def measure_fused(models: Path, threads: int, shared: bool, standard_pages: int) -> dict:
    from serve_latency import make_text, page_texts
    from tokenizers import Tokenizer

    import serve.engine as engine_mod
    from serve.config import ModelSpec, SessionConfig
    from serve.store import MemorySessionStore

    if shared:  # every engine of the process on the first one's thread
        one = engine_mod.torch_thread("shared")
        engine_mod.torch_thread = lambda name: one

    def load(name):
        spec = ModelSpec(name=name, path=str(models / name), page_tokens=512, torch_threads=threads)
        return engine_mod.load_engine(name, spec, SessionConfig(max_store_bytes=16 << 30),
                                      MemorySessionStore(max_store_bytes=16 << 30))

    bsbr, standard = load("bsbr"), load("standard")
    tok = Tokenizer.from_file(str(models / "bsbr" / "tokenizer.json"))
    pages = page_texts(tok, make_text(tok, max(standard_pages, 60) * 512, seed=1), 512)

    async def bsbr_pages(n: int, stop: asyncio.Event | None = None) -> list[float]:
        sid = (await bsbr.create_session())["session_id"]
        out = []
        for seq in range(n):
            t0 = time.perf_counter()
            await bsbr.append(sid, seq, None, [pages[seq % 60]])
            out.append((time.perf_counter() - t0) * 1000)
            if stop is not None and stop.is_set():
                break
        return out

    async def go() -> dict:
        alone = await bsbr_pages(40)
        stop = asyncio.Event()

        async def oneshot() -> float:
            t0 = time.perf_counter()
            await standard.classify(pages=pages[:standard_pages])
            stop.set()
            return (time.perf_counter() - t0) * 1000

        task = asyncio.create_task(oneshot())
        beside = await bsbr_pages(1 << 30, stop)
        return {"alone_ms": statistics.median(alone[5:]), "beside_ms": statistics.median(beside),
                "beside_max_ms": max(beside), "beside_pages": len(beside), "standard_oneshot_ms": await task}

    return asyncio.run(go())


def child(variant: str, models: Path, pages_n: int, threads: int, fused_pages: int) -> dict:
    variant = variant.removesuffix("_active")  # the same measurement, under ACTIVE_ENV
    if variant.startswith("fused"):
        out = measure_fused(models, threads, shared=variant == "fused_shared_thread", standard_pages=fused_pages)
    elif variant.startswith("engine"):
        out = measure_engine(models, pages_n, threads, second_team=variant == "engine_two_teams")
    else:
        out = measure_steps(models, pages_n, threads, second_team=variant == "two_teams")
    out["os_threads"] = threading.active_count(), len(os.listdir("/proc/self/task"))
    return out


def main() -> int:
    from serve_latency import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--pages", type=int, default=60)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fused-pages", type=int, default=48, help="pages of the standard model's one-shot (fused_*)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "omp_teams.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, Path(a.models_dir), a.pages, a.threads, a.fused_pages)))
        return 0
    variants = [v for v in a.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "machine": machine(),
           "settings": {"pages": a.pages, "page_tokens": 512, "torch_threads": a.threads, "rounds": a.rounds,
                        "fused_pages": a.fused_pages},
           "loadavg": {"before": list(os.getloadavg())}, "variants": {}}
    rounds: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(a.rounds):
        for v in variants:
            env = {k: x for k, x in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
            if v.endswith("_active"):
                env.update(ACTIVE_ENV)
            if v == "passive":
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            r = subprocess.run([sys.executable, __file__, "--child", v, "--models-dir", a.models_dir,
                                "--pages", str(a.pages), "--threads", str(a.threads),
                                "--fused-pages", str(a.fused_pages)],
                               capture_output=True, text=True, cwd=str(ROOT), env=env, check=False)
            if r.returncode != 0:
                raise SystemExit(f"{v} failed:\n{r.stderr[-3000:]}")
            rounds[v].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"{v:>19}: " + ", ".join(f"{k} {x:.2f}" for k, x in rounds[v][-1].items() if k != "os_threads")
                  + " (ms, medians)", flush=True)
    for v in variants:
        keys = [k for k in rounds[v][0] if k != "os_threads"]
        out["variants"][v] = {"median_ms": {k: statistics.median(r[k] for r in rounds[v]) for k in keys},
                              "rounds": rounds[v]}
    step = {v: out["variants"][v]["median_ms"]["model_step"] for v in variants if not v.startswith("fused")}
    ratios = {}
    for v, ref in (("two_teams", "one_team"), ("two_teams_active", "one_team"), ("passive", "one_team"),
                   ("engine_two_teams", "engine")):
        if v in step and ref in step:
            ratios[f"{v}_over_{ref}"] = step[v] / step[ref]
    out["ratios"] = ratios
    print("ratios (model step): " + ", ".join(f"{k} {x:.2f}" for k, x in ratios.items()))
    from serve_latency import write_result

    write_result(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
