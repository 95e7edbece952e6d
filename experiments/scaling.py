"""Scaling: inference time, peak memory and FLOPs against document length, and
the memory a training step adds, for every mechanism at the reference size.

    python -m experiments run scaling --profile cpu --threads 1
    python bench/scaling.py ...        # the same measurements, bench/results/scaling.{json,png}

Reference size (docs/architecture.md 2): hidden 256, 4 heads, 4 layers, ff
1024, chunk 128, vocab 16384, float32, batch 1.

- Inference: each (mechanism, length) point runs in a child process of its
  own (experiments.memory.run_point): the model is built, warmed up on 512
  tokens, then the one-shot forward (`model(ids)` under inference_mode, so
  inputs over `segment_tokens` run segment by segment as the model does)
  runs `reps` times; the time is the median (wall clock; CPU time beside
  it), and the memory is the child's measured peak RSS during those
  forwards, reported as the peak of the process and as the addition over
  the child's RSS after model load and warm-up.
- Gradient memory: a child per point builds the model in train mode, runs
  one warm-up step on two chunks, then forward + backward at batch 1
  (experiments.memory.training_step_point); the memory a training step adds
  is the highest RSS during forward and backward minus the RSS before the
  forward (model, its gradients not yet allocated).
- FLOPs: counted analytically (`model_flops`): the matmul FLOPs of the
  algorithm as implemented (2 m n k per product, the padding included);
  tests/test_experiments_scaling.py checks them equal to torch's
  FlopCounterMode over the real forward (with SDPA routed through two
  matmuls, since FlopCounterMode does not count CPU SDPA).
- Load: every point records os.getloadavg() before and after; a point whose
  1-minute load average (before or after) is above the benchmark's own
  torch threads + 0.5 is marked `"loaded": true` (its timing is not
  trustworthy; its memory is). Finished points are cached in the work
  folder (keyed by the settings and a digest of the mechanism's code); a
  loaded timing point is measured again when the command is rerun on a
  quiet machine.
- A point predicted (by extrapolating the mechanism's last two points) to
  take longer than `max_point_s` or to need more than `mem_cap_gib` is not
  run, and the longer ones neither; the results list them as skipped.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from experiments.memory import GIB, Phases, _sync, run_point, used_bytes

REFERENCE = dict(vocab_size=16384, hidden_dim=256, num_layers=4, num_heads=4, ff_dim=1024, chunk_size=128,
                 labels=[f"c{i}" for i in range(17)], window=256)
ARCHS = ("bsbr", "standard", "linear", "sliding_window", "delta_net")
LINEAR_TIME = ("bsbr", "linear", "sliding_window", "delta_net")
PAGE_LENGTHS = (64, 128, 256, 512, 1024, 2048)

# The research page's scaling and memory claims.
CLAIMS = {
    "time_complexity": {"bsbr": "O(n)", "standard": "O(n^2)"},
    "peak_memory_gb_64_to_2048": {"bsbr": [0.5, 3.3], "standard": [1.0, 32.0]},
    "gradient_memory_gb_64_to_2048": {"bsbr": [0.3, 1.8], "standard": [0.8, 25.6]},
}


@dataclass
class ScalingSettings:
    model: dict = field(default_factory=lambda: dict(REFERENCE))
    archs: tuple[str, ...] = ARCHS
    lengths: tuple[int, ...] = PAGE_LENGTHS + (4096, 8192, 16384, 32768, 65536)
    # further lengths for the mechanisms linear in n only
    linear_extra: tuple[int, ...] = ()
    reps: int = 3                      # forwards per point (median) ...
    reps_above: tuple[int, int] = (8192, 1)  # ... and above this length, this many
    grad_lengths: tuple[int, ...] = PAGE_LENGTHS + (4096, 8192, 16384)
    max_point_s: float = 150.0         # skip a point predicted to take longer
    mem_cap_gib: float = 16.0          # skip a point predicted to need more
    timeout_s: float = 900.0
    threads: int | None = None         # torch threads of each point (None: the runner's)
    isolate: bool = True               # each point in a child process of its own
    seed: int = 0


PROFILES = {
    "smoke": ScalingSettings(
        model=dict(vocab_size=97, hidden_dim=32, num_layers=1, num_heads=2, ff_dim=48, chunk_size=16,
                   labels=["a", "b"], window=16, segment_tokens=64),
        lengths=(32, 128), grad_lengths=(32, 64), max_point_s=60, mem_cap_gib=2, timeout_s=120, isolate=False),
    # 2 cores: standard stops where a point would pass max_point_s (about 32K),
    # training points stop at 16K (bounded time on a shared 24 GiB machine).
    "cpu": ScalingSettings(mem_cap_gib=10.0),
    "gpu": ScalingSettings(linear_extra=(131072, 262144), grad_lengths=PAGE_LENGTHS + (4096, 8192, 16384, 32768, 65536),
                           max_point_s=600, timeout_s=1800),
}


# --- FLOPs ---------------------------------------------------------------------------

def _attention_flops(arch: str, n: int, T0: int, cfg: dict) -> float:
    """Matmul FLOPs of one layer's attention over a piece of n tokens after T0 carried ones."""
    D, H, B = cfg["hidden_dim"], cfg["num_heads"], cfg["chunk_size"]
    d = D // H
    C = math.ceil(n / B)
    npad = C * B
    if arch == "standard":  # one SDPA per query chunk against the keys up to its end
        return H * sum(4 * (min(s + B, n) - s) * (T0 + min(s + B, n)) * d for s in range(0, n, B))
    if arch == "bsbr":
        if cfg.get("compression_factor", 1) != 1:
            raise ValueError("model_flops counts BSBR without compression only")
        Ct = T0 // B + C  # chunks retrieved over: carried + this piece's
        return (H * (4 * npad * B * d        # local SDPA inside chunks (QK^T, AV)
                     + 2 * npad * d * d      # chunk states F = k^T v
                     + 2 * C * Ct * d        # retrieval scores r.h (over every chunk, masked)
                     + 2 * C * Ct * d * d    # S_c = sum_j a_cj F_j
                     + 2 * npad * d * d)     # q S_c
                + 2 * 2 * C * D * D)         # meta key and query projections of the chunk means
    if arch == "linear":
        return H * (2 * npad * d * d + 4 * npad * B * d + 2 * npad * d * d)
    if arch == "sliding_window":
        return H * 4 * npad * (cfg.get("window", 256) + B) * d
    if arch == "delta_net":
        from bsbr_core.attention.delta_net import SUB_CHUNK

        Bs = 1 << (min(B, SUB_CHUNK).bit_length() - 1)  # DeltaNetAttention.sub_chunk
        Cs = math.ceil(n / Bs)
        inverse = 2 * Bs * sum(w * w for w in (2**i for i in range(int(math.log2(Bs)))))
        per_chunk = 10 * Bs * Bs * d + 8 * Bs * d * d + 2 * d**3 + inverse
        return H * Cs * per_chunk + 2 * n * D * H  # + beta projection
    raise ValueError(f"unknown arch {arch!r}")


def model_flops(arch: str, n: int, cfg: dict = REFERENCE, grad: bool = False) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward over n tokens at batch 1,
    as bsbr_core implements it: without autograd an input longer than
    segment_tokens runs segment by segment with the carried state."""
    D, L, ff = cfg["hidden_dim"], cfg["num_layers"], cfg["ff_dim"]
    B = cfg["chunk_size"]
    seg = max(B, cfg.get("segment_tokens", 8192) // B * B)
    pieces = [(0, n)] if grad or n <= seg else [(s, min(n, s + seg) - s) for s in range(0, n, seg)]
    total = 0.0
    for T0, m in pieces:
        dense = 2 * m * D * 3 * D + 2 * m * D * D + 2 * 2 * m * D * ff  # qkv, out, feed-forward
        total += L * (dense + _attention_flops(arch, m, T0, cfg))
    return total + 2 * D * len(cfg["labels"])  # classifier head on the pooled vector


def matmul_gflops(size: int = 2048, reps: int = 5) -> float:
    """The machine's float32 matmul throughput with the current torch threads."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


# --- one point (run in a child process by experiments.memory.run_point) -------------

def inference_point(model: dict, arch: str, n: int, reps: int, seed: int = 0, device: str = "cpu") -> dict:
    """Time the one-shot forward over n tokens and measure its peak RSS (GPU: torch's allocated memory)."""
    import torch

    from bsbr_core import ModelConfig, build_model

    interpreter = used_bytes(device)
    torch.manual_seed(seed)
    m = build_model(ModelConfig(arch=arch, **model)).to(device).eval()
    V = m.config.vocab_size
    ph = Phases(device)
    with torch.inference_mode():
        m(torch.randint(0, V, (1, min(n, 512)), device=device))  # warm up kernels on a small input
        ids = torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(seed + n)).to(device)
        times, cpu = [], []
        with ph("forward"):
            for _ in range(reps):
                t, c = time.perf_counter(), time.process_time()
                logits = m(ids)
                _sync(device)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        ok = bool(torch.isfinite(logits).all())
    f = ph.record["forward"]
    return {"arch": arch, "n": n, "reps": reps, "times_s": times, "time_s": statistics.median(times),
            "cpu_times_s": cpu, "cpu_time_s": statistics.median(cpu), "finite": ok,
            "threads": torch.get_num_threads(), "device": device, "interpreter_rss_bytes": interpreter,
            "baseline_rss_bytes": f["before"], "peak_rss_bytes": f["peak"],
            "peak_added_bytes": f["peak"] - f["before"], "peak_reset": ph.record["peak_reset"]}


def side_by_side(model: dict, archs, lengths, reps: int = 3, seed: int = 0, log=print) -> list[dict]:
    """Every arch's one-shot forward in this one process, round robin (arch 1,
    arch 2, ..., then again) so that a change of load hits all of them alike;
    median of `reps`. Time only (memory needs a process per point)."""
    import torch

    from bsbr_core import ModelConfig, build_model

    models = {}
    for a in archs:
        torch.manual_seed(seed)
        models[a] = build_model(ModelConfig(arch=a, **model)).eval()
    rows = []
    with torch.inference_mode():
        for m in models.values():
            m(torch.randint(0, m.config.vocab_size, (1, 512)))
        for n in lengths:
            ids = torch.randint(0, model["vocab_size"], (1, n), generator=torch.Generator().manual_seed(seed + n))
            before = _loadavg()
            times: dict[str, list[float]] = {a: [] for a in models}
            cpu: dict[str, list[float]] = {a: [] for a in models}
            for _ in range(reps):
                for a, m in models.items():
                    t, c = time.perf_counter(), time.process_time()
                    m(ids)
                    times[a].append(time.perf_counter() - t)
                    cpu[a].append(time.process_time() - c)
            after = _loadavg()
            thr = load_threshold(torch.get_num_threads())
            med = {a: statistics.median(v) for a, v in times.items()}
            for a in models:
                rows.append({"arch": a, "n": n, "times_s": times[a], "time_s": med[a], "cpu_times_s": cpu[a],
                             "us_per_token": med[a] / n * 1e6,
                             "ratio_to_bsbr": med[a] / med["bsbr"] if "bsbr" in med else None,
                             "load_before": before, "load_after": after, "load_threshold": thr,
                             "loaded": max(before[0], after[0]) > thr, "threads": torch.get_num_threads()})
            log(f"n={n:>6} load {before[0]:.2f}->{after[0]:.2f}{' (loaded)' if rows[-1]['loaded'] else ''}  "
                + "  ".join(f"{a} {med[a]:.3f}s" + (f" ({med[a] / med['bsbr']:.2f}x)" if "bsbr" in med else "")
                            for a in models))
    return rows


# --- the sweep -------------------------------------------------------------------------

def load_threshold(threads: int) -> float:
    return threads + 0.5


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _predict(points: list[tuple[int, float]], n: int) -> float | None:
    """Extrapolate y(n) from the last two (n, y) points by their log-log slope (at least linear)."""
    pts = [(a, y) for a, y in points if y and y > 0]
    if len(pts) < 2:
        return None
    (n1, y1), (n2, y2) = pts[-2], pts[-1]
    slope = max(1.0, math.log(y2 / y1) / math.log(n2 / n1)) if n2 != n1 and y2 > 0 and y1 > 0 else 1.0
    return y2 * (n / n2) ** slope


def code_version(arch: str) -> str:
    """A digest of the code a point of `arch` runs (its mechanism, the shared
    attention frame, the model), so that a cached point measured with other
    code is measured again."""
    import hashlib

    root = Path(__file__).resolve().parents[1] / "bsbr_core"
    h = hashlib.sha256()
    for f in (root / "attention" / f"{arch}.py", root / "attention" / "base.py", root / "model.py"):
        h.update(f.read_bytes() if f.is_file() else b"")
    return h.hexdigest()[:12]


def measure(kind: str, arch: str, n: int, s: ScalingSettings, threads: int, work_dir: Path | None,
            log=print, batch: int = 1, device: str = "cpu") -> dict:
    """One point: from the cache (see the module docstring) or measured now."""
    key = {"kind": kind, "arch": arch, "n": n, "batch": batch, "model": s.model, "threads": threads, "device": device,
           "reps": _reps(n, s) if kind == "inference" else None, "seed": s.seed, "isolate": s.isolate,
           "code": code_version(arch)}
    cache = None if work_dir is None else work_dir / kind / f"{arch}_{batch}x{n}.json"
    thr = load_threshold(threads)
    if cache is not None and cache.is_file():
        row = json.loads(cache.read_text())
        quiet_now = os.getloadavg()[0] <= thr
        if row.get("key") == key and "error" not in row and not (kind == "inference" and row["loaded"] and quiet_now):
            return row
    before = _loadavg()
    if kind == "inference":
        row = run_point("experiments.scaling:inference_point",
                        dict(model=s.model, arch=arch, n=n, reps=key["reps"], seed=s.seed, device=device),
                        threads=threads, timeout=s.timeout_s, isolate=s.isolate)
    else:
        row = run_point("experiments.memory:training_step_point",
                        dict(model={**s.model, "arch": arch}, batch=batch, n=n, optimizer=False, seed=s.seed,
                             device=device),
                        threads=threads, timeout=s.timeout_s, isolate=s.isolate)
    after = _loadavg()
    row.update(arch=arch, n=n, batch=batch, key=key, load_before=before, load_after=after,
               load_threshold=thr, loaded=max(before[0], after[0]) > thr)
    if kind == "inference" and "time_s" in row:
        row["flops"] = model_flops(arch, n, s.model)
        row["gflops_per_s"] = row["flops"] / row["time_s"] / 1e9
        row["us_per_token"] = row["time_s"] / n * 1e6
    if cache is not None and "error" not in row:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(row, indent=1) + "\n")
    log(_describe(kind, row))
    return row


def _reps(n: int, s: ScalingSettings) -> int:
    return s.reps if n <= s.reps_above[0] else s.reps_above[1]


def _describe(kind: str, r: dict) -> str:
    head = f"{kind:>9} {r['arch']:>15} {r.get('batch', 1)}x{r['n']:<7}"
    if "error" in r:
        return f"{head} error: {r['error']}"
    mark = "  (loaded)" if r["loaded"] else ""
    if kind == "inference":
        return (f"{head} {r['time_s']:9.3f} s  {r['us_per_token']:8.1f} us/tok  peak {r['peak_rss_bytes'] / GIB:6.2f} GiB "
                f"(+{r['peak_added_bytes'] / GIB:5.2f})  load {r['load_before'][0]:.2f}{mark}")
    return (f"{head} step adds {r['step_added_bytes'] / GIB:6.2f} GiB (fwd {r['forward_s']:.2f} s, "
            f"bwd {r['backward_s']:.2f} s)  load {r['load_before'][0]:.2f}{mark}")


def sweep(kind: str, s: ScalingSettings, threads: int, work_dir: Path | None, log=print,
          device: str = "cpu") -> tuple[list, list]:
    """Every arch's points of one kind ("inference" or "training"), skipping
    the ones predicted to pass the time or memory cap. Returns (rows, skipped)."""
    rows, skipped = [], []
    for arch in s.archs:
        if kind == "inference":
            lengths = list(s.lengths) + (list(s.linear_extra) if arch in LINEAR_TIME else [])
        else:
            lengths = list(s.grad_lengths)
        done: list[dict] = []
        for i, n in enumerate(lengths):
            if done:
                t_key, m_key = ("time_s", "peak_rss_bytes") if kind == "inference" else ("step_s", "step_peak_rss_bytes")
                t = _predict([(r["n"], r[t_key] * (_reps(n, s) if kind == "inference" else 1)) for r in done], n)
                mem = _predict([(r["n"], r[m_key]) for r in done], n)
                why = None
                if t is not None and t > s.max_point_s:
                    why = f"predicted {t:.0f} s > {s.max_point_s:.0f} s"
                elif mem is not None and mem > s.mem_cap_gib * GIB:
                    why = f"predicted {mem / GIB:.1f} GiB > {s.mem_cap_gib:g} GiB"
                elif mem is not None and device == "cpu" and mem > _available_bytes():
                    why = f"predicted {mem / GIB:.1f} GiB > {_available_bytes() / GIB:.1f} GiB available now"
                if why:
                    skipped += [{"kind": kind, "arch": arch, "n": m, "reason": why} for m in lengths[i:]]
                    log(f"{kind:>9} {arch:>15} skips n >= {n}: {why}")
                    break
            row = measure(kind, arch, n, s, threads, work_dir, log, device=device)
            rows.append(row)
            if "error" in row:
                skipped += [{"kind": kind, "arch": arch, "n": m, "reason": f"n = {n} failed"} for m in lengths[i + 1:]]
                break  # longer inputs would fail the same way
            done.append(row)
    return rows, skipped


def _available_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 - GIB  # leave 1 GiB to the rest of the machine
    except OSError:
        pass
    return float("inf")


# --- the experiment --------------------------------------------------------------------

def run(s: ScalingSettings, ctx) -> dict:
    import torch

    threads = s.threads or torch.get_num_threads()
    ctx.log(f"inference and training-step memory of {', '.join(s.archs)}; {threads} torch thread(s) per point")
    peak = matmul_gflops()
    inf_rows, inf_skipped = sweep("inference", s, threads, ctx.work_dir, ctx.log, ctx.device)
    tr_rows, tr_skipped = sweep("training", s, threads, ctx.work_dir, ctx.log, ctx.device)
    for r in inf_rows:
        if "gflops_per_s" in r:
            r["fraction_of_matmul_peak"] = r["gflops_per_s"] / peak
    summary = summarize(inf_rows, tr_rows)
    plot(inf_rows, tr_rows, ctx.out_dir / "scaling.png", s.model)
    return {"threads": threads, "matmul_gflops": peak, "load_threshold": load_threshold(threads),
            "flops_method": "analytic (model_flops), checked against torch.utils.flop_counter.FlopCounterMode",
            "memory_method": "peak RSS of a child process per point, less its RSS after model load "
                             "(experiments.memory; VmHWM reset per phase)",
            "inference": inf_rows, "training": tr_rows, "skipped": inf_skipped + tr_skipped, "summary": summary}


def _by(rows: list[dict]) -> dict:
    return {(r["arch"], r["n"]): r for r in rows if "error" not in r}


def _fit_exponent(pts: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log y against log n."""
    pts = [(math.log(n), math.log(y)) for n, y in pts if y > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


def summarize(inf_rows: list[dict], tr_rows: list[dict]) -> dict:
    inf, tr = _by(inf_rows), _by(tr_rows)
    archs = list(dict.fromkeys(r["arch"] for r in inf_rows + tr_rows))
    out: dict = {"time_ratio_to_bsbr": {}, "time_exponent_from_1k": {}, "any_loaded": any(
        r.get("loaded") for r in inf_rows if "error" not in r)}
    for a in archs:
        ns = sorted(n for (b, n) in inf if b == a)
        out["time_ratio_to_bsbr"][a] = {str(n): inf[(a, n)]["time_s"] / inf[("bsbr", n)]["time_s"]
                                        for n in ns if ("bsbr", n) in inf}
        out["time_exponent_from_1k"][a] = _fit_exponent([(n, inf[(a, n)]["time_s"]) for n in ns if n >= 1024])

    def rng(table, a, key):
        vals = [table[(a, n)][key] / GIB for n in PAGE_LENGTHS if (a, n) in table]
        return [min(vals), max(vals)] if len(vals) == len(PAGE_LENGTHS) else None

    out["peak_memory_gib_64_to_2048"] = {a: rng(inf, a, "peak_rss_bytes") for a in archs}
    out["peak_added_gib_64_to_2048"] = {a: rng(inf, a, "peak_added_bytes") for a in archs}
    out["gradient_memory_gib_64_to_2048"] = {a: rng(tr, a, "step_added_bytes") for a in archs}
    out["longest_training_point"] = {a: max((n for (b, n) in tr if b == a), default=None) for a in archs}
    return out


def plot(inf_rows: list[dict], tr_rows: list[dict], path: Path, model: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inf, tr = _by(inf_rows), _by(tr_rows)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    panels = [
        (axes[0, 0], inf, lambda r: r["time_s"], "one-shot inference time", "seconds"),
        (axes[0, 1], inf, None, "inference time / BSBR's (same run)", "ratio"),
        (axes[0, 2], inf, lambda r: r["flops"], "matmul FLOPs of one forward (analytic)", "FLOPs"),
        (axes[1, 0], inf, lambda r: r["peak_rss_bytes"] / GIB, "inference: peak RSS of the process", "GiB"),
        (axes[1, 1], inf, lambda r: r["peak_added_bytes"] / GIB, "inference: peak RSS over the loaded model", "GiB"),
        (axes[1, 2], tr, lambda r: r["step_added_bytes"] / GIB, "training step (fwd + bwd, batch 1): RSS added",
         "GiB"),
    ]
    for ax, table, f, title, unit in panels:
        for i, a in enumerate(ARCHS):
            ns = sorted(n for (b, n) in table if b == a)
            if f is None:
                ns = [n for n in ns if ("bsbr", n) in table]
                ys = [table[(a, n)]["time_s"] / table[("bsbr", n)]["time_s"] for n in ns]
            else:
                ys = [f(table[(a, n)]) for n in ns]
            keep = [i for i, y in enumerate(ys) if y > 0]  # log axes (a tiny smoke point can measure 0)
            ns, ys = [ns[i] for i in keep], [ys[i] for i in keep]
            if not ns:
                continue
            line, = ax.plot(ns, ys, "-", label=a, color=f"C{i}")
            loaded = [table[(a, n)].get("loaded", False) for n in ns]
            ax.scatter([n for n, ld in zip(ns, loaded) if not ld], [y for y, ld in zip(ys, loaded) if not ld],
                       color=line.get_color(), zorder=3)
            ax.scatter([n for n, ld in zip(ns, loaded) if ld], [y for y, ld in zip(ys, loaded) if ld],
                       facecolors="none", edgecolors=line.get_color(), zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("document length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 1].axhline(1.5, color="grey", ls="--", lw=1)
    axes[0, 0].legend(fontsize=8)
    m = model
    fig.suptitle(f"hidden {m['hidden_dim']}, {m['num_heads']} heads, {m['num_layers']} layers, chunk {m['chunk_size']}, "
                 "float32, batch 1, CPU; hollow markers: measured under load (timings not trustworthy)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the report ------------------------------------------------------------------------

def _gib(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2f}" if x >= 0.1 else f"{x:.3f}")


def _range(v) -> str:
    return "-" if not v else f"{_gib(v[0])}-{_gib(v[1])}"


def report(record: dict) -> str:
    r, s = record["results"], record["settings"]
    m = s["model"]
    inf, tr = _by(r["inference"]), _by(r["training"])
    archs = [a for a in ARCHS if a in s["archs"]]
    lines = [
        f"**What was run.** Every mechanism at hidden {m['hidden_dim']}, {m['num_heads']} heads, {m['num_layers']} "
        f"layers, ff {m['ff_dim']}, chunk {m['chunk_size']}, float32, batch 1, {r['threads']} torch thread(s), "
        f"{'one child process per point' if s['isolate'] else 'all points in one process (smoke)'}. Inference: the one-shot forward (median of "
        f"{s['reps']} up to {s['reps_above'][0]} tokens, {s['reps_above'][1]} above). Memory: {r['memory_method']}. "
        "Gradient memory: the RSS a training step (forward + backward at batch 1, after a warm-up step) adds over "
        f"the RSS before its forward. FLOPs: {r['flops_method']}. The machine's float32 matmul peak: "
        f"{r['matmul_gflops']:.0f} GFLOP/s. A point is marked † when the 1-minute load average around it was above "
        f"{r['load_threshold']} (the benchmark's threads + 0.5): its time is not trustworthy, its memory is.",
        "",
        "**The page's claim.** BSBR O(n) time, standard O(n^2); peak memory 0.5-3.3 GB (BSBR) vs 1-32 GB "
        "(standard); gradient memory 0.3-1.8 GB vs 0.8-25.6 GB, at 64-2048 tokens.",
        "",
        "**Measured: inference** (seconds, ratio to BSBR in this run; peak RSS of the process in GiB, and in "
        "brackets its addition over the RSS after model load and warm-up):",
        "",
        "| n | " + " | ".join(archs) + " |",
        "|---:|" + "---:|" * len(archs),
    ]
    ns = sorted({n for (_, n) in inf})
    for n in ns:
        cells = []
        for a in archs:
            row = inf.get((a, n))
            if row is None:
                cells.append("-")
                continue
            ratio = "" if a == "bsbr" or ("bsbr", n) not in inf else f" ({row['time_s'] / inf[('bsbr', n)]['time_s']:.2f}x)"
            cells.append(f"{row['time_s']:.3g} s{ratio}{' †' if row.get('loaded') else ''}, "
                         f"{_gib(row['peak_rss_bytes'] / GIB)} (+{_gib(row['peak_added_bytes'] / GIB)})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "FLOPs of one forward (analytic, GFLOP):", "",
              "| n | " + " | ".join(archs) + " |", "|---:|" + "---:|" * len(archs)]
    for n in ns:
        lines.append(f"| {n} | " + " | ".join(
            f"{inf[(a, n)]['flops'] / 1e9:.3g}" if (a, n) in inf else "-" for a in archs) + " |")
    lines += ["", "**Measured: gradient memory** (GiB a training step adds at batch 1; forward / backward seconds):",
              "", "| n | " + " | ".join(archs) + " |", "|---:|" + "---:|" * len(archs)]
    for n in sorted({n for (_, n) in tr}):
        lines.append(f"| {n} | " + " | ".join(
            f"{_gib(tr[(a, n)]['step_added_bytes'] / GIB)} ({tr[(a, n)]['forward_s']:.2g} / "
            f"{tr[(a, n)]['backward_s']:.2g} s)" if (a, n) in tr else "-" for a in archs) + " |")
    if r["skipped"]:
        sk: dict = {}
        for x in r["skipped"]:
            sk.setdefault((x["kind"], x["arch"], x["reason"]), []).append(x["n"])
        lines += ["", "Not run: " + "; ".join(f"{k} {a} at n = {', '.join(map(str, v))} ({why})"
                                             for (k, a, why), v in sk.items()) + "."]
    lines += ["", "![scaling](../experiments/results/scaling.png)", "",
              "**Does the claim hold here?** " + verdict(r)]
    return "\n".join(lines) + "\n"


def verdict(r: dict) -> str:
    sm = r["summary"]
    ex = sm["time_exponent_from_1k"]
    out = []
    if ex.get("bsbr") is not None and ex.get("standard") is not None:
        out.append(f"Time grows as n^{ex['bsbr']:.2f} for BSBR and n^{ex['standard']:.2f} for standard from 1K tokens "
                   f"up to the longest length measured (a least-squares fit of log time on log n): BSBR's is "
                   + ("linear" if ex["bsbr"] < 1.15 else "not linear") + " and standard's is "
                   + ("quadratic-like" if ex["standard"] > 1.6 else "below quadratic") + " over this range.")
    ratios = sm["time_ratio_to_bsbr"]
    over = {a: max(v.values()) for a, v in ratios.items() if a not in ("bsbr", "standard") and v}
    if over:
        out.append("The linear-time baselines take at most " + ", ".join(f"{a} {x:.2f}x" for a, x in over.items())
                   + " BSBR's time at any length measured" + (" (some points under load)." if sm["any_loaded"] else "."))
    b, st = sm["peak_added_gib_64_to_2048"].get("bsbr"), sm["peak_added_gib_64_to_2048"].get("standard")
    if b and st:
        out.append(f"What the forward itself adds to the loaded model at 64-2048 tokens: BSBR {_range(b)} GiB, "
                   f"standard {_range(st)} GiB; the rest of the peak is the interpreter, torch and the weights.")
    for key, claim, name in (("peak_memory_gib_64_to_2048", "peak_memory_gb_64_to_2048", "Peak inference memory"),
                             ("gradient_memory_gib_64_to_2048", "gradient_memory_gb_64_to_2048", "Gradient memory")):
        b, st = sm[key].get("bsbr"), sm[key].get("standard")
        if b and st:
            c = CLAIMS[claim]
            out.append(f"{name} at 64-2048 tokens: BSBR {_range(b)} GiB, standard {_range(st)} GiB (page: "
                       f"{c['bsbr'][0]}-{c['bsbr'][1]} vs {c['standard'][0]}-{c['standard'][1]} GB); "
                       + ("standard needs more than BSBR here" if st[1] > 1.2 * b[1] else
                          "BSBR needs more than standard here" if b[1] > 1.2 * st[1] else
                          "the two are within 20% of each other here, so the page's gap does not appear at these lengths")
                       + ".")
    return " ".join(out) if out else "Not enough results to say."
