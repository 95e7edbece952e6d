"""torch vs ONNX Runtime: one-shot latency of bsbr and standard at 1K, 8K and 64K tokens.

Reference size (docs/architecture.md 2): hidden 256, 4 heads, 4 layers, ff 1024, chunk
128, vocab 16384, float32, batch 1, random weights. Both backends take the
same path: up to segment_tokens (8192) one call (forward.onnx on ORT),
beyond that segment by segment through the carried state.

Each (arch, length) runs in its own child process with a time limit, so a
case that runs too long or too large is reported as such instead of sinking
the run. The child loads both backends and alternates them call by call
(torch, onnx, onnx, torch, ...), so load from other processes on a shared
machine falls on both alike; the table gives medians and minima of the
timed calls and the ORT/torch ratio of each.

Threads: 1 by default. On a machine whose cores are shared, multi-threaded
timings mostly measure OpenMP threads waiting for each other (3x slower
than one thread at 1K tokens here); pass --threads for a dedicated machine.

    python bench/backends.py [--lengths 1024 8192 65536] [--threads 1] [--timeout 3600]

Prints the table and writes bench/results/backends.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARCHS = ("bsbr", "standard")
LENGTHS = (1024, 8192, 65536)
REFERENCE = dict(vocab_size=16384, hidden_dim=256, num_layers=4, num_heads=4, ff_dim=1024, chunk_size=128)


def repeats_for(arch: str, n: int) -> int:
    if n <= 1024:
        return 10
    if n <= 8192:
        return 5
    return 3 if arch == "bsbr" else 1  # standard at 64K: minutes per run on a CPU


# --- child: one case ------------------------------------------------------------------------

def run_case(case: dict) -> dict:
    import torch

    from bsbr_core import load_model
    from bsbr_core.onnx import load_onnx_model

    threads = case["threads"]
    torch.set_num_threads(threads)
    models = {
        "torch": load_model(case["model_dir"], with_tokenizer=False)[0],
        "onnx": load_onnx_model(case["model_dir"], providers=["CPUExecutionProvider"], export_if_missing=False,
                                cache_dir=case["onnx_dir"], threads=threads),
    }
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, models["torch"].config.vocab_size, (1, case["n"]), generator=g)
    times = {b: [] for b in models}
    logits = {}
    with torch.no_grad():
        for model in models.values():
            model(ids[:, : min(case["n"], 1024)])  # warm-up: thread pools, allocator, ORT kernels
        for r in range(case["repeats"]):
            for b in (("torch", "onnx") if r % 2 == 0 else ("onnx", "torch")):
                t0 = time.perf_counter()
                logits[b] = models[b](ids)[0].tolist()
                times[b].append(time.perf_counter() - t0)
    return {
        b: {"median_s": statistics.median(times[b]), "min_s": min(times[b]), "times_s": times[b], "logits": logits[b]}
        for b in models
    } | {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def spawn_case(case: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall_s": time.perf_counter() - t0}
    if proc.returncode != 0:
        killed = proc.returncode < 0 or proc.returncode == 137
        return {"status": "killed (out of memory?)" if killed else "error", "returncode": proc.returncode,
                "stderr_tail": proc.stderr[-2000:], "wall_s": time.perf_counter() - t0}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(status="ok", wall_s=time.perf_counter() - t0)
    return result


# --- parent ------------------------------------------------------------------------------------

def prepare_models(work: Path, archs) -> dict:
    """Save a random reference-size checkpoint per arch and export its graphs (timed)."""
    import torch

    from bsbr_core import ModelConfig, build_model, save_model
    from bsbr_core.onnx import export_onnx, weights_digest

    out = {}
    for arch in archs:
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch=arch, **REFERENCE)).eval()
        model_dir = work / arch
        save_model(model, None, model_dir)
        t0 = time.perf_counter()
        manifest = export_onnx(model, model_dir / "onnx", weights_digest(model.state_dict()))
        out[arch] = {"model_dir": str(model_dir), "onnx_dir": str(model_dir / "onnx"),
                     "export_s": time.perf_counter() - t0, "opset": manifest["opset"]}
        print(f"exported {arch} (opset {manifest['opset']}) in {out[arch]['export_s']:.0f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per (arch, length) case")
    ap.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "backends.json"))
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    import onnxruntime
    import torch

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bsbr-bench-backends-") as work:
        models = prepare_models(Path(work), args.archs)
        for arch in args.archs:
            for n in args.lengths:
                row = {"arch": arch, "tokens": n, "repeats": repeats_for(arch, n)}
                case = {"n": n, "repeats": row["repeats"], "threads": args.threads,
                        **{k: models[arch][k] for k in ("model_dir", "onnx_dir")}}
                result = spawn_case(case, args.timeout)
                row["status"] = result.pop("status")
                row.update(result)
                if row["status"] == "ok":
                    t, o = row["torch"], row["onnx"]
                    row["onnx_over_torch_median"] = o["median_s"] / t["median_s"]
                    row["onnx_over_torch_min"] = o["min_s"] / t["min_s"]
                    row["logits_max_abs_err"] = max(abs(a - b) for a, b in zip(t["logits"], o["logits"]))
                    print(f"  {arch:8s} {n:6d} torch {t['median_s'] * 1e3:,.1f} ms  onnx {o['median_s'] * 1e3:,.1f} ms",
                          flush=True)
                else:
                    print(f"  {arch:8s} {n:6d} {row['status']}", flush=True)
                rows.append(row)

    header = (f"{'arch':9s} {'tokens':>7s} {'torch ms':>11s} {'onnx ms':>11s} {'onnx/torch':>10s} "
              f"{'(min/min)':>9s} {'peak RSS':>9s} {'max|dlogit|':>11s}")
    table = [header, "-" * len(header)]
    for r in rows:
        if r["status"] != "ok":
            table.append(f"{r['arch']:9s} {r['tokens']:7d} {r['status']}")
            continue
        table.append(
            f"{r['arch']:9s} {r['tokens']:7d} {r['torch']['median_s'] * 1e3:11,.1f} {r['onnx']['median_s'] * 1e3:11,.1f} "
            f"{r['onnx_over_torch_median']:10.2f} {r['onnx_over_torch_min']:9.2f} "
            f"{r['peak_rss_bytes'] / 2**20:6,.0f} MB {r['logits_max_abs_err']:11.1e}")
    print("\n" + "\n".join(table))

    result = {
        "benchmark": "one-shot latency, torch vs ONNX Runtime (CPU execution provider)",
        "reference_config": REFERENCE,
        "batch": 1,
        "statistic": "median and min of `repeats` timed calls per backend, alternated torch/onnx in one child "
                     "process, after one warm-up call per backend on the first 1024 tokens; peak RSS is the "
                     "child's (both backends loaded)",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "export_s": {a: models[a]["export_s"] for a in args.archs},
        "opset": {a: models[a]["opset"] for a in args.archs},
        "timeout_s": args.timeout,
        "rows": [{k: ({kk: vv for kk, vv in v.items() if kk != "logits"} if isinstance(v, dict) else v)
                  for k, v in r.items()} for r in rows],
        "table": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
