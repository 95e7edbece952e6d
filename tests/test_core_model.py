"""Whole classifier: one-shot vs naive vs streaming, batching, causality, checkpoints."""
from __future__ import annotations

import json
import random

import pytest
import torch

from bsbr_core import InputError, ModelConfig, State, StateError, build_model, load_model, save_model
from core_helpers import VARIANT_CFGS, VARIANT_IDS, small_model

TOL = 1e-4


def _stream(model, ids, cuts):
    """Feed ids (1, n) to model.step in pieces ending at `cuts`; return the last logits."""
    state = model.init_state(1)
    logits, prev = None, 0
    for c in list(cuts) + [ids.shape[1]]:
        logits, state = model.step(ids[:, prev:c], state)
        prev = c
    return logits, state


@pytest.mark.parametrize("overrides", VARIANT_CFGS, ids=VARIANT_IDS)
def test_one_shot_matches_naive_model(overrides):
    model = small_model(**overrides)
    ids = torch.randint(0, 97, (2, 37))
    with torch.no_grad():
        assert torch.allclose(model(ids), model(ids, impl="naive"), atol=TOL)


@pytest.mark.parametrize("overrides", VARIANT_CFGS, ids=VARIANT_IDS)
@pytest.mark.parametrize("n", [0, 1, 5, 8, 45, 67])
def test_streaming_equals_one_shot_for_random_splits(overrides, n):
    model = small_model(**overrides)
    rng = random.Random(n)
    ids = torch.randint(0, 97, (1, n))
    with torch.no_grad():
        whole = model(ids)
    splits = [
        [],                                   # the whole document as one piece
        list(range(1, n)),                    # one-token pieces
        sorted(rng.sample(range(n + 1), min(n + 1, 6))),  # random cut points (may repeat ends: empty pieces)
        [0, 0, n // 2, n // 2, n],            # explicit empty pieces
    ]
    for cuts in splits:
        got, state = _stream(model, ids, cuts)
        assert (got - whole).abs().max().item() <= TOL, cuts
        assert state.num_tokens == n


@pytest.mark.parametrize("overrides", VARIANT_CFGS, ids=VARIANT_IDS)
def test_logits_depend_on_the_document(overrides):
    model = small_model(**overrides)
    with torch.no_grad():
        a = model(torch.randint(0, 97, (1, 30)))
        b = model(torch.randint(0, 97, (1, 30)))
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("overrides", VARIANT_CFGS, ids=VARIANT_IDS)
@pytest.mark.parametrize("segment_tokens", [8192, 16])  # single pass, and forced segment-by-segment
def test_batch_with_mask_equals_each_document_alone(overrides, segment_tokens):
    model = small_model(segment_tokens=segment_tokens, **overrides)
    lengths = [53, 7, 0, 24]
    n = max(lengths)
    ids = torch.randint(0, 97, (len(lengths), n))
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, L in enumerate(lengths):
        mask[i, :L] = 1
        ids[i, L:] = 0
    with torch.no_grad():
        batched = model(ids, mask)
        for i, L in enumerate(lengths):
            alone = model(ids[i : i + 1, :L])
            assert (batched[i] - alone[0]).abs().max().item() <= TOL, (i, L)


@pytest.mark.parametrize("overrides", VARIANT_CFGS, ids=VARIANT_IDS)
def test_segmented_one_shot_equals_single_pass(overrides):
    ids = torch.randint(0, 97, (1, 85))
    long_seg = small_model(segment_tokens=8192, **overrides)
    short_seg = small_model(segment_tokens=16, **overrides)
    with torch.no_grad():
        assert torch.allclose(long_seg(ids), short_seg(ids), atol=TOL)


def test_left_padded_mask_rejected():
    model = small_model(arch="bsbr")
    with pytest.raises(ValueError, match="right-padded"):
        model(torch.ones(1, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 1]]))


@pytest.mark.parametrize("overrides", [
    dict(arch="bsbr", causal=True), dict(arch="bsbr", causal=True, compression_factor=4),
    dict(arch="linear"), dict(arch="sliding_window"), dict(arch="delta_net"),
], ids=["bsbr-causal", "bsbr-causal-f4", "linear", "sliding_window", "delta_net"])
def test_causal_mechanisms_never_look_ahead(overrides):
    model = small_model(**overrides)
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        h, _ = model.encoder(ids, commit=False)
        for t in (0, 5, 8, 17, 39):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 1) % 97
            h2, _ = model.encoder(changed, commit=False)
            assert torch.allclose(h[:, :t], h2[:, :t], atol=1e-6), t
            assert not torch.allclose(h[:, t:], h2[:, t:], atol=1e-6)


@pytest.mark.parametrize("overrides", VARIANT_CFGS, ids=VARIANT_IDS)
def test_block_causal_across_chunks(overrides):
    """No mechanism lets a chunk see a later chunk: what streaming relies on."""
    model = small_model(**overrides)
    B = model.config.block_size
    ids = torch.randint(0, 97, (1, 3 * B + 3))
    with torch.no_grad():
        h, _ = model.encoder(ids, commit=False)
        changed = ids.clone()
        changed[0, 2 * B + 1] = (changed[0, 2 * B + 1] + 1) % 97
        h2, _ = model.encoder(changed, commit=False)
    assert torch.allclose(h[:, : 2 * B], h2[:, : 2 * B], atol=1e-6)


def test_non_causal_bsbr_sees_its_whole_chunk():
    model = small_model(arch="bsbr")
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        h, _ = model.encoder(ids, commit=False)
        changed = ids.clone()
        changed[0, 7] = (changed[0, 7] + 1) % 97
        h2, _ = model.encoder(changed, commit=False)
    assert not torch.allclose(h[:, :7], h2[:, :7], atol=1e-6)  # earlier tokens of chunk 0 see token 7
    assert not torch.allclose(h[:, 8:], h2[:, 8:], atol=1e-6)  # chunk 1 retrieves chunk 0


def test_max_length_reads_only_the_window():
    model = small_model(arch="standard", max_length=21)
    ids = torch.randint(0, 97, (1, 50))
    with torch.no_grad():
        assert torch.allclose(model(ids), model(ids[:, :21]), atol=TOL)
        logits, state = _stream(model, ids, [10, 30])
    assert state.num_tokens == 50
    assert torch.allclose(logits, model(ids[:, :21]), atol=TOL)


@pytest.mark.parametrize("overrides", VARIANT_CFGS, ids=VARIANT_IDS)
def test_step_many_equals_step_on_each(overrides):
    model = small_model(**overrides)
    docs = [torch.randint(0, 97, (1, n)) for n in (20, 20, 9, 33, 0)]
    states = []
    for d in docs:  # documents at different positions, one not started
        _, s = model.step(d, model.init_state(1))
        states.append(s)
    pieces = [torch.randint(0, 97, (1, n)) for n in (13, 13, 5, 0, 30)]
    many = model.step_many(pieces, states)
    for (logits, st), piece, s in zip(many, pieces, states):
        want, want_state = model.step(piece, s)
        assert (logits - want).abs().max().item() <= 1e-5
        assert st.num_tokens == want_state.num_tokens and st.committed == want_state.committed
        nxt = torch.randint(0, 97, (1, 11))
        assert (model.step(nxt, st)[0] - model.step(nxt, want_state)[0]).abs().max().item() <= 1e-5


def test_old_state_stays_valid_after_step():
    """step() returns a new State; continuing from an older one (a retried page) is still exact."""
    model = small_model(arch="standard")
    ids = torch.randint(0, 97, (1, 60))
    _, s1 = model.step(ids[:, :24], model.init_state(1))
    la, _ = model.step(ids[:, 24:60], s1)     # appends in place into s1's logs
    lb, _ = model.step(ids[:, 24:60], s1)     # s1 again: must not see the first continuation
    with torch.no_grad():
        assert torch.allclose(la, model(ids), atol=TOL)
        assert torch.allclose(lb, model(ids), atol=TOL)


def test_token_ids_out_of_range_rejected():
    model = small_model(arch="bsbr")
    with pytest.raises(ValueError):
        model.step(torch.tensor([[97]]), model.init_state(1))


def _bad_inputs():
    """(name, call) of every input the model refuses as bad input."""
    model = small_model(arch="bsbr")
    other = small_model(arch="bsbr", seed=1)  # same config, other weights
    one, two = model.init_state(1), model.init_state(2)
    ok = torch.tensor([[1, 2, 3]])
    return [
        ("id past the vocabulary", lambda: model.step(torch.tensor([[97]]), one)),
        ("negative id", lambda: model.step(torch.tensor([[-1]]), one)),
        ("piece batch != state batch", lambda: model.step(ok, two)),
        ("step_many id past the vocabulary", lambda: model.step_many([ok, torch.tensor([[97]])], [one, one])),
        ("step_many counts differ", lambda: model.step_many([ok, ok], [one])),
        ("step_many multi-document state", lambda: model.step_many([ok], [two])),
        ("left-padded mask", lambda: model(torch.ones(1, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 1]]))),
        ("state of another model", lambda: model.step(ok, other.init_state(1))),
        ("not a state", lambda: model.step(ok, {"num_tokens": 0})),
        ("corrupt state blob", lambda: State.from_bytes(b"BSBRSTATE" + bytes(40))),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs())), ids=[name for name, _ in _bad_inputs()])
def test_each_bad_input_raises_the_typed_input_error(index):
    _, call = _bad_inputs()[index]
    with pytest.raises(InputError) as e:
        call()
    assert isinstance(e.value, ValueError)  # callers that caught ValueError still do


def test_state_error_is_an_input_error_importable_from_both_places():
    from bsbr_core.state import StateError as FromState

    assert FromState is StateError and issubclass(StateError, InputError) and issubclass(InputError, ValueError)


@pytest.mark.parametrize("arch", ["bsbr", "standard", "delta_net"])
def test_save_load_round_trip(tmp_path, arch):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = small_model(arch=arch)
    save_model(model, tok, tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["arch"] == arch
    loaded, tok2 = load_model(tmp_path / "m")
    assert not loaded.training
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert tok2.encode("a b").ids == [1, 0]
    # States are portable between the two: same fingerprint.
    _, s = model.step(ids[:, :12], model.init_state(1))
    loaded.check_state(s)


def test_load_missing_directory_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nope")


def test_config_validation():
    with pytest.raises(ValueError):
        ModelConfig(arch="nope")
    with pytest.raises(ValueError):
        ModelConfig(compression_factor=3)
    with pytest.raises(ValueError):
        ModelConfig(hidden_dim=30, num_heads=4)
    with pytest.raises(ValueError):
        ModelConfig(arch="bsbr", max_length=512)
    cfg = ModelConfig(arch="standard", max_length=512, labels=["x", "y"])
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert build_model(cfg).config.block_size == 512
