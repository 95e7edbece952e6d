"""experiments/scaling.py and experiments/memory.py: the analytic FLOPs against
torch's FLOP counter, the memory measurement against known allocations, the
load marks, the cache and the skipping of points past the caps."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bsbr_core import ModelConfig, build_model
from bsbr_core.attention.base import Attention
from experiments import memory, scaling

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=97, hidden_dim=32, num_layers=2, num_heads=2, ff_dim=48, chunk_size=8,
             labels=["a", "b", "c"], window=11, segment_tokens=32)


def _sdpa_as_matmuls(self, q, k, v, attn_mask=None):
    """SDPA written as the two products it costs (FlopCounterMode does not count CPU SDPA)."""
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def _counted(cfg: dict, n: int, monkeypatch) -> int:
    monkeypatch.setattr(Attention, "sdpa", _sdpa_as_matmuls)
    model = build_model(ModelConfig(**cfg)).eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    return counter.get_total_flops()


@pytest.mark.parametrize("arch", scaling.ARCHS)
@pytest.mark.parametrize("n", [5, 8, 21, 40, 100])  # 100 > segment_tokens: read segment by segment
def test_model_flops_equal_the_flop_counter_over_the_real_forward(arch, n, monkeypatch):
    cfg = {**SMALL, "arch": arch}
    assert scaling.model_flops(arch, n, cfg) == _counted(cfg, n, monkeypatch)


@pytest.mark.parametrize("chunk, n", [(128, 300), (12, 50)])  # delta_net's algorithm chunk 64 and 8
def test_delta_net_flops_with_an_algorithm_chunk_below_chunk_size(chunk, n, monkeypatch):
    cfg = {**SMALL, "arch": "delta_net", "chunk_size": chunk, "segment_tokens": 8192}
    assert scaling.model_flops("delta_net", n, cfg) == _counted(cfg, n, monkeypatch)


def test_standard_flops_grow_quadratically_and_the_others_linearly():
    f = {a: [scaling.model_flops(a, n) for n in (8192, 16384)] for a in scaling.ARCHS}
    assert f["standard"][1] / f["standard"][0] > 3.0
    for a in scaling.LINEAR_TIME:
        assert f[a][1] / f[a][0] == pytest.approx(2.0, rel=0.05)


def _calibration(isolate: bool) -> dict:
    args = ("experiments.memory:calibration_point", {"mib": [200, 50, 120]})
    if isolate:
        return memory.run_point(*args, isolate=True)
    # In-process RSS is the whole process's: in the test runner, threads that
    # earlier tests left (Ray's driver, servers) allocate and free meanwhile,
    # and a 50 MiB phase once measured 0 there. So the in-process path is
    # checked in a process with nothing else going on, as it is meant to run.
    code = ("import json, sys; from experiments import memory; "
            f"print(json.dumps(memory.run_point(*{args!r}, isolate=False)))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("isolate", [True, False])
def test_phase_peaks_measure_known_allocations(isolate):
    # Phases in either order: each phase's peak over its start is what it allocated.
    out = _calibration(isolate)
    assert out["phases"]["peak_reset"]
    for got, want in zip(out["added_mib"], [200, 50, 120]):
        assert want - 1 <= got <= want + 8  # MiB
    if isolate:  # the child's peak over its life: the largest phase, though the last phase reset the mark
        assert out["child_peak_rss_bytes"] >= out["phases"]["phase0"]["before"] + 200 * 2**20 > out["phases"]["phase2"]["peak"]


FRAGMENTED = """
import sys
from experiments import memory
if sys.argv[1] == "off":
    memory.release_free_memory = lambda: False
freed = [bytearray(64 * 1024) for _ in range(1600)]  # 100 MiB on the C heap (below the mmap threshold)
top = bytearray(64 * 1024)  # holds the heap's top, so free() cannot shrink it
del freed  # 100 MiB free and still resident
ph = memory.Phases()
with ph("p"):
    again = [bytearray(64 * 1024) for _ in range(800)]  # 50 MiB, on pages the heap already holds
print((ph.record["p"]["peak"] - ph.record["p"]["before"]) / 2**20)
"""


def test_a_phase_on_a_heap_with_free_resident_pages_still_measures_its_allocation():
    def added(mode):
        run = subprocess.run([sys.executable, "-c", FRAGMENTED, mode], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        return float(run.stdout.split()[-1])

    assert 49 <= added("on") <= 58  # MiB
    assert added("off") < 5  # the reason for release_free_memory: without it the reuse is invisible


def test_a_failing_child_gives_an_error_row():
    out = memory.run_point("experiments.memory:calibration_point", {"mib": "x"})
    assert "error" in out and "TypeError" in out["error"]


def _settings(**kw):
    return scaling.ScalingSettings(model=scaling.PROFILES["smoke"].model, archs=("bsbr",), lengths=(32,),
                                   grad_lengths=(32,), isolate=False, **kw)


def test_points_under_load_are_marked_and_remeasured_when_the_machine_is_quiet(tmp_path, monkeypatch):
    calls = []
    real = scaling.run_point

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(scaling, "run_point", counting)
    s = _settings()
    monkeypatch.setattr(scaling.os, "getloadavg", lambda: (3.0, 2.0, 1.0))
    row = scaling.measure("inference", "bsbr", 32, s, 1, tmp_path, log=lambda m: None)
    assert row["loaded"] and row["load_before"] == [3.0, 2.0, 1.0] and row["load_threshold"] == 1.5
    # Still loaded: the cached point is reused. Quiet: it is measured again, and no longer marked.
    scaling.measure("inference", "bsbr", 32, s, 1, tmp_path, log=lambda m: None)
    assert len(calls) == 1
    monkeypatch.setattr(scaling.os, "getloadavg", lambda: (0.2, 0.5, 1.0))
    row = scaling.measure("inference", "bsbr", 32, s, 1, tmp_path, log=lambda m: None)
    assert len(calls) == 2 and not row["loaded"]
    # Memory points are valid under load: a loaded training point is reused.
    monkeypatch.setattr(scaling.os, "getloadavg", lambda: (3.0, 2.0, 1.0))
    scaling.measure("training", "bsbr", 32, s, 1, tmp_path, log=lambda m: None)
    monkeypatch.setattr(scaling.os, "getloadavg", lambda: (0.2, 0.5, 1.0))
    scaling.measure("training", "bsbr", 32, s, 1, tmp_path, log=lambda m: None)
    assert calls.count("experiments.memory:training_step_point") == 1
    cached = json.loads((tmp_path / "inference" / "bsbr_1x32.json").read_text())
    assert cached["time_s"] == row["time_s"]
    # Other code (a changed mechanism): measured again.
    monkeypatch.setattr(scaling, "code_version", lambda arch: "changed")
    scaling.measure("training", "bsbr", 32, s, 1, tmp_path, log=lambda m: None)
    assert calls.count("experiments.memory:training_step_point") == 2


def test_points_predicted_past_the_time_cap_are_skipped(monkeypatch):
    seen = []

    def fake(target, kwargs, **_):
        n = kwargs["n"]
        seen.append(n)
        return {"time_s": 1e-3 * n * n, "peak_rss_bytes": 1e6 * n, "peak_added_bytes": 1e5 * n}

    monkeypatch.setattr(scaling, "run_point", fake)
    s = _settings(max_point_s=20.0, reps=1)
    s.lengths = (32, 64, 128, 256)
    rows, skipped = scaling.sweep("inference", s, 1, None, log=lambda m: None)
    # 32 -> 1 s, 64 -> 4 s, 128 -> 16 s; 256 is predicted at 65 s > 20 s.
    assert seen == [32, 64, 128]
    assert [x["n"] for x in skipped] == [256] and "predicted 66 s" in skipped[0]["reason"]


def test_report_marks_loaded_points_and_names_the_methods(tmp_path):
    from experiments.runner import run_experiment

    record = run_experiment("scaling", "smoke", out_dir=tmp_path, progress=False)
    r = record["results"]
    assert {row["arch"] for row in r["inference"]} == set(scaling.ARCHS)
    for row in r["inference"]:
        assert row["finite"] and row["flops"] == scaling.model_flops(row["arch"], row["n"], scaling.PROFILES["smoke"].model)
        assert len(row["load_before"]) == 3 and isinstance(row["loaded"], bool)
    for row in r["training"]:
        assert row["step_added_bytes"] >= 0 and row["gradient_bytes"] >= 0
    text = scaling.report(record)
    assert "FlopCounterMode" in text and "peak RSS" in text
    assert text.count(" †,") == sum(row["loaded"] for row in r["inference"])  # one mark per loaded point


def test_bench_wrapper_runs_the_same_measurements(tmp_path):
    out = tmp_path / "scaling"
    cmd = [sys.executable, str(ROOT / "bench" / "scaling.py"), "--smoke", "--archs", "bsbr", "linear",
           "--lengths", "32", "--out", str(out), "--threads", "1"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
    res = json.loads(out.with_suffix(".json").read_text())
    assert {r["arch"] for r in res["rows"]} == {"bsbr", "linear"}
    assert all("loaded" in r and "load_before" in r for r in res["rows"])
    assert out.with_suffix(".png").stat().st_size > 1000
