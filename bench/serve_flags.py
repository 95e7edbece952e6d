"""Ray settings A/B: `bsbr-serve up` with and without a set of environment variables, in interleaved runs.

A single run's wall times vary by up to 30 % on this 2-core machine (a
virtual machine whose CPU time is sometimes stolen), more than most settings
change. So each path (topology and ingress) is served under each variant in
turn, `--pairs` times, interleaved (A, B, A, B, ...), and the comparison is
made pair by pair.

Each run starts `bsbr-serve up --models-dir models --topology T --ingress I`
(every shipped model, 1 torch thread per replica: what `make up` serves;
with `--torch-threads N`, only the shipped models of `--models` (bsbr), on N
torch threads, from a --config the bench writes) with
the variant's variables added to the environment, waits until it is ready,
then measures over HTTP on 127.0.0.1:

- one session of `--pages` (150) pages of 512 tokens, one after the other:
  the median request time, the median model step the answers report, and
  the median of their per-page ratio (pages 6 on; the first 5 warm up);
- 8 sessions of `--conc-pages` (24) pages at once: pages/s, and how busy
  the machine was meanwhile (`cpu_8_sessions`, from /proc/stat).

Before these, every served model answers one classify of 2 pages, as on a
server in use (the JSONs written before this step lack `served`).

Requests go out with `--client lean` (serve_latency.LeanClient, the default)
or `--client httpx` (what the JSONs of before the option used).

Variants (`--variants`, default `without,with`):
- `without`: serve.cli.RAY_ENV_DEFAULTS minus Ray Serve's throughput mode
  (RAY_SERVE_THROUGHPUT_OPTIMIZED=0);
- `with`: serve.cli.RAY_ENV_DEFAULTS as `bsbr-serve up` sets them
  (bench/results/serve_flags.json was run while they still had the mode's
  gRPC transport on; bench/results/serve_flags_no_grpc.json with it off,
  RAY_SERVE_USE_GRPC_BY_DEFAULT=0, as now);
- `spin10k`: `with` and GOMP_SPINCOUNT=10000 (libgomp's spin-wait cut from
  300000 spins; bench/results/serve_flags_spincount.json);
- `omp_active`: `with` and OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=300000:
  libgomp's spin-wait as by default, but its throttled spin (a process
  with more OpenMP threads than cores) at 1000 spins instead of 100;
- `hap_lean`: `with`, and HAProxy without its per-request metrics log
  (RAY_SERVE_HAPROXY_METRICS_ENABLED=0: Serve's HAProxy manager, a Python
  actor, parses one syslog line per request into serve_num_http_*) on 1
  thread instead of 4 (RAY_SERVE_HAPROXY_NBTHREAD=1); `hap_nometrics` and
  `hap_1thread` each alone;
- `tree:DIR`: `with`'s settings, but the server runs the bsbr-serve code of
  the checkout DIR (e.g. `git worktree add /tmp/before fea107c`): a code A/B,
  as `--variants tree:/tmp/before,with` (bench/results/serve_flags_torch_thread.json
  compares fea107c, before each engine's torch work moved to one thread,
  docs/architecture.md 3.9, with the code after it).

    python bench/serve_flags.py              # writes bench/results/serve_flags.json

The JSON records the load average before and after the run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_latency import (
    bsbr_serve_up,
    cpu_use,
    http_client,
    machine_cpu,
    make_text,
    page_texts,
)

VARIANTS = {
    "without": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
    "with": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    # `with` and libgomp's spin-wait cut from its default of 300000 spins (each a `pause`,
    # several ms of a core after a step's last parallel region) to 10000.
    "spin10k": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "GOMP_SPINCOUNT": "10000"},
    # `with` and libgomp's throttled spin-wait (what a process with more OpenMP threads than
    # cores gets: a fused replica's one team per model) at 1000 spins instead of 100; the
    # unthrottled spin stays at its default of 300000 (docs/architecture.md 3.9).
    "omp_active": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"},
    # `with` and HAProxy (--ingress haproxy) without its per-request metrics (a syslog line per
    # request that Serve's HAProxy manager, a Python actor, parses into serve_num_http_* metrics)
    # and with 1 thread instead of Serve's 4 on this 2-core machine.
    "hap_lean": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
                 "RAY_SERVE_HAPROXY_NBTHREAD": "1"},
    "hap_nometrics": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"},
    "hap_1thread": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_HAPROXY_NBTHREAD": "1"},
}


def one_run(topology: str, ingress: str, env_extra: dict[str, str], pages: list[str], n_seq: int,
            n_conc: int, code_dir: str | None = None, config: Path | None = None, client: str = "lean") -> dict:
    with bsbr_serve_up(ROOT / "models", topology, ingress, env_extra, code_dir=code_dir, config=config) as (url, _):
        time.sleep(5)  # Serve adds the replica to HAProxy shortly after ready (docs/architecture.md 3.8)

        def session(n: int, offset: int) -> tuple[list[float], list[float]]:
            with http_client(client, url, timeout=600) as c:
                sid = c.post("/v1/sessions", json={"model": "bsbr"}).json()["session_id"]
                reqs, steps = [], []
                for i in range(n):
                    t0 = time.perf_counter()
                    r = c.post(f"/v1/sessions/{sid}/pages",
                               json={"seq": i, "pages": [pages[(offset + i) % len(pages)]]})
                    reqs.append((time.perf_counter() - t0) * 1000)
                    r.raise_for_status()
                    steps.append(r.json()["timing"]["page_ms"][0])
                c.delete(f"/v1/sessions/{sid}").raise_for_status()
                return reqs, steps

        # Every served model reads once first, as on a server in use (a model's
        # first read starts its torch thread, and with it an OpenMP team).
        with http_client(client, url, timeout=600) as c:
            served = [m["name"] for m in c.get("/v1/models").raise_for_status().json()["models"]]
            for m in served:
                c.post("/v1/classify", json={"model": m, "pages": pages[:2]}).raise_for_status()
        session(20, 0)  # warm-up
        reqs, steps = session(n_seq, 0)
        reqs, steps = reqs[5:], steps[5:]
        out, failures = [], []

        def worker(k: int) -> None:
            try:
                out.append(session(n_conc, 37 * k))
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        cpu0, proc0, t0 = machine_cpu(), time.process_time(), time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        secs = time.perf_counter() - t0
        if failures:
            raise failures[0]
        n = sum(len(r) for r, _ in out)
        return {"request_ms": statistics.median(reqs), "step_ms": statistics.median(steps),
                "request_over_step": statistics.median(q / s for q, s in zip(reqs, steps)),
                "pages_per_s_8_sessions": n / secs, "served": served,
                "cpu_8_sessions": cpu_use(cpu0, machine_cpu(), n, time.process_time() - proc0)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", default="split:serve,split:serve,fused:haproxy",
                   help="topology:ingress, comma-separated; a path named k times gets k times --pairs pairs")
    p.add_argument("--variants", default="without,with")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--pages", type=int, default=150)
    p.add_argument("--conc-pages", type=int, default=24)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="serve only --models, on this many torch threads (default: every model, as make up)")
    p.add_argument("--models", default="bsbr",
                   help="with --torch-threads: the shipped models served (bsbr,standard: a fused replica then "
                        "holds two OpenMP teams)")
    p.add_argument("--client", choices=("lean", "httpx"), default="lean",
                   help="the HTTP client (serve_latency.LeanClient, or httpx: what the JSONs of before the option used)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_flags.json"))
    a = p.parse_args()
    config = None
    if a.torch_threads:
        import tempfile

        config = Path(tempfile.mkdtemp(prefix="serve_flags_")) / "config.json"  # JSON is YAML
        config.write_text(json.dumps({"models": [{"name": m, "path": str(ROOT / "models" / m),
                                                  "torch_threads": a.torch_threads}
                                                 for m in a.models.split(",") if m]}))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ROOT / "models" / "bsbr" / "tokenizer.json"))
    pages = page_texts(tok, make_text(tok, 512 * 400, seed=1), 512)
    variants = [v for v in a.variants.split(",") if v]
    from serve_latency import git_revision

    def settings(v: str) -> tuple[dict[str, str], str | None]:
        """(environment added, code checkout) of a variant."""
        if v.startswith("tree:"):
            return VARIANTS["with"], v[len("tree:"):]
        return VARIANTS[v], None

    def tree_code(v: str) -> str | None:
        d = settings(v)[1]
        if d is None:
            return None
        import subprocess

        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=d, capture_output=True, text=True,
                              check=True).stdout.strip()

    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "code": git_revision(),
           "loadavg": {"before": list(os.getloadavg())}, "cpus": os.cpu_count(),
           "variants": {v: {"env": settings(v)[0], "code": tree_code(v) or git_revision()} for v in variants},
           "pages": a.pages, "conc_pages": a.conc_pages, "torch_threads": a.torch_threads, "client": a.client,
           "models": a.models.split(",") if a.torch_threads else "every shipped model",
           "runs": []}
    for path in [x for x in a.paths.split(",") if x]:
        topology, ingress = path.split(":")
        for pair in range(a.pairs):
            for v in variants:
                env_extra, code_dir = settings(v)
                r = one_run(topology, ingress, env_extra, pages, a.pages, a.conc_pages, code_dir, config, a.client)
                r.update({"topology": topology, "ingress": ingress, "variant": v,
                          "loadavg_after": list(os.getloadavg())})
                out["runs"].append(r)
                print(f"{topology:>5} {ingress:<7} {v[-12:]:<12} request {r['request_ms']:5.1f} ms  step "
                      f"{r['step_ms']:5.1f} ms  request/step {r['request_over_step']:.2f}  "
                      f"8 sessions {r['pages_per_s_8_sessions']:5.1f} pages/s, machine "
                      f"{r['cpu_8_sessions']['machine_busy_share']:.0%} busy", flush=True)
    out["loadavg"]["after"] = list(os.getloadavg())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"load average before {out['loadavg']['before']}, after {out['loadavg']['after']}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
