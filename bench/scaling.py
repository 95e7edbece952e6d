"""One-shot forward time and peak memory of every mechanism against document length.

Reference size (docs/architecture.md 2): hidden 256, 4 heads, 4 layers, ff 1024,
chunk 128, vocab 16384, float32, batch 1. Each (mechanism, length) point runs
in its own child process so its peak memory is that process's maximum RSS
(`ru_maxrss`, which counts everything torch allocated, plus the ~0.3-0.5 GB
of the interpreter and libraries, reported separately as the baseline).
The same run measures the machine's float32 matmul throughput, so each
mechanism's achieved rate can be read as a fraction of it. FLOPs are the
matmul FLOPs of the algorithm as implemented (2*m*n*k per product; see
`model_flops`), since torch's FLOP counter does not count CPU SDPA.

    python bench/scaling.py                     # full run (tens of minutes on 2 cores)
    python bench/scaling.py --quick             # 1K..8K only
    python bench/scaling.py --archs bsbr standard --lengths 1024 65536

Writes bench/results/scaling.json and scaling.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFERENCE = dict(vocab_size=16384, hidden_dim=256, num_layers=4, num_heads=4, ff_dim=1024, chunk_size=128,
                 labels=[f"c{i}" for i in range(17)], window=256)
ARCHS = ["bsbr", "standard", "linear", "sliding_window", "delta_net"]
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
LINEAR_EXTRA = [131072, 262144]  # only for the mechanisms linear in n
LINEAR_TIME = {"bsbr", "linear", "sliding_window", "delta_net"}


def model_flops(arch: str, n: int, cfg: dict = REFERENCE) -> float:
    """Matmul FLOPs of one forward over n tokens (2 per multiply-add)."""
    D, H, L, ff, B = cfg["hidden_dim"], cfg["num_heads"], cfg["num_layers"], cfg["ff_dim"], cfg["chunk_size"]
    d, w = D // H, cfg["window"]
    C = math.ceil(n / B)
    dense = 2 * n * D * 3 * D + 2 * n * D * D + 2 * 2 * n * D * ff  # qkv, out, ffn
    if arch == "bsbr":
        attn = H * (
            4 * n * B * d            # local QK^T and AV inside chunks
            + 2 * n * d * d          # chunk states k v^T
            + C * (C + 1) * d        # retrieval scores r.h over earlier chunks (avg C/2 each, x2)
            + C * (C + 1) * d * d    # S_c = sum_j a_cj F_j
            + 2 * n * d * d          # q S_c
        ) + 2 * 2 * C * D * D        # meta key and query projections
    elif arch == "standard":
        attn = H * sum(4 * B * (c + 1) * B * d for c in range(C))  # block-causal: chunk c sees (c+1)B keys
    elif arch == "linear":
        attn = H * (4 * n * B * d + 2 * n * d * d + 2 * n * d * d)
    elif arch == "sliding_window":
        attn = H * 4 * n * (w + B) * d
    elif arch == "delta_net":
        attn = H * (2 * n * B * d + 2 * 2 * n * B * d + 2 * n * B * d + 8 * n * d * d) + 2 * n * D * H
    else:
        raise ValueError(arch)
    return float(L * (dense + attn))


def matmul_gflops(size: int = 2048, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_point(arch: str, n: int, reps: int) -> dict:
    """Child process: time the forward and report this process's peak RSS."""
    import torch

    from bsbr_core import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, **REFERENCE)).eval()
    with torch.inference_mode():
        model(torch.randint(0, 16384, (1, 512)))  # warm up kernels on a small input
        ids = torch.randint(0, 16384, (1, n))
        baseline = _rss_bytes()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            logits = model(ids)
            times.append(time.perf_counter() - t)
        assert torch.isfinite(logits).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"arch": arch, "n": n, "times_s": times, "time_s": sorted(times)[len(times) // 2],
            "peak_rss_bytes": peak, "baseline_rss_bytes": baseline}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    ap.add_argument("--lengths", nargs="+", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="lengths 1K..8K only")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per point")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaling"))
    ap.add_argument("--point", nargs=2, metavar=("ARCH", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.point:
        print(json.dumps(run_point(args.point[0], int(args.point[1]), args.reps or 1)))
        return

    import torch

    peak = matmul_gflops()
    print(f"float32 matmul throughput (2048^3, {torch.get_num_threads()} threads): {peak:.1f} GFLOP/s")
    rows = []
    for arch in args.archs:
        lengths = args.lengths or ([n for n in LENGTHS if n <= 8192] if args.quick else
                                   LENGTHS + (LINEAR_EXTRA if arch in LINEAR_TIME else []))
        for n in lengths:
            reps = 3 if n <= 8192 else 1
            cmd = [sys.executable, __file__, "--point", arch, str(n), "--reps", str(reps)]
            t0 = time.perf_counter()
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                row = {"arch": arch, "n": n, "error": f"timeout after {args.timeout:.0f}s"}
            except subprocess.CalledProcessError as e:
                row = {"arch": arch, "n": n, "error": (e.stderr or "").strip().splitlines()[-1:]}
            if "time_s" in row:
                row["flops"] = model_flops(arch, n)
                row["gflops_per_s"] = row["flops"] / row["time_s"] / 1e9
                row["fraction_of_matmul_peak"] = row["gflops_per_s"] / peak
                row["us_per_token"] = row["time_s"] / n * 1e6
            rows.append(row)
            _print_row(row)
            print(f"    (point took {time.perf_counter() - t0:.0f}s)", flush=True)
            if "error" in row:
                break  # longer inputs would only fail the same way
    summary = _summary(rows)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "matmul_gflops": peak},
        "reference_config": REFERENCE, "rows": rows, "summary": summary,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    _plot(rows, args.out + ".png")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}.json and {args.out}.png")


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['arch']:>15} {r['n']:>7}  error: {r['error']}")
        return
    print(f"{r['arch']:>15} {r['n']:>7}  {r['time_s']:9.3f} s  {r['us_per_token']:8.1f} us/tok  "
          f"peak {r['peak_rss_bytes'] / 2**30:6.2f} GiB (baseline {r['baseline_rss_bytes'] / 2**30:4.2f})  "
          f"{r['gflops_per_s']:7.1f} GFLOP/s = {100 * r['fraction_of_matmul_peak']:5.1f}% of matmul", flush=True)


def _summary(rows: list[dict]) -> dict:
    t = {(r["arch"], r["n"]): r for r in rows if "time_s" in r}
    out = {}

    def ratio(a, b):
        return None if a is None or b is None else a / b

    get = lambda arch, n, k="time_s": t[(arch, n)][k] if (arch, n) in t else None  # noqa: E731
    out["standard_over_bsbr_time_64k"] = ratio(get("standard", 65536), get("bsbr", 65536))
    out["bsbr_over_standard_time_1k"] = ratio(get("bsbr", 1024), get("standard", 1024))
    out["bsbr_time_per_token_64k_over_8k"] = ratio(get("bsbr", 65536, "us_per_token"), get("bsbr", 8192, "us_per_token"))
    peak = get("bsbr", 262144, "peak_rss_bytes")
    out["bsbr_peak_rss_gib_256k"] = None if peak is None else peak / 2**30
    out["acceptance"] = {
        "bsbr_8x_faster_than_standard_at_64k": None if out["standard_over_bsbr_time_64k"] is None else out["standard_over_bsbr_time_64k"] >= 8,
        "bsbr_at_most_2x_slower_at_1k": None if out["bsbr_over_standard_time_1k"] is None else out["bsbr_over_standard_time_1k"] <= 2,
        "bsbr_per_token_growth_8k_to_64k_at_most_1.3x": None if out["bsbr_time_per_token_64k_over_8k"] is None else out["bsbr_time_per_token_64k_over_8k"] <= 1.3,
        "bsbr_peak_under_2gib_at_256k": None if peak is None else peak < 2 * 2**30,
    }
    return out


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arch in ARCHS:
        pts = [r for r in rows if r["arch"] == arch and "time_s" in r]
        if not pts:
            continue
        ns = [r["n"] for r in pts]
        ax_t.plot(ns, [r["time_s"] for r in pts], "o-", label=arch)
        ax_m.plot(ns, [r["peak_rss_bytes"] / 2**30 for r in pts], "o-", label=arch)
    for ax, title, unit in ((ax_t, "one-shot forward time", "seconds"), (ax_m, "peak RSS of the process", "GiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("document length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Reference size: hidden 256, 4 heads, 4 layers, chunk 128, float32, batch 1, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
