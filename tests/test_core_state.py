"""State: bytes round trip, corruption and foreign states rejected, sizes."""
from __future__ import annotations

import pytest
import torch

from bsbr_core import State, StateError
from core_helpers import VARIANT_CFGS, VARIANT_IDS, small_model


@pytest.mark.parametrize("overrides", VARIANT_CFGS, ids=VARIANT_IDS)
def test_round_trip_through_bytes_continues_exactly(overrides):
    model = small_model(**overrides)
    ids = torch.randint(0, 97, (1, 50))
    _, state = model.step(ids[:, :19], model.init_state(1))
    blob = state.to_bytes()
    restored = State.from_bytes(blob)
    assert restored.num_tokens == state.num_tokens == 19
    assert restored.nbytes == state.nbytes
    a, _ = model.step(ids[:, 19:], state)
    b, _ = model.step(ids[:, 19:], restored)
    assert torch.equal(a, b)
    # An initial (empty) state round-trips too.
    model.check_state(State.from_bytes(model.init_state(1).to_bytes()))


def test_corrupt_blobs_rejected_with_clear_errors():
    model = small_model(arch="bsbr")
    _, state = model.step(torch.randint(0, 97, (1, 30)), model.init_state(1))
    blob = bytearray(state.to_bytes())
    flipped = bytearray(blob)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(StateError, match="checksum"):
        State.from_bytes(bytes(flipped))
    with pytest.raises(StateError, match="checksum|short"):
        State.from_bytes(bytes(blob[:-10]))
    with pytest.raises(StateError, match="magic"):
        State.from_bytes(b"PK\x03\x04" + bytes(blob[4:]))
    with pytest.raises(StateError, match="short"):
        State.from_bytes(b"")
    bad_version = bytearray(blob)
    bad_version[9:11] = (99).to_bytes(2, "big")
    with pytest.raises(StateError, match="version"):
        State.from_bytes(bytes(bad_version))
    with pytest.raises(StateError):
        State.from_bytes("not bytes")


def test_state_of_another_model_rejected():
    a = small_model(arch="bsbr")
    b = small_model(arch="bsbr", chunk_size=4)
    c = small_model(arch="standard")
    _, state = a.step(torch.randint(0, 97, (1, 10)), a.init_state(1))
    for other in (b, c):
        with pytest.raises(StateError, match="another model"):
            other.step(torch.randint(0, 97, (1, 3)), state)


def test_state_of_a_retrained_checkpoint_with_the_same_config_rejected(tmp_path):
    """The fingerprint covers the weights: same config, other weights = another model."""
    from bsbr_core import load_model, save_model

    a = small_model(arch="bsbr", seed=0)
    retrained = small_model(arch="bsbr", seed=1)
    assert a.config == retrained.config
    _, state = a.step(torch.randint(0, 97, (1, 10)), a.init_state(1))
    restored = State.from_bytes(state.to_bytes())
    with pytest.raises(StateError, match="another model"):
        retrained.step(torch.randint(0, 97, (1, 3)), restored)
    # Saved and loaded, the same weights are the same model ...
    save_model(a, None, tmp_path / "a")
    loaded, _ = load_model(tmp_path / "a", with_tokenizer=False)
    assert loaded.fingerprint == a.fingerprint
    loaded.step(torch.randint(0, 97, (1, 3)), restored)
    # ... and loading other weights into it makes it another one.
    loaded.load_state_dict(retrained.state_dict())
    assert loaded.fingerprint == retrained.fingerprint != a.fingerprint
    with pytest.raises(StateError, match="another model"):
        loaded.step(torch.randint(0, 97, (1, 3)), restored)
    # In-place edits are seen after refresh_fingerprint().
    with torch.no_grad():
        loaded.head.bias.add_(1.0)
    assert loaded.refresh_fingerprint() != retrained.fingerprint


def test_bsbr_state_grows_per_chunk_and_compression_shrinks_it():
    sizes = {}
    for f in (1, 4, 16):
        model = small_model(arch="bsbr", compression_factor=f)
        _, s1 = model.step(torch.randint(0, 97, (1, 16)), model.init_state(1))
        _, s2 = model.step(torch.randint(0, 97, (1, 16)), s1)
        per_chunk_F = s2.layers[0]["F"].view[0, 0, 0].numel()  # one head, one chunk
        sizes[f] = per_chunk_F
        assert s2.layers[0]["F"].length == 4  # 32 tokens / chunk 8
    d = 16  # head_dim of the small config
    assert sizes == {1: d * d, 4: d * d // 4, 16: d * d // 16}


def test_fixed_size_states_do_not_grow():
    for arch in ("linear", "delta_net", "sliding_window"):
        model = small_model(arch=arch)
        _, s1 = model.step(torch.randint(0, 97, (1, 64)), model.init_state(1))
        _, s2 = model.step(torch.randint(0, 97, (1, 640)), s1)
        assert s2.nbytes == s1.nbytes, arch


@pytest.mark.parametrize("overrides", VARIANT_CFGS, ids=VARIANT_IDS)
def test_delta_blobs_rebuild_the_state_page_by_page(overrides):
    """A checkpoint chain (one full blob, then one delta per page) restores
    the exact state, and a delta is much smaller than the full blob once the
    document is long (for the mechanisms whose history grows)."""
    model = small_model(**overrides)
    ids = torch.randint(0, 97, (1, 140))
    cuts = [0, 13, 40, 41, 77, 120, 140]
    state = model.init_state(1)
    chain = [state.to_bytes()]
    for a, b in zip(cuts, cuts[1:]):
        _, new = model.step(ids[:, a:b], state)
        chain.append(new.to_bytes(base=state))
        state = new
    restored = State.from_bytes(chain[0])
    for delta in chain[1:]:
        restored = State.from_bytes(delta, base=restored)
    assert restored.num_tokens == state.num_tokens and restored.nbytes == state.nbytes
    tail = torch.randint(0, 97, (1, 29))
    assert torch.equal(model.step(tail, restored)[0], model.step(tail, state)[0])
    if overrides["arch"] in ("bsbr", "standard") and overrides.get("max_length") is None:
        assert len(chain[-1]) < len(state.to_bytes()) / 2


def test_delta_blob_needs_its_own_base():
    model = small_model(arch="bsbr")
    ids = torch.randint(0, 97, (1, 60))
    _, s1 = model.step(ids[:, :20], model.init_state(1))
    _, s2 = model.step(ids[:, 20:40], s1)
    _, s3 = model.step(ids[:, 40:], s2)
    delta = s3.to_bytes(base=s2)
    with pytest.raises(StateError, match="delta"):
        State.from_bytes(delta)              # no base
    with pytest.raises(StateError, match="does not follow"):
        State.from_bytes(delta, base=s1)     # the wrong base
    with pytest.raises(StateError, match="takes no base"):
        State.from_bytes(s3.to_bytes(), base=s2)
    with pytest.raises(StateError, match="earlier state"):
        s1.to_bytes(base=s3)


def test_the_blob_payload_is_the_safetensors_that_safetensors_writes():
    """State.to_bytes writes safetensors itself (bsbr_core.state._safetensors_parts):
    safetensors' own reader gives back every tensor, dtype, shape and the metadata
    that safetensors' writer would have stored, empty and bfloat16 tensors too."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from bsbr_core.state import _HEADER, _safetensors_parts

    model = small_model(arch="bsbr")
    _, state = model.step(torch.randint(0, 97, (1, 37)), model.init_state(1))
    payload = state.to_bytes()[_HEADER.size:]
    ours = st_load(payload)
    assert set(ours) == set(state.tensors()) and "pending_ids" in ours
    for k, t in state.tensors().items():
        assert ours[k].dtype == t.dtype and torch.equal(ours[k], t), k
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "empty": torch.zeros(1, 0, dtype=torch.int64),
               "a": torch.arange(12, dtype=torch.int32).reshape(3, 4)[:, 1:3],  # not contiguous
               "flag": torch.tensor([True, False])}
    meta = {"k": json.dumps({"x": [1, 2]})}
    mine = b"".join(bytes(p) for p in _safetensors_parts(tensors, meta))
    theirs = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    a, b = st_load(mine), st_load(theirs)
    assert set(a) == set(b) == set(tensors)
    for k in tensors:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.safetensors")
        with open(path, "wb") as f:
            f.write(mine)
        with safe_open(path, "pt") as f:
            assert f.metadata() == meta
    with pytest.raises(StateError, match="dtype"):
        _safetensors_parts({"c": torch.zeros(2, dtype=torch.complex64)}, {})
