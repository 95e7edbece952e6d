"""experiments/: the recall task's construction, the sample command, the runner and the report."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from bsbr_core import load_model
from experiments import long_range
from experiments.runner import ALL_EXPERIMENTS, EXPERIMENTS, experiment_module, run_experiment, write_report
from experiments.tasks import RecallTask

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("pair_tokens", [True, False])
def test_recall_sequences_put_the_pair_exactly_d_before_the_query(pair_tokens):
    task = RecallTask(num_pairs=4, num_keys=8, num_filler=5, pair_tokens=pair_tokens)
    rng = random.Random(0)
    for D in (task.min_distance, 20, 333):
        for _ in range(20):
            ids, y = task.sample(D, rng)
            assert ids[-2] == task.QUERY and ids[-1] in task.key_ids
            key = task.key_ids.index(ids[-1])
            if pair_tokens:
                pos = ids.index(task.pair_id(key, y))
            else:
                pos = ids.index(ids[-1])
                assert ids[pos + 1] == task.value_ids[y]
            assert len(ids) - 1 - pos == D
            assert all(t in task.filler_ids for t in ids[task.pairs_len : -2])
            assert max(ids) < task.vocab_size == len(task.token_names())
    with pytest.raises(ValueError, match="distance must be"):
        task.sample(task.min_distance - 1, rng)


def test_token_counts_carry_no_information_about_the_label():
    """Why a bag of tokens stays at chance: every value occurs once per sequence
    and the key -> value map is a fresh permutation, so for each label the
    distribution of any additive (per-token) statistic is the same."""
    task = RecallTask(num_pairs=4, num_keys=6, num_filler=3)
    docs, labels = task.samples([40] * 4000, seed=3)
    # Each value occurs exactly once among the pair tokens of every sequence.
    for ids in docs[:200]:
        values = sorted(task.pair_ids.index(t) % task.num_pairs for t in ids[: task.pairs_len].tolist())
        assert values == list(range(task.num_pairs))
    # The queried key is independent of the label: a key -> label table learnt on
    # half the data predicts the other half at chance.
    half = len(docs) // 2
    table = Counter((int(d[-1]), y) for d, y in zip(docs[:half], labels[:half]))
    guess = {k: max(range(task.num_pairs), key=lambda y: table[(k, y)]) for k in task.key_ids}
    acc = sum(guess[int(d[-1])] == y for d, y in zip(docs[half:], labels[half:])) / (len(docs) - half)
    assert abs(acc - 1 / task.num_pairs) < 0.05
    assert Counter(labels)[0] / len(labels) == pytest.approx(0.25, abs=0.03)


def test_sample_command_writes_jsonl(tmp_path):
    out = tmp_path / "s.jsonl"
    cmd = [sys.executable, "-m", "experiments.long_range", "sample", "--distance", "300", "--count", "5",
           "--seed", "7", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    task = long_range.PROFILES["cpu"].task
    assert len(rows) == 5 and all(r["label"] in task.labels for r in rows)
    ids = rows[0]["ids"]
    assert ids[-2] == task.QUERY
    key = task.key_ids.index(ids[-1])
    pos = ids.index(task.pair_id(key, task.labels.index(rows[0]["label"])))
    assert len(ids) - 1 - pos == 300
    # Same seed, same sequences.
    out2 = tmp_path / "s2.jsonl"
    subprocess.run(cmd[:-1] + [str(out2)], check=True, cwd=ROOT, capture_output=True)
    assert out2.read_text() == out.read_text()
    bad = subprocess.run(cmd[:5] + ["2"] + cmd[6:], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "distance must be" in bad.stderr


def test_long_range_smoke_profile_trains_scores_and_reports(tmp_path):
    record = run_experiment("long_range", "smoke", out_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "long_range.json").read_text())
    assert saved == record
    for key in ("command", "profile", "machine", "settings", "claims", "results", "wall_time_s"):
        assert key in saved
    assert len(saved["machine"]["load_average_before"]) == 3
    res = saved["results"]
    settings = long_range.PROFILES["smoke"]
    assert set(res["archs"]) == set(settings.archs)
    for row in res["archs"].values():
        assert set(row["accuracy"]) == {str(d) for d in settings.eval_distances}
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
        assert row["steps"] > 0 and len(row["history"]) == settings.epochs
    assert (tmp_path / "long_range.png").stat().st_size > 0
    # The trained checkpoint loads with load_model and reproduces its score.
    model, tok = load_model(tmp_path / "work" / "long_range" / "smoke" / "bsbr" / "best")
    D = settings.eval_distances[0]
    docs, labels = settings.task.samples([D] * settings.eval_count, seed=10_000 + D)
    with torch.no_grad():
        pred = [int(model(d[None]).argmax()) for d in docs]
    acc = sum(p == y for p, y in zip(pred, labels)) / len(labels)
    assert acc == pytest.approx(res["archs"]["bsbr"]["accuracy"][str(D)])
    assert tok.token_to_id("QUERY") == 0
    # A second run reuses the cached scores (resumable) and gives the same results.
    again = run_experiment("long_range", "smoke", out_dir=tmp_path, progress=False)
    assert again["results"]["archs"] == record["results"]["archs"]
    # The report has the section, the seed's claim beside the measurement.
    report = write_report(tmp_path, tmp_path / "experiments.md").read_text()
    assert "## long_range" in report and "0.94 / 0.92 / 0.89" in report
    assert "| bsbr |" in report
    missing = [n for n in ALL_EXPERIMENTS if n != "long_range"]
    if missing:
        assert "Not yet measured" in report


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n != "long_range"])
def test_every_experiment_smoke_profile_writes_json_png_and_a_report_section(name, tmp_path):
    """The runner's contract for each experiment module: PROFILES with smoke,
    cpu and gpu, a record with the machine and load average, at least one
    figure it names in its report section, and the report section itself."""
    mod = experiment_module(name)
    assert {"smoke", "cpu", "gpu"} <= set(mod.PROFILES)
    assert getattr(mod, "CLAIMS", None), f"{name} sets no claims of the research page beside its measurements"
    record = run_experiment(name, "smoke", out_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved == record and saved["profile"] == "smoke" and saved["results"]
    assert len(saved["machine"]["load_average_before"]) == 3 == len(saved["machine"]["load_average_after"])
    pngs = sorted(tmp_path.glob(f"{name}*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    section = mod.report(saved)
    assert any(f"../experiments/results/{p.name}" in section for p in pngs), "the report shows none of its figures"
    report = write_report(tmp_path, tmp_path / "experiments.md").read_text()
    assert f"## {name}" in report


def test_runner_rejects_unknown_names_and_profiles(tmp_path):
    with pytest.raises(KeyError, match="unknown experiment"):
        run_experiment("nope", "smoke", out_dir=tmp_path)
    with pytest.raises(KeyError, match="no profile"):
        run_experiment("long_range", "huge", out_dir=tmp_path)


def test_mcnemar_exact_matches_the_binomial_tail():
    from experiments.kernel_docs import mcnemar_exact

    a = [True] * 10 + [False] * 2 + [True] * 5
    b = [False] * 10 + [True] * 2 + [True] * 5
    t = mcnemar_exact(a, b)
    assert (t["a_only"], t["b_only"]) == (10, 2)
    # P(X <= 2 | n=12, 1/2) = (1 + 12 + 66) / 4096; two-sided doubles it.
    assert t["p_value"] == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    assert mcnemar_exact(b, a)["p_value"] == pytest.approx(t["p_value"])


def test_bootstrap_interval_covers_the_estimate_and_narrows_with_more_documents():
    from experiments.kernel_docs import accuracy, bootstrap_ci, macro_f1

    rng = random.Random(0)
    y = [rng.randrange(3) for _ in range(400)]
    p = [t if rng.random() < 0.7 else (t + 1) % 3 for t in y]
    lo, hi = bootstrap_ci(y, p, accuracy, 500, 0)
    assert lo <= accuracy(y, p) <= hi and 0.6 < lo < hi < 0.8
    lo_s, hi_s = bootstrap_ci(y[:40], p[:40], accuracy, 500, 0)
    assert hi_s - lo_s > hi - lo
    assert bootstrap_ci([], [], accuracy) is None
    assert macro_f1([0, 1, 1], [0, 1, 0]) == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_leak_masking_removes_class_paths_only():
    from experiments.kernel_docs import leak_pattern, mask_leaks

    pat = leak_pattern(["admin-guide", "admin", "networking"])
    text = "See Documentation/admin-guide/foo.rst and Documentation/networking/x, not Documentation/other/y."
    masked, k = mask_leaks(text, pat)
    assert k == 2
    assert masked == "See Documentation/foo.rst and Documentation/x, not Documentation/other/y."
