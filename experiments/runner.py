"""The experiments runner: experiments as data, one runner, results as JSON.

    python -m experiments run NAME [--profile smoke|cpu|gpu] [--device cpu] [--out DIR]
    python -m experiments run all [--profile ...]
    python -m experiments report            # docs/experiments.md from experiments/results/*.json

An experiment is a module of this package with
- ``PROFILES``: profile name -> a settings dataclass instance (smoke runs in
  seconds in the tests, cpu gives the reported numbers on 2 CPU cores, gpu is
  the larger version);
- ``CLAIMS``: the research page's numbers it is set beside;
- ``run(settings, ctx) -> dict``: measures and returns the results (it writes
  its figures into ``ctx.out_dir`` and may keep resumable work in ``ctx.work_dir``);
- ``report(record) -> str``: the markdown section of docs/experiments.md.

The runner writes ``<out>/NAME.json``: command, profile, machine (cpus, torch
version, load average before and after), settings, wall time, claims and the
results.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent
RESULTS_DIR = ROOT / "results"
CHECKPOINTS_DIR = ROOT / "checkpoints"
WORK_DIR = ROOT.parent / "runs" / "experiments"
REPORT_PATH = ROOT.parent / "docs" / "experiments.md"

# Report order. Each name is a module experiments/<name>.py; a name whose module
# is not written yet is listed in the report as not measured.
ALL_EXPERIMENTS = ("long_range", "scaling", "training_convergence", "training_memory", "sparsity",
                   "attention_maps", "chunk_size", "compression", "document_processing", "multimodal")
EXPERIMENTS = tuple(n for n in ALL_EXPERIMENTS if (ROOT / f"{n}.py").is_file())
PROFILE_NAMES = ("smoke", "cpu", "gpu")


@dataclass
class RunContext:
    """Where a run writes: figures and results into out_dir, resumable
    training runs into work_dir, shipped checkpoints into checkpoints_dir."""

    name: str
    profile: str
    out_dir: Path
    work_dir: Path
    checkpoints_dir: Path | None
    device: str = "cpu"
    progress: bool = True

    def log(self, msg: str) -> None:
        if self.progress:
            print(f"[{self.name}/{self.profile}] {msg}", file=sys.stderr, flush=True)


def experiment_module(name: str) -> ModuleType:
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; expected one of {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"experiments.{name}")


def machine_info(threads: int | None = None) -> dict:
    import torch

    info = {
        "cpus": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _jsonable(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return round(x, 6)
    return x


def run_experiment(name: str, profile: str = "cpu", device: str = "cpu", out_dir: str | Path | None = None,
                   progress: bool = True, command: str | None = None) -> dict:
    """Run one experiment's profile; write and return its record."""
    mod = experiment_module(name)
    if profile not in mod.PROFILES:
        raise KeyError(f"{name} has no profile {profile!r}; it has {', '.join(mod.PROFILES)}")
    settings = mod.PROFILES[profile]
    smoke = profile == "smoke"
    out = Path(out_dir) if out_dir is not None else (RESULTS_DIR / "smoke" if smoke else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(
        name=name, profile=profile, out_dir=out,
        work_dir=(out / "work" if out_dir is not None or smoke else WORK_DIR) / name / profile,
        checkpoints_dir=None if smoke or out_dir is not None else CHECKPOINTS_DIR / name,
        device=device, progress=progress,
    )
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    t0 = time.perf_counter()
    results = mod.run(settings, ctx)
    wall = time.perf_counter() - t0
    record = {
        "name": name,
        "command": command or f"python -m experiments run {name} --profile {profile}",
        "profile": profile,
        "machine": {**machine_info(), "load_average_before": load_before, "load_average_after": load_average()},
        "wall_time_s": round(wall, 1),
        "settings": _jsonable(settings),
        "claims": _jsonable(getattr(mod, "CLAIMS", {})),
        "results": _jsonable(results),
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def write_report(results_dir: str | Path = RESULTS_DIR, path: str | Path = REPORT_PATH) -> Path:
    """docs/experiments.md: one section per experiment that has results."""
    results_dir, path = Path(results_dir), Path(path)
    parts = [
        "# Experiments: the research page's claims, measured here",
        "",
        "Generated by `python -m experiments report` from `experiments/results/*.json`; do not edit by hand.",
        "Each section: what was run, the page's claim beside the measured result, the figures, and whether",
        "the claim holds here. Rerun an experiment with the command its section names.",
        "",
    ]
    missing = []
    for name in ALL_EXPERIMENTS:
        f = results_dir / f"{name}.json"
        if not f.is_file() or name not in EXPERIMENTS:
            missing.append(name)
            continue
        record = json.loads(f.read_text())
        m = record["machine"]
        parts += [
            f"## {name}",
            "",
            f"- command: `{record['command']}` (profile `{record['profile']}`)",
            f"- machine: {m['cpus']} CPUs, {m.get('gpu', 'no GPU')}, torch {m['torch']}, "
            f"load average {m['load_average_before']} before, {m['load_average_after']} after",
            f"- wall time: {record['wall_time_s'] / 60:.1f} min",
            "",
            experiment_module(name).report(record).rstrip(),
            "",
        ]
    if missing:
        parts += ["## Not yet measured", "", "No results yet for: " + ", ".join(f"`{n}`" for n in missing) + ".", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
