"""experiments/training_memory.py: the phases of a training step measured in a
child process against what they must at least hold (the parameter gradients,
AdamW's moments), growth with the input, and a report written from the values."""
from __future__ import annotations

import pytest

from experiments import training_memory
from experiments.memory import GIB, run_point

BIG_EMBEDDING = dict(arch="bsbr", vocab_size=65536, hidden_dim=256, num_layers=1, num_heads=4, ff_dim=256,
                     chunk_size=64, labels=["a", "b"])


def test_step_phases_hold_the_gradients_and_the_optimizer_state():
    # 16.8M parameters, almost all in the embedding, whose gradient is dense: 67 MB the backward must add.
    r = run_point("experiments.memory:training_step_point", {"model": BIG_EMBEDDING, "batch": 1, "n": 128})
    assert r["finite"] and r["peak_reset"] and r["optimizer"] == "AdamW"
    assert r["grad_tensor_bytes"] == r["parameter_bytes"] > 60 * 2**20
    assert 0.95 * r["grad_tensor_bytes"] <= r["gradient_bytes"] <= r["grad_tensor_bytes"] + 64 * 2**20
    # parameters + AdamW's two moments, at least
    assert r["model_state_bytes"] >= 0.95 * 3 * r["parameter_bytes"]
    assert set(r["phases"]) >= {"forward", "backward", "optimizer"}
    assert r["step_peak_bytes"] >= r["model_state_bytes"] + r["gradient_bytes"]
    assert r["child_peak_rss_bytes"] >= r["step_peak_rss_bytes"]


def test_activation_memory_grows_with_the_tokens():
    small = dict(arch="bsbr", vocab_size=97, hidden_dim=64, num_layers=2, num_heads=2, ff_dim=128,
                 chunk_size=64, labels=["a", "b"])
    a = [run_point("experiments.memory:training_step_point", {"model": small, "batch": b, "n": n})
         for b, n in ((1, 512), (1, 4096), (8, 512))]
    assert a[1]["activation_bytes"] > 4 * a[0]["activation_bytes"] > 0
    # the same tokens in 8 documents: about the same activations (within a third)
    assert a[2]["activation_bytes"] == pytest.approx(a[1]["activation_bytes"], rel=0.35)


def _row(arch, b, n, peak, grad, act):
    return {"arch": arch, "batch": b, "n": n, "step_peak_bytes": peak * GIB, "gradient_bytes": grad * GIB,
            "activation_bytes": act * GIB, "activation_held_bytes": act * GIB, "model_state_bytes": 0.1 * GIB}


@pytest.mark.parametrize("factor, says", [(6.0, "appears here"), (1.05, "does not appear here")])
def test_the_verdict_is_written_from_the_measured_values(factor, says):
    rows = [_row("bsbr", 1, 8192, 0.4, 0.02, 0.25), _row("standard", 1, 8192, 0.4 * factor, 0.02 * factor, 0.25)]
    r = {"rows": rows, "shapes": [[1, 8192]], "skipped": [], "model": training_memory.shipped_config(),
         "threads": 1, "memory_method": "m"}
    text = training_memory.verdict(r)
    assert says in text and f"{factor:.2f}x BSBR's peak" in text
    section = training_memory.report({"results": r, "settings": {}})
    assert "| standard | 1 x 8192 |" in section and "2.5 / 1.4 / 0.8" in section


def test_the_shipped_config_is_the_model_folders():
    cfg = training_memory.shipped_config()
    assert cfg["hidden_dim"] == 128 and cfg["chunk_size"] == 128 and "format" not in cfg
