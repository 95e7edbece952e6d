"""Where a session page's time goes inside the engine, by session store.

Runs the shipped bsbr model's `Engine` in this process (no HTTP, no Serve)
and reads one session of `--pages` pages of 512 tokens through
`Engine.append`, timing each phase of every page with wrappers around the
engine's own functions:

- `tokenize`: `Engine.tokenize` (the page's text to ids);
- `step`: `StepBatcher.step`, enqueue to result (the model step a request
  reports as `page_ms`, then the checkpoint, made in the same trip to the
  torch thread), and within it `model_step` (`step_many` itself) and
  `checkpoint`: `_checkpoint` (the state's delta blob, `State.to_bytes`);
- `commit`: `SessionStore.commit` (compare-and-set on seq, in the store);
- `append`: the whole `Engine.append`.

Medians over pages 6 to the last, for each store of `--stores`: `memory`
(in-process), `ray_actor` (the default: a detached actor, in a local Ray
started as `bsbr-serve up` starts it, serve.cli.ray_env_defaults, reached
over its TCP channel, serve/store_channel.py), `ray_actor_ray` (the same
actor reached by Ray calls, `sessions.store_channel: ray`, which pass
objects up to 1 MiB inline), `ray_actor_100k` (Ray calls with Ray's own
inline limit, 100 KiB, so a page's 135 KB delta goes through the object
store), `redis` (needs `--redis-url` of a running Redis).

    python bench/engine_phases.py --redis-url redis://127.0.0.1:6379/0
                                   # writes bench/results/engine_phases.json
    python bench/engine_phases.py --stores ray_actor,ray_actor_ray --rounds 4 \
        --out bench/results/engine_phases_store_channel.json

One store per child process (a fresh Ray for ray_actor), the stores taken
in turn `--rounds` times (a round: each store once), so that a slow spell of
this VM falls on all of them; `median_ms` is the median of the rounds'
medians, `rounds` each round's. The JSON records the load average before
and after.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _timed(times: dict[str, list[float]], key: str, fn):
    if asyncio.iscoroutinefunction(fn):
        async def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return await fn(*a, **k)
            finally:
                times.setdefault(key, []).append((time.perf_counter() - t0) * 1000)
    else:
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times.setdefault(key, []).append((time.perf_counter() - t0) * 1000)
    return wrapper


async def measure(store_kind: str, models: Path, pages_n: int, redis_url: str | None) -> dict:
    from serve_latency import make_text, page_texts
    from tokenizers import Tokenizer

    import serve.engine as engine_mod
    from serve.config import ModelSpec, SessionConfig
    from serve.store import MemorySessionStore, RayActorSessionStore

    if store_kind in ("ray_actor", "ray_actor_ray", "ray_actor_100k"):
        import ray

        from serve.cli import ray_env_defaults

        if store_kind == "ray_actor_100k":  # Ray's own inline limit, not bsbr-serve's
            os.environ["RAY_max_direct_call_object_size"] = str(100 * 1024)
        ray_env_defaults()
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
        store = RayActorSessionStore(f"phases_{os.getpid()}", 10_000, 4 << 30,
                                     channel="socket" if store_kind == "ray_actor" else "ray")
    elif store_kind == "redis":
        from serve.redis_store import RedisSessionStore

        store = RedisSessionStore(redis_url, f"phases_{os.getpid()}", 10_000, 4 << 30)
    else:
        store = MemorySessionStore()
    spec = ModelSpec(name="bsbr", path=str(models / "bsbr"), page_tokens=512, torch_threads=os.cpu_count() or 2)
    eng = engine_mod.load_engine("bsbr", spec, SessionConfig(), store)
    tok = Tokenizer.from_file(str(models / "bsbr" / "tokenizer.json"))
    pages = page_texts(tok, make_text(tok, pages_n * 512, seed=1), 512)[:pages_n]
    times: dict[str, list[float]] = {}
    eng.tokenize = _timed(times, "tokenize", eng.tokenize)
    eng.batcher.step = _timed(times, "step", eng.batcher.step)
    eng.model.step_many = _timed(times, "model_step", eng.model.step_many)
    store.commit = _timed(times, "commit", store.commit)
    engine_mod._checkpoint = _timed(times, "checkpoint", engine_mod._checkpoint)
    append = _timed(times, "append", eng.append)
    sid = (await eng.create_session())["session_id"]
    for seq, page in enumerate(pages):
        await append(sid, seq, None, [page])
    if store_kind.startswith("ray_actor"):
        import ray

        ray.shutdown()
    med = {k: statistics.median(v[5:]) for k, v in times.items()}
    med["other"] = med["append"] - med["tokenize"] - med["step"] - med["commit"]  # step holds the checkpoint
    return {"pages": len(pages), "median_ms": med}


def main() -> int:
    from serve_latency import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--stores", default="memory,ray_actor,ray_actor_100k,redis")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--pages", type=int, default=60)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine_phases.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(asyncio.run(measure(a.child, Path(a.models_dir), a.pages, a.redis_url))))
        return 0
    stores = [s for s in a.stores.split(",") if s]
    if "redis" in stores and not a.redis_url:
        raise SystemExit("--stores has redis: give --redis-url of a running Redis")
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "machine": machine(),
           "loadavg": {"before": list(os.getloadavg())}, "stores": {}}
    rounds: dict[str, list[dict]] = {k: [] for k in stores}
    for _ in range(a.rounds):
        for kind in stores:
            child = subprocess.run([sys.executable, __file__, "--child", kind, "--models-dir", a.models_dir,
                                    "--pages", str(a.pages)] + (["--redis-url", a.redis_url] if a.redis_url else []),
                                   capture_output=True, text=True, cwd=str(ROOT), check=False)
            if child.returncode != 0:
                raise SystemExit(f"{kind} failed:\n{child.stderr[-3000:]}")
            r = json.loads(child.stdout.strip().splitlines()[-1])
            rounds[kind].append(r["median_ms"])
            print(f"{kind:>14}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["median_ms"].items()) + " (ms, medians)",
                  flush=True)
    for kind in stores:
        out["stores"][kind] = {
            "pages": a.pages,
            "median_ms": {k: statistics.median(rd[k] for rd in rounds[kind]) for k in rounds[kind][0]},
            "rounds": rounds[kind],
        }
    from serve_latency import write_result

    write_result(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
