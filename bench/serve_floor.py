"""What a request costs around the model, by path: the floor under a session page.

For each path below, in a fresh local Ray (one path per child process, since
Serve's flags are read when Ray starts), serves the shipped bsbr model and
measures over HTTP on 127.0.0.1, sequentially:

- `healthz_ms`: GET /healthz (no model work: the path's own cost), median of 200;
- `page_ms` / `request_ms`: the model step a session page reports and the
  whole HTTP request, median over pages 6-60 of one 60-page session of
  512-token pages, and their ratio `request_over_step`.

Paths:
- `split`: Serve's HTTP proxy -> the `api` ingress -> the bsbr replica (the default);
- `fused`: Serve's proxy -> one replica holding the model (topology fused);
- `fused_direct`: no proxy: the fused replica serves HTTP itself, with Ray
  Serve's experimental direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1;
  the replica's port is Serve's first of 30000-31000). Not a supported
  configuration of bsbr-serve: it measures what the proxy costs.
- `split_haproxy`, `fused_haproxy`: Serve's HAProxy ingress in front, as
  `bsbr-serve up --ingress haproxy` sets it up (serve.cli.haproxy_env).
- `fused_haproxy_ray_calls`: the same, its sessions reaching the store actor
  by Ray calls (`sessions.store_channel: ray`) instead of its TCP channel.
- `uvicorn_memory`: no Ray at all: uvicorn in a process of its own serving
  the same FastAPI app over an Engine in that process (serve.api.local_app,
  the in-process engine client) with the in-memory store. Not a way to
  deploy (one process, sessions die with it): the floor of bsbr-serve's own
  HTTP and engine code on this machine, under every Serve path.

Sessions are in the default store (the `ray_actor` actor), or with
`--redis-url` in that Redis (a running one; `--paths` as above).

    python bench/serve_floor.py            # writes bench/results/serve_floor.json

The JSON records the load average before and after the run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PATHS = {
    "split": ("split", {}),
    "fused": ("fused", {}),
    "fused_direct": ("fused", {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}),
    "split_haproxy": ("split", "haproxy"),
    "fused_haproxy": ("fused", "haproxy"),
    "fused_haproxy_ray_calls": ("fused", "haproxy"),
    "uvicorn_memory": (None, {}),
}
SESSION_OVERRIDES = {"fused_haproxy_ray_calls": {"store_channel": "ray"}}
DIRECT_PORTS = range(30000, 30010)


def _pages(models: Path, pages_n: int) -> list[str]:
    from serve_latency import make_text, page_texts
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(models / "bsbr" / "tokenizer.json"))
    return page_texts(tok, make_text(tok, pages_n * 512, seed=1), 512)[:pages_n]


def measure_url(url: str, pages: list[str], healthz_n: int) -> dict:
    """GET /healthz healthz_n times, then one session of `pages`, sequentially."""
    import httpx

    with httpx.Client(base_url=url, timeout=120) as c:
        for _ in range(20):
            c.get("/healthz").raise_for_status()
        h = []
        for _ in range(healthz_n):
            t0 = time.perf_counter()
            c.get("/healthz").raise_for_status()
            h.append((time.perf_counter() - t0) * 1000)
        sid = c.post("/v1/sessions", json={"model": "bsbr"}).json()["session_id"]
        req, step = [], []
        for i, p in enumerate(pages):
            t0 = time.perf_counter()
            r = c.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [p]})
            req.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            step.append(r.json()["timing"]["page_ms"][0])
        c.delete(f"/v1/sessions/{sid}")
    ratios = [q / s for q, s in zip(req[5:], step[5:])]
    return {"url": url, "healthz_ms": statistics.median(h), "page_ms": statistics.median(step[5:]),
            "request_ms": statistics.median(req[5:]), "request_over_step": statistics.median(ratios),
            "pages": len(pages)}


def serve_local(models: Path, port: int) -> None:
    """uvicorn on 127.0.0.1:port, the app over an in-process Engine, memory store (the uvicorn_memory path)."""
    import uvicorn

    from serve.api import local_app
    from serve.config import ModelSpec, SessionConfig
    from serve.engine import load_engine
    from serve.engine_client import InProcessEngineClient
    from serve.store import MemorySessionStore

    spec = ModelSpec(name="bsbr", path=str(models / "bsbr"), page_tokens=512, torch_threads=os.cpu_count() or 2)
    engine = load_engine("bsbr", spec, SessionConfig(store="memory"), MemorySessionStore())
    app = local_app({"bsbr": InProcessEngineClient(engine)}, {"sessions": {"store": "memory"}})
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def measure_local(models: Path, pages_n: int, healthz_n: int) -> dict:
    from serve_latency import free_port, wait_ready

    pages = _pages(models, pages_n)
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve-local", str(port), "--models-dir", str(models)],
                              cwd=str(ROOT))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server, 120, "the uvicorn server")
        return measure_url(url, pages, healthz_n)
    finally:
        server.terminate()
        server.wait(30)


def measure(topology: str, direct: bool, models: Path, pages_n: int, healthz_n: int, redis_url: str | None,
            sessions: dict | None = None) -> dict:
    """In this process: start Ray and Serve, serve bsbr, measure, stop."""
    import httpx
    import ray
    from ray import serve
    from serve_latency import free_port

    from serve.app import build_app
    from serve.cli import ray_env_defaults

    pages = _pages(models, pages_n)
    port = free_port()
    ray_env_defaults()  # as bsbr-serve up starts Ray
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"models": [{"name": "bsbr", "path": str(models / "bsbr"), "page_tokens": 512,
                            "torch_threads": os.cpu_count() or 2, "ray_actor_options": {"num_cpus": 1}}],
                "sessions": {"store_name": f"floor_{os.getpid()}", **(sessions or {}),
                             **({"store": "redis", "redis_url": redis_url} if redis_url else {})},
                "topology": topology}
        serve.run(build_app(args), name="floor", route_prefix="/")
        urls = [f"http://127.0.0.1:{p}" for p in DIRECT_PORTS] if direct else [f"http://127.0.0.1:{port}"]
        url = None
        for u in urls:
            try:
                if httpx.get(f"{u}/readyz", timeout=2).status_code == 200:
                    url = u
                    break
            except httpx.HTTPError:
                continue
        if url is None:
            raise SystemExit(f"no server answered at {urls}")
        return measure_url(url, pages, healthz_n)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> int:
    from serve_latency import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--pages", type=int, default=60)
    p.add_argument("--healthz", type=int, default=200)
    p.add_argument("--redis-url", default=None, help="sessions in this (running) Redis, not the ray_actor store")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_floor.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--serve-local", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve_local:
        serve_local(Path(a.models_dir), a.serve_local)
        return 0
    if a.child:
        topology, env = PATHS[a.child]
        if topology is None:
            print(json.dumps(measure_local(Path(a.models_dir), a.pages, a.healthz)))
            return 0
        direct = env == {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
        print(json.dumps(measure(topology, direct, Path(a.models_dir), a.pages, a.healthz, a.redis_url,
                                 SESSION_OVERRIDES.get(a.child))))
        return 0
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "machine": machine(),
           "sessions": "redis" if a.redis_url else "ray_actor",
           "loadavg": {"before": list(os.getloadavg())}, "paths": {}}
    for name in a.paths.split(","):
        _, env = PATHS[name]
        run_dir = None
        if env == "haproxy":
            from serve.cli import haproxy_env, haproxy_run_dir

            run_dir = haproxy_run_dir()
            env = haproxy_env(run_dir)
        print(f"== {name}", flush=True)
        child = subprocess.run([sys.executable, __file__, "--child", name, "--models-dir", a.models_dir,
                                "--pages", str(a.pages), "--healthz", str(a.healthz)]
                               + (["--redis-url", a.redis_url] if a.redis_url else []),
                               env={**os.environ, **env}, capture_output=True, text=True, cwd=str(ROOT), check=False)
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
        if child.returncode != 0:
            raise SystemExit(f"{name} failed:\n{child.stderr[-3000:]}")
        out["paths"][name] = json.loads(child.stdout.strip().splitlines()[-1])
        r = out["paths"][name]
        print(f"   healthz {r['healthz_ms']:.1f} ms; page request {r['request_ms']:.1f} ms around a "
              f"{r['page_ms']:.1f} ms step ({r['request_over_step']:.2f}x)", flush=True)
    from serve_latency import write_result

    write_result(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
