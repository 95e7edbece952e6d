"""Measured memory: resident set size (RSS) of a process, per phase of its work.

The experiments that report memory (`scaling`, `training_memory`) measure it
here, never from a formula:

- `rss_bytes()` is the process's resident set now (VmRSS); `peak_bytes()` its
  high-water mark (VmHWM, which is what `getrusage(...).ru_maxrss` reports).
- `reset_peak()` sets the high-water mark back to the current RSS (Linux:
  writing 5 to /proc/self/clear_refs), so `Phases` can give the peak of each
  phase of one process on its own: a forward pass, then the backward pass.
  Where the reset is not available the peaks are cumulative (each phase's
  peak is then the process's peak so far), and the record says so.
- `run_point("module:function", kwargs)` runs one measurement in a fresh
  Python process (so earlier points leave nothing in its allocator) and
  returns what the function returned, plus the child's peak RSS over its
  whole life (`lifetime_peak_bytes`: the reset discards the kernel's own
  record, so getrusage's ru_maxrss, and RUSAGE_CHILDREN in the parent, which
  is besides the maximum over all children so far, would not do).

RSS counts everything the process touched: the interpreter and libraries
(~0.3-0.5 GB with torch), the model, and what torch allocated. The
measurements subtract a baseline the child takes itself (after model load),
so an addition is the memory the phase needed on top of what was there.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_MARK = "MEMORY-POINT-RESULT "
GIB = 2**30


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: the peak is all there is


def peak_bytes() -> int:
    """High-water mark of the resident set (since the start or the last reset_peak)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_peak_before_reset = 0  # the highest high-water mark that a reset_peak() discarded


def lifetime_peak_bytes() -> int:
    """The process's peak RSS since it started, resets included."""
    return max(_peak_before_reset, peak_bytes())


def reset_peak() -> bool:
    """Set the high-water mark to the current RSS; False where the OS cannot."""
    global _peak_before_reset
    _peak_before_reset = lifetime_peak_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> bool:
    """Give the C allocator's free pages back to the OS (glibc's malloc_trim),
    so the RSS is what is live. Without it a long-lived process (a test run,
    a notebook) keeps freed heap pages resident, and a later allocation that
    reuses them raises no RSS: the phase would seem to allocate nothing.
    False where the C library has no malloc_trim."""
    try:
        import ctypes

        return bool(ctypes.CDLL(None).malloc_trim(0)) or True
    except (OSError, AttributeError):
        return False


def used_bytes(device: str = "cpu") -> int:
    """Memory in use now: the process's RSS on the CPU, torch's allocated bytes on a GPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.memory_allocated(device)
    return rss_bytes()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


class Phases:
    """Peak memory of successive phases of the work in this process.

        ph = Phases()
        with ph("forward"):
            loss = model(x).sum()
        with ph("backward"):
            loss.backward()
        ph.record  # {"forward": {"before", "peak", "after"}, ..., "peak_reset": True}

    before / after: RSS when the phase began / ended; peak: the highest RSS
    during the phase (or, without reset support, in the process so far).
    Each phase first hands the C heap's free pages back to the OS
    (`release_free_memory`), so memory the phase takes from them counts.
    On a GPU device the same from torch's allocator (memory_allocated,
    max_memory_allocated reset at each phase): the GPU memory, not the RSS.
    """

    def __init__(self, device: str = "cpu"):
        self.record: dict = {}
        self.resettable = True
        self.device = device

    @contextmanager
    def __call__(self, name: str):
        import gc

        gc.collect()
        cuda = self.device.startswith("cuda")
        if cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_free_memory()
            self.resettable = reset_peak() and self.resettable
        before = used_bytes(self.device)
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = peak_bytes()
        self.record[name] = {"before": before, "peak": max(peak, before), "after": used_bytes(self.device)}
        self.record["peak_reset"] = self.resettable


def training_step_point(model: dict, batch: int, n: int, optimizer: bool = True, seed: int = 0,
                        device: str = "cpu") -> dict:
    """The memory of one training step, phase by phase (run it in a child process).

    model: ModelConfig fields (arch included). The model is built in train
    mode (its dropout on), AdamW if `optimizer`, and one warm-up step on two
    chunks allocates what the first step allocates lazily (AdamW's moments,
    autograd's threads); its gradients are then freed (zero_grad set_to_none,
    as bsbr_core.train does before each backward). Then one step on a random
    (batch, n) input: forward (logits + cross-entropy), backward, and the
    optimizer step, each a phase of `Phases`.

    Derived, all measured (bytes):
    - model_state: RSS before the forward less the RSS after the imports
      (parameters, AdamW's two moments, and what the warm-up left)
    - activation: forward peak less the RSS before it
    - activation_held: RSS after the forward less before it (what autograd
      keeps for the backward)
    - gradient: backward peak less the RSS after the forward (what the
      backward adds: parameter gradients and the backward's temporaries)
    - step_added: the highest RSS of the step less the RSS before its forward
    - step_peak: the highest RSS of the step less the RSS after the imports
    On a GPU device: the same from torch's allocator (GPU memory in use, so
    the "after the imports" baseline is 0).
    """
    import gc

    import torch
    import torch.nn.functional as F

    from bsbr_core import ModelConfig, build_model

    interpreter = used_bytes(device)
    torch.manual_seed(seed)
    cfg = ModelConfig(**model)
    net = build_model(cfg).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4) if optimizer else None
    g = torch.Generator().manual_seed(seed + n)

    def data(b, m):
        return (torch.randint(0, cfg.vocab_size, (b, m), generator=g).to(device),
                torch.randint(0, cfg.num_labels, (b,), generator=g).to(device))

    ids, y = data(1, min(n, 2 * cfg.block_size))  # warm-up
    F.cross_entropy(net(ids), y).backward()
    if opt is not None:
        opt.step()
    net.zero_grad(set_to_none=True)
    del ids, y
    gc.collect()
    before = used_bytes(device)
    ids, y = data(batch, n)
    ph = Phases(device)
    seconds = {}
    with ph("forward"):
        t = time.perf_counter()
        loss = F.cross_entropy(net(ids).float(), y)
        _sync(device)
        seconds["forward"] = time.perf_counter() - t
    with ph("backward"):
        t = time.perf_counter()
        loss.backward()
        _sync(device)
        seconds["backward"] = time.perf_counter() - t
    if opt is not None:
        with ph("optimizer"):
            t = time.perf_counter()
            opt.step()
            _sync(device)
            seconds["optimizer"] = time.perf_counter() - t
    ok = bool(torch.isfinite(loss)) and all(p.grad is None or bool(torch.isfinite(p.grad).all())
                                            for p in net.parameters())
    grad_tensor_bytes = sum(p.grad.numel() * p.grad.element_size() for p in net.parameters() if p.grad is not None)
    params = sum(p.numel() for p in net.parameters())
    rec = ph.record
    fwd, bwd = rec["forward"], rec["backward"]
    top = max(rec[k]["peak"] for k in ("forward", "backward", "optimizer") if k in rec)
    return {
        "arch": cfg.arch, "batch": batch, "n": n, "optimizer": "AdamW" if optimizer else None, "finite": ok,
        "device": device, "memory_kind": "cuda allocator" if device.startswith("cuda") else "RSS",
        "threads": torch.get_num_threads(), "parameters": params, "parameter_bytes": params * 4,
        "grad_tensor_bytes": grad_tensor_bytes,
        "phases": rec, "interpreter_rss_bytes": interpreter, "before_forward_rss_bytes": before,
        "model_state_bytes": fwd["before"] - interpreter,
        "activation_bytes": fwd["peak"] - fwd["before"],
        "activation_held_bytes": fwd["after"] - fwd["before"],
        "gradient_bytes": bwd["peak"] - bwd["before"],
        "step_added_bytes": top - fwd["before"],
        "step_peak_bytes": top - interpreter,
        "step_peak_rss_bytes": top,
        "forward_s": seconds["forward"], "backward_s": seconds["backward"],
        "optimizer_s": seconds.get("optimizer", 0.0), "step_s": sum(seconds.values()),
        "peak_reset": rec["peak_reset"],
    }


def calibration_point(mib: list[int]) -> dict:
    """A check of the measurement itself: phase i allocates (and touches)
    mib[i] MiB with torch, then frees it. Each phase's peak less its start
    should come out as mib[i] MiB (plus allocator slack), whatever the order."""
    import torch

    ph = Phases()
    for i, m in enumerate(mib):
        with ph(f"phase{i}"):
            t = torch.ones(m * 2**20 // 4)  # float32, written: resident
            del t
    return {"phases": ph.record, "added_mib": [(ph.record[f"phase{i}"]["peak"] - ph.record[f"phase{i}"]["before"])
                                               / 2**20 for i in range(len(mib))]}


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def call(target: str, kwargs: dict):
    """Run "module:function" with kwargs in this process."""
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)(**kwargs)


def run_point(target: str, kwargs: dict, *, threads: int | None = 1, timeout: float = 1800,
              isolate: bool = True) -> dict:
    """Run one measurement, "module:function"(**kwargs) -> JSON-able dict.

    isolate: in a child process of its own (the result then has
    "child_peak_rss_bytes", the child's peak RSS over its whole life, and
    "child_wall_s"); otherwise in this process (fast, for the smoke profiles:
    the allocator keeps what earlier points freed). A child that fails, runs
    out of memory or runs past `timeout` seconds gives {"error": ...}.
    """
    if not isolate:
        set_threads(threads)
        return call(target, kwargs)
    cmd = [sys.executable, "-m", "experiments.memory", "--call", target, "--kwargs", json.dumps(kwargs)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s", "child_wall_s": round(time.perf_counter() - t0, 2)}
    wall = round(time.perf_counter() - t0, 2)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if p.returncode != 0 or not lines:
        if p.returncode in (-9, 137):
            reason = "killed (out of memory?)"
        else:
            reason = ((p.stderr or "").strip().splitlines()[-1:] or [f"exit status {p.returncode}"])[0]
        return {"error": reason, "child_wall_s": wall}
    result = json.loads(lines[-1][len(RESULT_MARK):])
    result["child_wall_s"] = wall
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run one measurement (experiments.memory.run_point's child)")
    ap.add_argument("--call", required=True, help="module:function")
    ap.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    result = call(args.call, json.loads(args.kwargs))
    # the resets were counted by the imported module (this one runs as __main__)
    result["child_peak_rss_bytes"] = importlib.import_module("experiments.memory").lifetime_peak_bytes()
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
