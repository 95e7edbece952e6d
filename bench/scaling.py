"""One-shot forward time and peak memory of every mechanism against document length.

The measuring code is experiments/scaling.py (the `scaling` experiment runs
the same points, with FLOPs and training-step memory, into
experiments/results/); this script is its benchmark front end. Reference size
(docs/architecture.md 2): hidden 256, 4 heads, 4 layers, ff 1024, chunk 128,
vocab 16384, float32, batch 1. Each (mechanism, length) point runs in its own
child process: its time is the median of 3 forwards (1 above 8K tokens), its
peak memory the process's peak RSS during them (which counts everything
torch allocated, plus the ~0.3-0.5 GB of the interpreter and libraries,
reported as the baseline). Every point records the load average before and
after; a point above the benchmark's torch threads + 0.5 is marked
`"loaded": true` (and hollow in the plot): its time is not trustworthy.
`--side-by-side` instead times every mechanism in one process, round robin,
which is the fair comparison of times on a machine whose load drifts.

    python bench/scaling.py                     # full run (tens of minutes on 2 cores)
    python bench/scaling.py --quick             # 1K..8K only
    python bench/scaling.py --archs bsbr standard --lengths 1024 65536
    python bench/scaling.py --side-by-side --threads 1 --lengths 1024 4096 16384 65536

Writes bench/results/scaling.json and scaling.png (--side-by-side:
scaling_side_by_side.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import scaling  # noqa: E402
from experiments.memory import GIB  # noqa: E402

LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
LINEAR_EXTRA = [131072, 262144]  # only for the mechanisms linear in n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=list(scaling.ARCHS), choices=scaling.ARCHS)
    ap.add_argument("--lengths", nargs="+", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="lengths 1K..8K only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per point")
    ap.add_argument("--side-by-side", action="store_true", help="all mechanisms in one process, round robin")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the tests' tiny model
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model = scaling.PROFILES["smoke"].model if args.smoke else dict(scaling.REFERENCE)
    default_out = "scaling_side_by_side" if args.side_by_side else "scaling"
    out = Path(args.out or ROOT / "bench" / "results" / default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "threads": threads}
    command = " ".join([Path(sys.executable).name] + sys.argv)

    if args.side_by_side:
        lengths = args.lengths or [1024, 4096, 16384, 65536]
        archs = ["bsbr"] + [a for a in args.archs if a != "bsbr"]
        rows = scaling.side_by_side(model, archs, lengths, reps=args.reps)
        out.with_suffix(".json").write_text(json.dumps(
            {"machine": machine, "reference_config": model, "rows": rows, "command": command}, indent=2))
        print(f"wrote {out.with_suffix('.json')}")
        return

    peak = scaling.matmul_gflops()
    machine["matmul_gflops"] = peak
    print(f"float32 matmul throughput (2048^3, {threads} threads): {peak:.1f} GFLOP/s")
    lengths = args.lengths or ([n for n in LENGTHS if n <= 8192] if args.quick else LENGTHS)
    s = scaling.ScalingSettings(model=model, archs=tuple(args.archs), lengths=tuple(lengths),
                                linear_extra=() if args.lengths or args.quick else tuple(LINEAR_EXTRA),
                                reps=args.reps, max_point_s=float("inf"), mem_cap_gib=float("inf"),
                                timeout_s=args.timeout, isolate=not args.smoke)
    rows, skipped = scaling.sweep("inference", s, threads, None)
    for r in rows:
        if "gflops_per_s" in r:
            r["fraction_of_matmul_peak"] = r["gflops_per_s"] / peak
    summary = _summary(rows)
    out.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "reference_config": model, "rows": rows, "skipped": skipped, "summary": summary,
         "command": command}, indent=2))
    _plot(rows, out.with_suffix(".png"))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def _summary(rows: list[dict]) -> dict:
    t = {(r["arch"], r["n"]): r for r in rows if "time_s" in r}

    def get(arch, n, k="time_s"):
        return t[(arch, n)][k] if (arch, n) in t else None

    def ratio(a, b):
        return None if a is None or b is None else a / b

    out = {
        "points_under_load": sum(1 for r in t.values() if r["loaded"]),
        "standard_over_bsbr_time_64k": ratio(get("standard", 65536), get("bsbr", 65536)),
        "bsbr_over_standard_time_1k": ratio(get("bsbr", 1024), get("standard", 1024)),
        "bsbr_time_per_token_64k_over_8k": ratio(get("bsbr", 65536, "us_per_token"), get("bsbr", 8192, "us_per_token")),
        "baseline_over_bsbr_time": {a: {str(n): ratio(get(a, n), get("bsbr", n)) for (b, n) in t if b == a}
                                    for a in ("linear", "sliding_window", "delta_net")},
    }
    peak = get("bsbr", 262144, "peak_rss_bytes")
    out["bsbr_peak_rss_gib_256k"] = None if peak is None else peak / GIB
    out["acceptance"] = {
        "bsbr_8x_faster_than_standard_at_64k": None if out["standard_over_bsbr_time_64k"] is None else out["standard_over_bsbr_time_64k"] >= 8,
        "bsbr_at_most_2x_slower_at_1k": None if out["bsbr_over_standard_time_1k"] is None else out["bsbr_over_standard_time_1k"] <= 2,
        "bsbr_per_token_growth_8k_to_64k_at_most_1.3x": None if out["bsbr_time_per_token_64k_over_8k"] is None else out["bsbr_time_per_token_64k_over_8k"] <= 1.3,
        "bsbr_peak_under_2gib_at_256k": None if peak is None else peak < 2 * GIB,
    }
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, arch in enumerate(scaling.ARCHS):
        pts = [r for r in rows if r["arch"] == arch and "time_s" in r]
        if not pts:
            continue
        ns = [r["n"] for r in pts]
        for ax, ys in ((ax_t, [r["time_s"] for r in pts]), (ax_m, [r["peak_rss_bytes"] / GIB for r in pts])):
            ax.plot(ns, ys, "-", color=f"C{i}", label=arch)
            quiet = [(n, y) for n, y, r in zip(ns, ys, pts) if not r["loaded"]]
            loaded = [(n, y) for n, y, r in zip(ns, ys, pts) if r["loaded"]]
            if quiet:
                ax.scatter(*zip(*quiet), color=f"C{i}", zorder=3)
            if loaded:
                ax.scatter(*zip(*loaded), facecolors="none", edgecolors=f"C{i}", zorder=3)
    for ax, title, unit in ((ax_t, "one-shot forward time", "seconds"), (ax_m, "peak RSS of the process", "GiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("document length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Reference size: hidden 256, 4 heads, 4 layers, chunk 128, float32, batch 1, CPU "
                 "(hollow: measured under load)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
