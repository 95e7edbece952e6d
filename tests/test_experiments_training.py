"""The budget trainings (experiments/budget.py) and what training_convergence, chunk_size,
compression and document_processing compute from them."""
from __future__ import annotations

import json

import pytest

from experiments import chunk_size, compression, document_processing, training_convergence
from experiments.budget import Budget, accuracy_interval, build_data, train_and_score, training_key

TINY = dict(arch="bsbr", hidden_dim=16, num_layers=1, num_heads=2, ff_dim=16, chunk_size=8, window=8,
            pooling="last", dropout=0.0, rope_base=1e9)
SPEC = {"kind": "recall", "task": dict(num_pairs=2, num_keys=4, num_filler=4), "distances": [3, 20],
        "train_count": 32, "val_count": 8, "test_distances": [12], "test_count": 8}


def test_a_training_is_named_by_what_decides_it():
    b = Budget(epochs=1)
    k = training_key(TINY, SPEC, b, 0)
    assert k == training_key(dict(reversed(list(TINY.items()))), SPEC, b, 0)  # order does not matter
    assert k != training_key(TINY, SPEC, b, 1)
    assert k != training_key(TINY, SPEC, Budget(epochs=2), 0)
    assert k != training_key({**TINY, "chunk_size": 16}, SPEC, b, 0)
    # chunk_size's B = 32 run and compression's f = 1 run are one training.
    B32 = {**chunk_size.RECALL_MODEL, "chunk_size": 32}
    f1 = {**chunk_size.RECALL_MODEL, "compression_factor": 1}
    assert training_key(B32, chunk_size.RECALL, chunk_size.RECALL_BUDGET, 0) == \
        training_key(f1, compression.PROFILES["cpu"].recall, compression.PROFILES["cpu"].budget, 0)


def test_train_and_score_reads_a_finished_training_back(tmp_path):
    row = train_and_score(str(tmp_path), "t", TINY, SPEC, Budget(epochs=1, batch_tokens=256), seed=0)
    assert row["steps"] > 0 and set(row["test"]) == {"12"}
    assert 0 <= row["test"]["12"]["accuracy"] <= 1 and row["test"]["12"]["num_docs"] == 8
    scores = tmp_path / f"t-{row['key']}" / "scores.json"
    assert json.loads(scores.read_text()) == row
    # A second call does not train again: it returns what the first wrote.
    scores.write_text(json.dumps({**row, "steps": -1}))
    assert train_and_score(str(tmp_path), "t", TINY, SPEC, Budget(epochs=1, batch_tokens=256), seed=0)["steps"] == -1


def test_recall_test_sets_are_fresh_and_deterministic():
    data, tests = build_data(SPEC)
    data2, tests2 = build_data(SPEC)
    assert [d.tolist() for d in tests["12"].docs] == [d.tolist() for d in tests2["12"].docs]
    assert all(len(d) - 1 - 12 >= 0 for d in tests["12"].docs)
    train_seqs = {tuple(d.tolist()) for d in data.train.docs}
    assert not any(tuple(d.tolist()) in train_seqs for d in tests["12"].docs)


def test_wilson_interval():
    lo, hi = accuracy_interval(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.19, abs=0.01)
    assert accuracy_interval(0, 10)[0] == 0.0 and accuracy_interval(10, 10)[1] == pytest.approx(1.0)
    assert accuracy_interval(80, 1000)[1] - accuracy_interval(80, 1000)[0] < accuracy_interval(8, 100)[1] - \
        accuracy_interval(8, 100)[0]


def test_first_reach_is_the_first_validation_at_the_threshold():
    hist = [{"epoch": 1, "step": 10, "val_accuracy": 0.5}, {"epoch": 2, "step": 20, "val_accuracy": 0.91},
            {"epoch": 3, "step": 30, "val_accuracy": 0.8}, {"epoch": 4, "step": 40, "val_accuracy": 0.95}]
    assert training_convergence.first_reach(hist, 0.9) == (2, 20)
    assert training_convergence.first_reach(hist, 0.99) == (None, None)


@pytest.mark.parametrize("f", [1, 2, 4, 8, 16])
def test_state_bytes_per_chunk_measured_from_state_match_the_layer_shapes(f):
    cfg = dict(vocab_size=50, hidden_dim=64, num_layers=2, num_heads=2, ff_dim=32, chunk_size=8,
               labels=["a", "b"], arch="bsbr", compression_factor=f)
    sb = compression.state_bytes(cfg, carry_tokens=40, piece_tokens=16)
    assert sb["bytes_per_chunk"] == sb["expected_bytes_per_chunk"]
    assert sb["committed_tokens"] == 40 and sb["carried_tokens"] == 40
    # The carried State grows by one chunk's bytes per chunk committed, beyond the fixed part.
    more = compression.state_bytes(cfg, carry_tokens=80, piece_tokens=16)
    assert more["carried_bytes"] - sb["carried_bytes"] == 5 * sb["bytes_per_chunk"]


def test_document_summary_counts_pages_errors_and_accuracy():
    rows = [
        {"id": "a", "label": "x", "pred": "x", "num_tokens": 100, "per_page_ms": [10.0, 20.0], "total_ms": 35.0,
         "state_bytes": 5, "peak_memory_bytes": 1000},
        {"id": "b", "label": "y", "pred": "x", "num_tokens": 9000, "per_page_ms": [30.0], "total_ms": 31.0,
         "state_bytes": 9, "peak_memory_bytes": 3000},
        {"id": "c", "label": "y", "error": "too_long"},
    ]
    s = document_processing._summary(rows)
    assert s["documents"] == 2 and s["pages"] == 3 and s["errors"] == {"too_long": 1}
    assert s["seconds_per_page_mean"] == pytest.approx(0.02)
    assert s["seconds_per_document_mean"] == pytest.approx(0.033)
    assert s["peak_memory_bytes_max"] == 3000 and s["accuracy"] == 0.5
    assert document_processing._summary([])["accuracy"] is None
