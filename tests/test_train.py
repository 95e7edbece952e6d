"""Training and evaluation on a tiny corpus made in the test (no network,
no real corpus): the loss falls, checkpoints reload to identical logits, an
interrupted run resumes to exactly the weights of an uninterrupted one, and
evaluation is reproducible and bucketed by length."""
from __future__ import annotations

import json
import random

import pytest
import torch

from bsbr_core import load_model
from bsbr_core.evaluate import (
    LENGTH_BUCKETS, bucket_of, classification_metrics, evaluate_model, length_batches, load_tokenized,
    pad_batch, write_model_card,
)
from bsbr_core.tokenizer import save_tokenizer, train_tokenizer
from bsbr_core.train import TrainConfig, epoch_plan, export_model, lr_at, train

LABELS = ["alpha", "beta", "gamma"]
TOPIC_WORDS = {
    "alpha": "kernel scheduler thread preempt runqueue cpu load balance",
    "beta": "socket packet route netdev queue checksum tcp udp",
    "gamma": "inode dentry superblock journal extent mount page cache",
}
COMMON = "the a of to and is in for with on this that be as"


def make_doc(rng: random.Random, label: str, words: int) -> str:
    topic, common = TOPIC_WORDS[label].split(), COMMON.split()
    out = []
    for i in range(words):
        out.append(rng.choice(topic) if rng.random() < 0.35 else rng.choice(common))
        if i % 12 == 11:
            out.append(".\n")
    return " ".join(out)


def write_corpus(root, sizes: dict[str, int], seed: int = 0, long_test_doc_words: int = 0):
    """A kernel-docs-shaped corpus folder: {split}.jsonl, meta.json, tokenizer.json."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    texts = {}
    for split, n in sizes.items():
        docs = []
        for i in range(n):
            label = LABELS[i % len(LABELS)]
            docs.append({"path": f"{label}/{split}-{i}.rst", "label": label,
                         "text": make_doc(rng, label, rng.randint(5, 200))})
        if split == "test" and long_test_doc_words:
            docs.append({"path": "gamma/long.rst", "label": "gamma", "text": make_doc(rng, "gamma", long_test_doc_words)})
        texts[split] = docs
        with open(root / f"{split}.jsonl", "w") as f:
            for d in docs:
                f.write(json.dumps(d) + "\n")
    (root / "meta.json").write_text(json.dumps({"format": 1, "dataset": "fixture", "labels": LABELS}))
    save_tokenizer(train_tokenizer([d["text"] for d in texts["train"]], vocab_size=320), root / "tokenizer.json")
    return root


TINY_MODEL = dict(arch="bsbr", hidden_dim=16, num_layers=1, num_heads=2, ff_dim=32, chunk_size=8, dropout=0.1)


def tiny_train_config(tmp_path, data, name, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path / name), data_dir=str(data), token_cache=str(tmp_path / "cache"), epochs=3,
                lr=3e-3, warmup_frac=0.1, batch_tokens=256, max_batch_docs=8, max_train_tokens=64,
                checkpoint_every=4, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), {"train": 48, "validation": 12, "test": 12},
                        long_test_doc_words=6000)


def test_loss_falls_and_checkpoint_reloads_to_identical_logits(tmp_path, corpus):
    torch.manual_seed(0)
    result = train(TINY_MODEL, tiny_train_config(tmp_path, corpus, "run", epochs=4))
    hist = result.record["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.1, hist
    assert hist[-1]["val_accuracy"] > 0.5, hist  # three classes: chance is 1/3

    # The last checkpoint reloads (safetensors + JSON) to the trained model.
    reloaded, tokenizer = load_model(tmp_path / "run" / "checkpoint")
    assert tokenizer.get_vocab_size() == reloaded.config.vocab_size
    docs = load_tokenized(corpus, "test", tokenizer, tmp_path / "cache").docs
    ids, mask = pad_batch(docs[:5])
    with torch.no_grad():
        assert torch.equal(result.model(ids, mask), reloaded(ids, mask))

    # The exported folder is a complete model (no optimizer state) plus its training record.
    dest = export_model(tmp_path / "run", tmp_path / "exported")
    assert sorted(p.name for p in dest.iterdir()) == [
        "config.json", "curve.png", "model.safetensors", "tokenizer.json", "training.json"]
    summary = json.loads((dest / "training.json").read_text())
    assert summary["epochs_run"] == 4 and summary["best"]["epoch"] in (1, 2, 3, 4)
    best, _ = load_model(dest)
    best_src, _ = load_model(tmp_path / "run" / "best")
    with torch.no_grad():
        assert torch.equal(best(ids, mask), best_src(ids, mask))
    assert (tmp_path / "run" / "curve.png").stat().st_size > 0
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == hist


@pytest.mark.parametrize("stop_at", [5, 9])
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, corpus, stop_at):
    full = train(TINY_MODEL, tiny_train_config(tmp_path, corpus, "full", epochs=2))
    steps_per_epoch = full.record["history"][0]["step"]
    assert 0 < stop_at < full.record["total_steps"] and stop_at % 4  # between periodic checkpoints

    interrupted = train(TINY_MODEL, tiny_train_config(tmp_path, corpus, "split", epochs=2, stop_at_step=stop_at))
    assert interrupted.stopped and interrupted.record["global_step"] == stop_at
    assert len(interrupted.record["history"]) == (1 if stop_at >= steps_per_epoch else 0)
    resumed = train(TINY_MODEL, tiny_train_config(tmp_path, corpus, "split", epochs=2))
    assert resumed.record["resumes"] == 1

    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = [{k: v for k, v in h.items() if k != "elapsed_s"} for h in full.record["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "elapsed_s"} for h in resumed.record["history"]]


def test_resume_refuses_other_settings(tmp_path, corpus):
    train(TINY_MODEL, tiny_train_config(tmp_path, corpus, "run", epochs=1, stop_at_step=2))
    with pytest.raises(ValueError, match="lr"):
        train(TINY_MODEL, tiny_train_config(tmp_path, corpus, "run", epochs=1, lr=1e-2))
    with pytest.raises(ValueError, match="model config"):
        train({**TINY_MODEL, "hidden_dim": 32}, tiny_train_config(tmp_path, corpus, "run", epochs=1))


def test_epoch_plan_covers_every_document_within_the_token_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(200)]
    tc = TrainConfig(batch_tokens=512, max_batch_docs=16, seed=1)
    plan = epoch_plan(lengths, cap=128, chunk=16, crop="random", tc=tc, epoch=0)
    seen = sorted(i for batch in plan for i, _, _ in batch)
    assert seen == list(range(len(lengths)))
    for batch in plan:
        assert len(batch) <= 16
        assert len(batch) == 1 or len(batch) * max(n for _, _, n in batch) <= 512
        for i, start, n in batch:
            assert start % 16 == 0 and start + n <= lengths[i] and n == min(128, lengths[i] - start)
    assert plan == epoch_plan(lengths, 128, 16, "random", tc, 0)
    assert plan != epoch_plan(lengths, 128, 16, "random", tc, 1)
    head = epoch_plan(lengths, 128, 16, "head", tc, 0)
    assert all(start == 0 for batch in head for _, start, _ in batch)


def test_curriculum_leaves_longer_documents_out_of_early_epochs():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(200)]
    tc = TrainConfig(batch_tokens=512, seed=1, curriculum=[50, 150])
    for epoch, longest in ((0, 50), (1, 150), (2, 150), (5, 150)):
        plan = epoch_plan(lengths, cap=1000, chunk=16, crop="random", tc=tc, epoch=epoch)
        seen = sorted(i for batch in plan for i, _, _ in batch)
        assert seen == [i for i, n in enumerate(lengths) if n <= longest]
    with pytest.raises(ValueError, match="curriculum"):
        TrainConfig(curriculum=[0])


def test_lr_warms_up_then_decays_to_the_floor():
    tc = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_frac=0.1)
    lrs = [lr_at(s, 100, tc) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_classification_metrics_by_hand():
    # true 0 0 1 1 2, pred 0 1 1 1 0: class 0 P=1/2 R=1/2, class 1 P=2/3 R=1, class 2 P=R=0.
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 4)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)  # class 3 never occurs: not averaged
    assert m["confusion"][0] == [1, 1, 0, 0] and m["majority_rate"] == pytest.approx(2 / 5)
    assert [bucket_of(n) for n in (0, 512, 513, 1024, 1025, 2048, 2049, 8192, 8193)] == [
        "<=512", "<=512", "513-1024", "513-1024", "1025-2048", "1025-2048", "2049-8192", "2049-8192", ">8192"]
    batches = length_batches([5, 100, 7, 3000, 6], batch_tokens=64)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4] and [3] in batches


def test_evaluate_reads_whole_documents_and_is_reproducible(tmp_path, corpus):
    train(TINY_MODEL, tiny_train_config(tmp_path, corpus, "run", epochs=1, export=str(tmp_path / "model")))
    m1 = evaluate_model(tmp_path / "model", corpus, "test", cache_dir=tmp_path / "cache", progress=False)
    first = (tmp_path / "model" / "metrics.json").read_bytes()
    assert (tmp_path / "model" / "confusion.png").stat().st_size > 0
    m2 = evaluate_model(tmp_path / "model", corpus, "test", cache_dir=tmp_path / "cache", progress=False)
    assert (tmp_path / "model" / "metrics.json").read_bytes() == first and m1 == m2
    card = write_model_card(tmp_path / "model").read_text()
    assert "## Training" in card and "## Test accuracy" in card and "| >8192 |" in card

    n = m1["overall"]["num_docs"]
    assert n == 13 and sum(b["num_docs"] for b in m1["buckets"].values()) == n
    assert list(m1["buckets"]) == [name for name, _, _ in LENGTH_BUCKETS]
    preds = m1["predictions"]
    assert m1["overall"]["accuracy"] == pytest.approx(sum(p["label"] == p["pred"] for p in preds) / n, abs=1e-6)
    # The long document (> 8192 tokens: several inference segments) is counted whole.
    long_doc = next(p for p in preds if p["path"] == "gamma/long.rst")
    assert long_doc["tokens"] > 8192 and m1["buckets"][">8192"]["num_docs"] >= 1

    # Segment-by-segment inference of the long document equals one pass over it.
    model, tokenizer = load_model(tmp_path / "model")
    ids = torch.tensor([tokenizer.encode(json.loads((corpus / "test.jsonl").read_text().splitlines()[-1])["text"]).ids])
    assert ids.shape[1] == long_doc["tokens"] > model.config.segment_tokens
    with torch.no_grad():
        segmented = model(ids)
    with torch.enable_grad():
        one_pass = model(ids).detach()
    assert torch.allclose(segmented, one_pass, atol=1e-4)


def test_init_from_warm_restart_is_recorded_in_the_card(tmp_path, corpus):
    train(TINY_MODEL, tiny_train_config(tmp_path, corpus, "stage1", epochs=1, export=str(tmp_path / "stage1-model")))
    with pytest.raises(ValueError, match="another model config"):
        train({**TINY_MODEL, "ff_dim": 64}, tiny_train_config(tmp_path, corpus, "bad", epochs=1,
                                                              init_from=str(tmp_path / "stage1-model")))
    start, _ = load_model(tmp_path / "stage1-model")
    result = train(TINY_MODEL, tiny_train_config(tmp_path, corpus, "stage2", epochs=1, stop_at_step=0,
                                                 init_from=str(tmp_path / "stage1-model")))
    for k, v in start.state_dict().items():
        assert torch.equal(result.model.state_dict()[k], v), k
    train(TINY_MODEL, tiny_train_config(tmp_path, corpus, "stage2", epochs=1, export=str(tmp_path / "model"),
                                        init_from=str(tmp_path / "stage1-model")))
    evaluate_model(tmp_path / "model", corpus, "test", cache_dir=tmp_path / "cache", progress=False)
    card = write_model_card(tmp_path / "model").read_text()
    assert "Stage 1: `" in card and "Stage 2 (warm restart" in card and "| 2 | 1 |" in card
