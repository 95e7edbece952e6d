"""Round trip to the session store actor: Ray actor calls against its TCP channel.

In a local Ray started as `bsbr-serve up` starts it (serve.cli.ray_env_defaults),
from this process, one call at a time, median of --calls after 50 warm-up calls:

- `ray_empty`: an empty call (`ping`) to the store actor over Ray;
- `ray_commit` / `socket_commit`: a session page's commit (a 135 KB delta, the
  shipped bsbr's, and an answer dict) through RayActorSessionStore with
  `channel="ray"` and `channel="socket"`;
- `ray_head` / `socket_head`: a metadata read.

Nothing else runs: this is the transport's floor, not a page inside a busy
engine (bench/engine_phases.py measures that).

    python bench/store_channel.py        # writes bench/results/store_channel.json

The JSON records the load average before and after.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_latency import machine, write_result

ANSWER = {"session_id": "s" * 32, "model": "bsbr", "seq": 1, "label": "a", "scores": {"a": 0.1, "b": 0.9},
          "logits": {"a": 0.1, "b": 0.9}, "num_tokens": 5120, "num_pages": 10, "state_bytes": 1352192,
          "timing": {"page_ms": [12.3], "total_ms": 20.0}, "expires_in_s": 900.0, "final": False}


async def timed(n: int, fn) -> float:
    out = []
    for i in range(n + 50):
        t0 = time.perf_counter()
        await fn(i)
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out[50:])


async def measure(n: int) -> dict:
    import ray

    from serve.store import RayActorSessionStore

    name = f"channel_bench_{uuid.uuid4().hex[:8]}"
    blob = os.urandom(135_000)
    out = {}
    stores = {c: RayActorSessionStore(name, 10_000, 4 << 30, channel=c) for c in ("ray", "socket")}
    try:
        actor = stores["ray"]._handle()
        out["ray_empty_ms"] = await timed(n, lambda i: actor.ping.remote())
        for channel, s in stores.items():
            sid = f"{channel:0>32}"[-32:]
            await s.create(sid, "bsbr", 600)
            out[f"{channel}_commit_ms"] = await timed(n, lambda i, s=s, sid=sid: s.commit(sid, i, blob, ANSWER,
                                                                                        i % 20 != 0))
            out[f"{channel}_head_ms"] = await timed(n, lambda i, s=s, sid=sid: s.head(sid))
            await s.delete(sid)
        assert stores["socket"]._channels, "the socket store fell back to Ray calls"
    finally:
        ray.kill(actor, no_restart=True)
    out["commit_ray_over_socket"] = out["ray_commit_ms"] / out["socket_commit_ms"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "store_channel.json"))
    a = p.parse_args()
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "machine": machine(),
           "loadavg": {"before": list(os.getloadavg())}, "calls": a.calls}
    import ray

    from serve.cli import ray_env_defaults

    ray_env_defaults()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        out["median_ms"] = asyncio.run(measure(a.calls))
    finally:
        ray.shutdown()
    for k, v in out["median_ms"].items():
        print(f"{k}: {v:.3f}")
    write_result(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
