"""What a session page request costs around its model step, for code versions side by side.

A page request's time is its model step (`timing.page_ms`, what the server
reports) plus everything else: HTTP in and out, tokenising, the checkpoint,
the store's commit, the hops between threads. This bench measures that rest,
`overhead_ms = request - step`, over sequential session pages against a
served application (fused behind HAProxy by default, the layout `RxT` of
`--layout`), and compares checkouts of the code in one run:

    python bench/page_overhead.py --code base=/tmp/base,new=. --rounds 3 \
        --out bench/results/page_overhead_<what>.json

Each `--code` entry is NAME=DIR, a checkout of this repository (a
`git worktree add /tmp/base <commit>`); DIR must have bench/serve_latency.py
with `local_serve` and `Bench.app_args` (from d35125c on). The versions are
taken in turn, `--rounds` times (a round: each version once), each in a
child process whose Ray runs that checkout's code (PYTHONPATH, verified in
a Ray worker and recorded), so that a slow spell of this VM falls on all of
them. A child starts a local Ray and Serve as `bsbr-serve up` does, serves
the shipped models (`--models-dir`), warms up, and reads `--sessions`
sessions of `--pages` pages of about 512 tokens one request at a time,
`--gap-s` apart (a gap of a few seconds lets a replica fall idle first).

bench/serve_flags.py's `tree:DIR` variants also compare checkouts, through
`bsbr-serve up` with every shipped model and its request/step ratio over one
long session; this bench serves a layout of bench/serve_latency.py's app and
reads many short sessions, so that page 1 gets as many samples as the rest.

Per version: medians over every page, over each session's page 1 and over
the first session's page 1 of each server (a fresh replica's first session)
of the overhead, of the step and of `request / step` (issue 10's target:
<= 1.5); per round as well. The JSON records the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(a) -> dict:
    """One version's measurement, in this process (PYTHONPATH and cwd: its checkout)."""
    import types

    code = Path(a.code_dir).resolve()
    sys.path.insert(0, str(code / "bench"))
    import serve_latency as sl  # that checkout's helpers (it puts its root first on sys.path)
    import ray
    from ray import serve
    from tokenizers import Tokenizer

    from serve.app import build_app

    root = Path(a.models_dir).resolve()
    tok = Tokenizer.from_file(str(root / "bsbr" / "tokenizer.json"))
    pages = sl.page_texts(tok, sl.make_text(tok, (a.pages + 2) * 512, seed=1), 512)[: a.pages]
    bench = sl.Bench.__new__(sl.Bench)
    bench.args = types.SimpleNamespace(stream_pages=200, page_tokens=512)
    layout = tuple(int(x) for x in a.layout.split("x"))
    rows = []
    with sl.local_serve(a.ingress, 512) as port:

        @ray.remote(num_cpus=0)
        def where() -> str:
            import serve.engine

            return serve.engine.__file__

        served_from = ray.get(where.remote())
        if not Path(served_from).resolve().is_relative_to(code):
            raise SystemExit(f"Ray workers import serve from {served_from}, not from {code}")
        serve.run(build_app(bench.app_args(root, a.topology, layout)), name="overhead", route_prefix="/")
        with sl.LeanClient(f"http://127.0.0.1:{port}") as c:
            for _ in range(2 * layout[0]):
                c.post("/v1/classify", json={"model": "bsbr", "pages": ["warm up"]}).raise_for_status()
            time.sleep(a.settle_s)
            for k in range(a.sessions):
                sid = c.post("/v1/sessions", json={"model": "bsbr"}).raise_for_status().json()["session_id"]
                for i, page in enumerate(pages):
                    t0 = time.perf_counter()
                    r = c.post(f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [page]})
                    wall = (time.perf_counter() - t0) * 1000
                    step = r.raise_for_status().json()["timing"]["page_ms"][0]
                    rows.append({"session": k, "page": i + 1, "request_ms": wall, "step_ms": step})
                c.delete(f"/v1/sessions/{sid}").raise_for_status()
                time.sleep(a.gap_s)
        serve.delete("overhead")
    return {"served_from": served_from, "pages": rows}


def medians(rows: list[dict]) -> dict:
    def med(f, rs):
        return statistics.median(f(r) for r in rs) if rs else None

    first = [r for r in rows if r["page"] == 1]
    out = {}
    # the first session's page 1 of each server: what a replica's first session pays
    very_first = [r for r in first if r.get("session") == 0]
    for name, rs in (("all", rows), ("page_1", first), ("first_session_page_1", very_first)):
        out[name] = {"n": len(rs),
                     "overhead_ms": med(lambda r: r["request_ms"] - r["step_ms"], rs),
                     "step_ms": med(lambda r: r["step_ms"], rs),
                     "request_ms": med(lambda r: r["request_ms"], rs),
                     "request_over_step": med(lambda r: r["request_ms"] / r["step_ms"], rs)}
    return out


def revision(d: Path) -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(d), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(d), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", default=f"current={ROOT}", help="NAME=DIR,...: checkouts to compare")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sessions", type=int, default=12)
    p.add_argument("--pages", type=int, default=10, help="pages per session")
    p.add_argument("--layout", default="1x2", help="RxT: R replicas of T torch threads")
    p.add_argument("--topology", default="fused")
    p.add_argument("--ingress", default="haproxy")
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--settle-s", type=float, default=3.0, help="wait after the warm-up")
    p.add_argument("--gap-s", type=float, default=0.0,
                   help="wait after each session: its next one may find a replica idle this long")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "page_overhead.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--code-dir", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        Path(a.child_out).write_text(json.dumps(child(a)))
        return 0
    versions = {}
    for item in a.code.split(","):
        name, _, d = item.partition("=")
        if not name or not d or not (Path(d) / "serve").is_dir():
            p.error(f"--code: {item!r} is not NAME=DIR of a checkout")
        versions[name] = Path(d).resolve()
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "loadavg": {"before": list(os.getloadavg())},
              "settings": {k: getattr(a, k) for k in ("rounds", "sessions", "pages", "layout", "topology", "ingress",
                                                       "settle_s", "gap_s")},
              "code": {n: {"dir": str(d), "revision": revision(d)} for n, d in versions.items()},
              "rounds": []}
    tmp = Path(a.out).resolve().with_suffix(".child.json")  # the children run in their checkouts
    every: dict[str, list] = {n: [] for n in versions}
    for rnd in range(a.rounds):
        this = {}
        for name, d in versions.items():
            env = {**os.environ, "PYTHONPATH": str(d)}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--code-dir", str(d),
                   "--child-out", str(tmp), "--models-dir", str(Path(a.models_dir).resolve()), "--sessions", str(a.sessions),
                   "--pages", str(a.pages), "--layout", a.layout, "--topology", a.topology, "--ingress", a.ingress,
                   "--settle-s", str(a.settle_s), "--gap-s", str(a.gap_s)]
            subprocess.run(cmd, cwd=d, env=env, check=True, stdout=subprocess.DEVNULL)
            got = json.loads(tmp.read_text())
            tmp.unlink()
            every[name].extend(got["pages"])
            this[name] = {"served_from": got["served_from"], **medians(got["pages"])}
            m = this[name]
            print(f"round {rnd + 1} {name:>10}: overhead {m['all']['overhead_ms']:.2f} ms (page 1: "
                  f"{m['page_1']['overhead_ms']:.2f}, the first session's: "
                  f"{m['first_session_page_1']['overhead_ms']:.2f}), request/step {m['all']['request_over_step']:.2f} "
                  f"(page 1: {m['page_1']['request_over_step']:.2f}), step {m['all']['step_ms']:.1f} ms", flush=True)
        result["rounds"].append(this)
    result["versions"] = {n: medians(rows) for n, rows in every.items()}
    names = list(versions)
    if len(names) > 1:
        base = result["versions"][names[0]]["all"]["overhead_ms"]
        result["overhead_over_first"] = {n: result["versions"][n]["all"]["overhead_ms"] / base for n in names[1:]}
    result["loadavg"]["after"] = list(os.getloadavg())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    for n, m in result["versions"].items():
        print(f"{n:>10}: overhead {m['all']['overhead_ms']:.2f} ms, page 1 {m['page_1']['overhead_ms']:.2f} ms, "
              f"first session's page 1 {m['first_session_page_1']['overhead_ms']:.2f} ms; "
              f"request/step {m['all']['request_over_step']:.2f}, page 1 {m['page_1']['request_over_step']:.2f}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
