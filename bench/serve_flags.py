"""Ray settings A/B: `bsbr-serve up` with and without a set of environment variables, in interleaved runs.

A single run's wall times vary by up to 30 % on this 2-core machine (a
virtual machine whose CPU time is sometimes stolen), more than most settings
change. So each path (topology and ingress) is served under each variant in
turn, `--pairs` times, interleaved (A, B, A, B, ...), and the comparison is
made pair by pair.

Each run starts `bsbr-serve up --models-dir models --topology T --ingress I`
(every shipped model, 1 torch thread per replica: what `make up` serves) with
the variant's variables added to the environment, waits until it is ready,
then measures over HTTP on 127.0.0.1:

- one session of `--pages` (150) pages of 512 tokens, one after the other:
  the median request time, the median model step the answers report, and
  the median of their per-page ratio (pages 6 on; the first 5 warm up);
- 8 sessions of `--conc-pages` (24) pages at once: pages/s.

Variants (`--variants`, default `without,with`):
- `without`: serve.cli.RAY_ENV_DEFAULTS minus Ray Serve's throughput mode
  (RAY_SERVE_THROUGHPUT_OPTIMIZED=0);
- `with`: serve.cli.RAY_ENV_DEFAULTS as `bsbr-serve up` sets them
  (bench/results/serve_flags.json was run while they still had the mode's
  gRPC transport on; bench/results/serve_flags_no_grpc.json with it off,
  RAY_SERVE_USE_GRPC_BY_DEFAULT=0, as now).

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

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_latency import bsbr_serve_up, make_text, page_texts

VARIANTS = {
    "without": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
    "with": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}


def one_run(topology: str, ingress: str, env_extra: dict[str, str], pages: list[str], n_seq: int,
            n_conc: int) -> dict:
    with bsbr_serve_up(ROOT / "models", topology, ingress, env_extra) as (url, _):
        time.sleep(5)  # Serve adds the replica to HAProxy shortly after ready (docs/architecture.md 3.8)

        def session(n: int, offset: int) -> tuple[list[float], list[float]]:
            with httpx.Client(base_url=url, timeout=600) as c:
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
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        secs = time.perf_counter() - t0
        if failures:
            raise failures[0]
        return {"request_ms": statistics.median(reqs), "step_ms": statistics.median(steps),
                "request_over_step": statistics.median(q / s for q, s in zip(reqs, steps)),
                "pages_per_s_8_sessions": sum(len(r) for r, _ in out) / secs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", default="split:serve,split:serve,fused:haproxy",
                   help="topology:ingress, comma-separated; a path named k times gets k times --pairs pairs")
    p.add_argument("--variants", default="without,with")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--pages", type=int, default=150)
    p.add_argument("--conc-pages", type=int, default=24)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_flags.json"))
    a = p.parse_args()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ROOT / "models" / "bsbr" / "tokenizer.json"))
    pages = page_texts(tok, make_text(tok, 512 * 400, seed=1), 512)
    variants = [v for v in a.variants.split(",") if v]
    from serve_latency import git_revision

    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "code": git_revision(),
           "loadavg": {"before": list(os.getloadavg())}, "cpus": os.cpu_count(),
           "variants": {v: VARIANTS[v] for v in variants}, "pages": a.pages, "conc_pages": a.conc_pages,
           "runs": []}
    for path in [x for x in a.paths.split(",") if x]:
        topology, ingress = path.split(":")
        for pair in range(a.pairs):
            for v in variants:
                r = one_run(topology, ingress, VARIANTS[v], pages, a.pages, a.conc_pages)
                r.update({"topology": topology, "ingress": ingress, "variant": v,
                          "loadavg_after": list(os.getloadavg())})
                out["runs"].append(r)
                print(f"{topology:>5} {ingress:<7} {v:<8} request {r['request_ms']:5.1f} ms  step "
                      f"{r['step_ms']:5.1f} ms  request/step {r['request_over_step']:.2f}  "
                      f"8 sessions {r['pages_per_s_8_sessions']:5.1f} pages/s", flush=True)
    out["loadavg"]["after"] = list(os.getloadavg())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"load average before {out['loadavg']['before']}, after {out['loadavg']['after']}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
