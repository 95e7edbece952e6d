"""experiments/multimodal.py: pixel tokens, splits, the joint task's construction and ceilings, the vocabulary,
determinism, the interval, and a cached rerun of the smoke profile."""
from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest
import torch

from experiments import multimodal as mm

SMOKE = mm.PROFILES["smoke"]


def naive_bilinear(img: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear resize of one (h, w) image, pixel centres aligned (align_corners False), one output pixel at a time."""
    h, w = img.shape
    out = torch.zeros(side, side, dtype=torch.float64)

    def taps(i, n_in):
        src = max(0.0, (i + 0.5) * n_in / side - 0.5)
        i0 = min(math.floor(src), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), src - i0

    for r in range(side):
        r0, r1, wr = taps(r, h)
        for c in range(side):
            c0, c1, wc = taps(c, w)
            top = (1 - wc) * img[r0, c0] + wc * img[r0, c1]
            bottom = (1 - wc) * img[r1, c0] + wc * img[r1, c1]
            out[r, c] = (1 - wr) * top + wr * bottom
    return out


def test_pixel_tokens_match_a_naive_upscale_and_quantisation():
    images, _ = mm.load_digit_images(limit=5)
    assert images.shape == (5, 8, 8) and float(images.min()) == 0 and float(images.max()) == 16
    for side, levels in ((16, 16), (32, 16), (8, 4), (12, 16)):
        tokens = mm.pixel_tokens(images, side, levels)
        assert tokens.shape == (5, side * side) and tokens.dtype == torch.int64
        for i in range(5):
            up = naive_bilinear(images[i], side) if side != 8 else images[i]
            want = [min(levels - 1, math.floor(round(v * levels / 16, 6))) for v in up.reshape(-1).tolist()]
            assert tokens[i].tolist() == want
    # Level boundaries, and constant images (upscaling keeps them constant).
    img = torch.zeros(1, 8, 8, dtype=torch.float64)
    img[0, 0, :6] = torch.tensor([0.0, 0.99, 1.0, 8.0, 15.99, 16.0])
    assert mm.pixel_tokens(img, 8, 16)[0, :6].tolist() == [0, 0, 1, 8, 15, 15]
    assert mm.pixel_tokens(img, 8, 4)[0, :6].tolist() == [0, 0, 0, 2, 3, 3]
    assert mm.pixel_tokens(torch.full((1, 8, 8), 16.0), 16, 16).unique().tolist() == [15]
    assert mm.pixel_tokens(torch.full((1, 8, 8), 5.0), 32, 16).unique().tolist() == [5]


def test_digit_splits_are_disjoint_stratified_and_seeded():
    _, target = mm.load_digit_images()
    sp = mm.digit_splits(target, 0.1, 0.25, seed=0)
    all_idx = sp["train"] + sp["validation"] + sp["test"]
    assert sorted(all_idx) == list(range(len(target))) == list(range(1797))
    for d in range(10):
        n = target.count(d)
        assert sum(target[i] == d for i in sp["test"]) == round(0.25 * n)
        assert sum(target[i] == d for i in sp["validation"]) == round(0.1 * n)
    assert mm.digit_splits(target, 0.1, 0.25, seed=0) == sp
    assert mm.digit_splits(target, 0.1, 0.25, seed=1)["test"] != sp["test"]


def _best_by_brute_force(part, labels, values, label_set):
    """Accuracy of the best of all maps part value -> label."""
    best = 0.0
    for choice in itertools.product(sorted(label_set), repeat=len(values)):
        f = dict(zip(values, choice))
        best = max(best, sum(f[v] == y for v, y in zip(part, labels)) / len(labels))
    return best


def test_joint_pairs_balance_digits_within_each_text_class_and_the_ceilings_are_exact():
    text_labels = [0] * 5 + [1] * 7
    by_digit = {3: [30, 31, 32], 5: [50, 51], 8: [80, 81, 82, 83]}
    k = len(by_digit)
    pairs = mm.joint_pairs(text_labels, by_digit, per_doc=3, rng=random.Random(0))
    assert len(pairs) == 3 * len(text_labels)
    assert sorted(doc for doc, _, _ in pairs) == sorted(list(range(12)) * 3)
    digits = sorted(by_digit)
    for doc, img, j in pairs:
        assert img in by_digit[digits[j]]
    for t in (0, 1):
        counts = [sum(1 for doc, _, j in pairs if text_labels[doc] == t and j == jj) for jj in range(k)]
        assert max(counts) - min(counts) <= 1
    t_part = [text_labels[doc] for doc, _, _ in pairs]
    j_part = [j for _, _, j in pairs]
    y = [mm.joint_label(t, j, k) for t, j in zip(t_part, j_part)]
    # The joint label determines both parts: it needs both.
    assert len(set(zip(t_part, j_part))) == len(set(y)) == 2 * k
    c = mm.single_modality_ceilings(t_part, j_part, y)
    # 15 and 21 slots split evenly over 3 digits: knowing the text class leaves 1 in 3;
    # knowing the digit leaves the text class, 7 of 12 documents in the majority class.
    assert c["text_only"] == pytest.approx(1 / 3)
    assert c["image_only"] == pytest.approx(7 / 12)
    assert c["text_only"] == pytest.approx(_best_by_brute_force(t_part, y, [0, 1], set(y)))
    assert c["image_only"] == pytest.approx(_best_by_brute_force(j_part, y, list(range(k)), set(y)))


def test_smoke_tasks_stay_in_one_vocabulary_and_the_joint_sequence_is_text_sep_image():
    vocab, tasks = mm.build_tasks(SMOKE)
    V, L = len(vocab), SMOKE.levels
    sep, unk = vocab.index(mm.SEP), vocab.index(mm.UNK)
    assert vocab[:L] == [f"px{i}" for i in range(L)] and len(set(vocab)) == V
    assert len(vocab) == L + 2 + min(SMOKE.text_vocab, len(mm.SHARED_WORDS) + sum(map(len, mm.CLASS_WORDS)))
    tok = mm.vocabulary_tokenizer(vocab)
    assert tok.get_vocab_size() == V and tok.token_to_id("w:river") == vocab.index("w:river")
    images, target = mm.load_digit_images(SMOKE.image_limit)
    pixels = mm.pixel_tokens(images, SMOKE.image_side, L)
    k = len(SMOKE.joint_digits)
    for sp in ("train", "validation", "test"):
        text, image, joint = (tasks[t].splits[sp] for t in mm.TASKS)
        for split in (text, image, joint):
            assert all(0 <= int(d.min()) and int(d.max()) < V for d in split.docs)
        assert all(int(d.min()) >= L + 2 and len(d) == SMOKE.text_tokens for d in text.docs)
        assert all(int(d.max()) < L and len(d) == SMOKE.image_side ** 2 for d in image.docs)
        text_by_path = dict(zip(text.paths, zip(text.docs, text.labels)))
        for seq, y, path in zip(joint.docs, joint.labels, joint.paths):
            doc_path, img_path = path.split("+")
            img = int(img_path.split("/")[1])
            assert (seq == sep).sum() == 1
            cut = int((seq == sep).nonzero())
            t_ids, t_label = text_by_path[doc_path]
            assert torch.equal(seq[:cut], t_ids) and torch.equal(seq[cut + 1 :], pixels[img])
            assert y == mm.joint_label(t_label, SMOKE.joint_digits.index(target[img]), k)
            assert tasks["joint"].labels[y] == f"{SMOKE.text_classes[t_label]}|{target[img]}"
            assert f"digits/{img}" in image.paths
    # Held-out data: no test image or document is trained on.
    for t in mm.TASKS:
        assert not set(tasks[t].splits["test"].paths) & set(tasks[t].splits["train"].paths)
    # A word outside the training texts' top words is UNK.
    small = dataclasses.replace(SMOKE, text_vocab=3)
    vocab3, tasks3 = mm.build_tasks(small)
    assert len(vocab3) == L + 5 and any((d == unk).any() for d in tasks3["text"].splits["test"].docs)


def test_build_tasks_is_a_function_of_the_seed():
    def snapshot(s):
        vocab, tasks = mm.build_tasks(s)
        return vocab, {t: {sp: ([d.tolist() for d in x.docs], x.labels, x.paths) for sp, x in td.splits.items()}
                       for t, td in tasks.items()}

    a = snapshot(SMOKE)
    assert snapshot(SMOKE) == a
    b = snapshot(dataclasses.replace(SMOKE, seed=1))
    assert b[1]["joint"]["test"][2] != a[1]["joint"]["test"][2]
    assert b[1]["image"]["test"][2] != a[1]["image"]["test"][2]


def test_grouped_bootstrap_covers_the_estimate_and_widens_when_items_share_a_group():
    from experiments.kernel_docs import accuracy, bootstrap_ci

    rng = random.Random(0)
    correct = [rng.random() < 0.7 for _ in range(300)]
    acc = sum(correct) / len(correct)
    lo, hi = mm.grouped_bootstrap_ci(correct, [str(i) for i in range(300)], 1000, 0)
    assert lo < acc < hi
    # One item a group is the plain bootstrap.
    plo, phi = bootstrap_ci([1] * 300, [int(c) for c in correct], accuracy, 1000, 0)
    assert abs(lo - plo) < 0.02 and abs(hi - phi) < 0.02
    # The same outcomes three times over: as groups, the interval is the one of 300 items, not of 900.
    tripled = [c for c in correct for _ in range(3)]
    glo, ghi = mm.grouped_bootstrap_ci(tripled, [str(i) for i in range(300) for _ in range(3)], 1000, 0)
    ulo, uhi = mm.grouped_bootstrap_ci(tripled, [str(i) for i in range(900)], 1000, 0)
    assert ghi - glo > 1.4 * (uhi - ulo)
    assert mm.grouped_bootstrap_ci([True] * 5, list("abcde"), 100, 0) == (1.0, 1.0)


def test_kernel_docs_text_reads_the_corpus_splits_of_the_chosen_classes():
    from bsbr_core import data as data_lib

    if not (data_lib.default_kernel_docs_dir() / "meta.json").is_file():
        pytest.skip("kernel-docs corpus not built")
    s = dataclasses.replace(mm.PROFILES["cpu"], text_tokens=64)
    text = mm.kernel_docs_text(s)
    for sp, ts in text.items():
        docs = [d for d in data_lib.load_split(None, sp) if d.label in s.text_classes]
        assert ts.paths == [d.path for d in docs] and len(ts.docs) == len(docs) > 0
        assert ts.labels == [s.text_classes.index(d.label) for d in docs]
        assert all(0 < len(d) <= 64 and all(n.startswith("bpe:") for n in d) for d in ts.docs)
    assert not set(text["test"].paths) & set(text["train"].paths)


def test_smoke_rerun_reuses_the_trainings_and_the_saved_model_gives_the_predictions(tmp_path):
    from bsbr_core import load_model
    from bsbr_core.evaluate import predict_logits
    from experiments.runner import run_experiment

    first = run_experiment("multimodal", "smoke", out_dir=tmp_path, progress=False)
    runs = sorted((tmp_path / "work" / "multimodal" / "smoke").glob("*/joint-bsbr"))
    assert len(runs) == 1
    mtime = (runs[0] / "scores.json").stat().st_mtime_ns
    again = run_experiment("multimodal", "smoke", out_dir=tmp_path, progress=False)
    assert again["results"] == first["results"]
    assert (runs[0] / "scores.json").stat().st_mtime_ns == mtime
    model, tok = load_model(runs[0] / "best")
    _, tasks = mm.build_tasks(SMOKE)
    test = tasks["joint"].splits["test"]
    pred = predict_logits(model, test.docs).argmax(-1)
    acc = float((pred == torch.tensor(test.labels)).float().mean())
    assert acc == pytest.approx(first["results"]["tasks"]["joint"]["bsbr"]["accuracy"])
    assert tok.token_to_id(mm.SEP) == SMOKE.levels
    ceilings = first["results"]["joint_ceilings"]
    assert ceilings == pytest.approx(mm.single_modality_ceilings(*tasks["joint"].test_parts, test.labels))
    for rows in first["results"]["tasks"].values():
        d = rows["bsbr_minus_standard"]
        assert d["accuracy"] == pytest.approx(rows["bsbr"]["accuracy"] - rows["standard"]["accuracy"], abs=1e-6)
        assert d["accuracy_ci"][0] <= d["accuracy"] <= d["accuracy_ci"][1]
    section = mm.report(first)
    assert "Small and synthetic: exactly what it is." in section and "synthetic stand-in" in section
    assert "0.92 / 0.88 / 0.85" in section


def test_verdict_follows_the_measured_values():
    def row(acc, lo, hi):
        return {"accuracy": acc, "accuracy_ci": [lo, hi]}

    r = {"tasks": {"text": {"bsbr": row(0.80, 0.75, 0.85), "standard": row(0.95, 0.9, 0.99),
                            "bsbr_minus_standard": row(-0.15, -0.2, -0.1)},
                   "image": {"bsbr": row(0.90, 0.85, 0.94), "standard": row(0.88, 0.84, 0.92),
                             "bsbr_minus_standard": row(0.02, -0.01, 0.05)},
                   "joint": {"bsbr": row(0.70, 0.64, 0.76), "standard": row(0.50, 0.44, 0.57),
                             "bsbr_minus_standard": row(0.2, 0.1, 0.3)}},
         "joint_ceilings": {"text_only": 0.2, "image_only": 0.6}}
    v = mm.verdict(r)
    assert ("text: BSBR 0.800 vs standard 0.950 (claimed 0.92 vs 0.89); standard ahead by 0.150 (paired 95% "
            "interval of BSBR - standard [-0.200, -0.100]: significant)") in v
    assert "image: BSBR 0.900 vs standard 0.880" in v and "BSBR ahead by 0.020" in v and "not significant" in v
    assert "On the joint task bsbr beats the best single-modality ceiling (0.600)" in v
    assert "holds here on 2 of 3 tasks (image, joint)" in v
    assert "the page's levels are reached by standard text, bsbr image, standard image." in v
    r["tasks"]["joint"]["bsbr"] = row(0.70, 0.58, 0.76)
    assert "no arch beat" in mm.verdict(r)
    r["tasks"]["joint"]["standard"] = row(0.70, 0.62, 0.76)
    r["tasks"]["joint"]["bsbr"] = row(0.70, 0.62, 0.76)
    assert "bsbr and standard beat" in mm.verdict(r)
