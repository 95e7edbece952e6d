"""Code written for the `bsbr` 0.1.x package runs unchanged on bsbr_core's
compatible classes (docs/architecture.md 2.3), and the README's Python
example runs as printed."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from bsbr_core import BSBRAttention, BSBRLayer, BSBRModel

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

# The constructor signatures the 0.1.x package documented, in its order.
OLD_SIGNATURES = {
    BSBRAttention: ["hidden_dim", "num_heads", "chunk_size", "dropout", "compression_factor"],
    BSBRLayer: ["hidden_dim", "num_heads", "chunk_size", "ff_dim", "dropout", "compression_factor"],
    BSBRModel: ["vocab_size", "hidden_dim", "num_layers", "num_heads", "chunk_size", "ff_dim", "dropout",
                "compression_factor"],
}


def seeded(cls, *args, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return cls(*args, **kwargs).eval()


def small(kind: str, **kwargs):
    """A small module of each class (hidden 32, 4 heads, chunk 8), in eval mode."""
    if kind == "attention":
        return seeded(BSBRAttention, 32, 4, 8, **kwargs)
    if kind == "layer":
        return seeded(BSBRLayer, 32, 4, 8, 64, **kwargs)
    return seeded(BSBRModel, 50, 32, 2, 4, 8, 64, **kwargs)


def inputs(kind: str, b: int, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "model":
        return torch.randint(0, 50, (b, n), generator=g)
    return torch.randn(b, n, 32, generator=g)


KINDS = ["attention", "layer", "model"]


@pytest.mark.parametrize("cls", list(OLD_SIGNATURES), ids=lambda c: c.__name__)
def test_constructor_arguments_are_the_old_packages(cls):
    params = list(inspect.signature(cls.__init__).parameters)[1:]
    assert params == OLD_SIGNATURES[cls]
    sig = inspect.signature(cls.__init__).parameters
    assert sig["dropout"].default == 0.1 and sig["compression_factor"].default is None


def test_positional_and_keyword_construction_build_the_same_modules():
    pairs = [
        (lambda: BSBRAttention(64, 4, 16, 0.0, 2),
         lambda: BSBRAttention(hidden_dim=64, num_heads=4, chunk_size=16, dropout=0.0, compression_factor=2)),
        (lambda: BSBRLayer(64, 4, 16, 128, 0.0, 4),
         lambda: BSBRLayer(hidden_dim=64, num_heads=4, chunk_size=16, ff_dim=128, dropout=0.0,
                           compression_factor=4)),
        (lambda: BSBRModel(100, 64, 2, 4, 16, 128, 0.0, None),
         lambda: BSBRModel(vocab_size=100, hidden_dim=64, num_layers=2, num_heads=4, chunk_size=16, ff_dim=128,
                           dropout=0.0, compression_factor=None)),
    ]
    for positional, keyword in pairs:
        torch.manual_seed(0)
        a = positional()
        torch.manual_seed(0)
        b = keyword()
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_old_quick_start_runs_unchanged():
    # bsbr 0.1.x's README quick start (sizes reduced), attention_mask of float ones included.
    model = BSBRModel(
        vocab_size=1000,
        hidden_dim=64,
        num_layers=2,
        num_heads=4,
        chunk_size=32,
        ff_dim=128,
        dropout=0.1,
        compression_factor=4,
    )
    input_ids = torch.randint(0, 1000, (2, 100))
    attention_mask = torch.ones(2, 100)
    outputs = model(input_ids, attention_mask)
    assert outputs.shape == (2, 100, 64)
    outputs.sum().backward()  # it trains as before
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 8, 21, 64])
def test_forward_returns_batch_seq_hidden(kind, n):
    out = small(kind)(inputs(kind, 3, n))
    assert out.shape == (3, n, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("factor", [None, 1, 2, 4, 8, 16])
def test_every_compression_factor_is_accepted(factor):
    out = small("layer", compression_factor=factor)(inputs("layer", 1, 20))
    assert out.shape == (1, 20, 32)


def test_an_unsupported_compression_factor_is_a_clear_error():
    with pytest.raises(ValueError, match="compression_factor"):
        BSBRAttention(32, 4, 8, 0.0, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_mode_is_deterministic_and_dropout_acts_in_training(kind):
    module, x = small(kind), inputs(kind, 2, 30)
    with torch.no_grad():
        assert torch.equal(module(x), module(x))
        module.train()
        assert not torch.equal(module(x), module(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, padded", [(13, 16), (13, 40), (16, 17), (5, 8)])
def test_padding_under_attention_mask_leaves_real_tokens_unchanged(kind, n, padded):
    """A right-padded batch row gives its real tokens the outputs of the
    unpadded sequence, whatever the padding holds (same chunk or later ones)."""
    module = small(kind)
    x = inputs(kind, 1, n)
    junk = inputs(kind, 1, padded - n, seed=9)
    mask = torch.zeros(1, padded, dtype=torch.long)
    mask[:, :n] = 1
    with torch.no_grad():
        alone = module(x)
        padded_out = module(torch.cat([x, junk], dim=1), mask)
        assert torch.allclose(padded_out[:, :n], alone, atol=TOL)
        # Two rows of different lengths in one batch: each equals its own sequence.
        y = inputs(kind, 1, padded, seed=3)
        batch = module(torch.cat([torch.cat([x, junk], dim=1), y]), torch.cat([mask, torch.ones_like(mask)]))
        assert torch.allclose(batch[:1, :n], alone, atol=TOL) and torch.allclose(batch[1:], module(y), atol=TOL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("changed_chunk", [1, 2, 3])
def test_no_token_sees_a_later_chunk(kind, changed_chunk):
    """Changing any token of chunk c+1 (or later) leaves the outputs of
    chunks 0..c exactly as they were (chunk size 8)."""
    module, B = small(kind), 8
    x = inputs(kind, 1, 4 * B + 3)
    y = x.clone()
    start = changed_chunk * B
    y[:, start:] = inputs(kind, 1, y.shape[1] - start, seed=7)
    with torch.no_grad():
        ox, oy = module(x), module(y)
    assert torch.allclose(ox[:, :start], oy[:, :start], atol=TOL)
    assert not torch.allclose(ox[:, start:], oy[:, start:], atol=TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_tokens_see_their_whole_chunk(kind):
    """Inside a chunk the attention is not causal (as in 0.1.x): the first
    token of a chunk depends on the chunk's last token, so causality holds
    between chunks, not between tokens."""
    module, B = small(kind), 8
    x = inputs(kind, 1, 3 * B)
    y = x.clone()
    y[:, 2 * B - 1] = inputs(kind, 1, 1, seed=5)[:, 0]  # last token of chunk 1
    with torch.no_grad():
        ox, oy = module(x), module(y)
    assert torch.allclose(ox[:, :B], oy[:, :B], atol=TOL)  # chunk 0 untouched
    assert not torch.allclose(ox[:, B], oy[:, B], atol=TOL)  # first token of chunk 1 sees it


def test_a_long_sequence_runs_in_bounded_memory_without_a_length_limit():
    # No maximum length: 10x the chunk count of anything above, same module.
    out = small("model")(inputs("model", 1, 2000))
    assert out.shape == (1, 2000, 32) and torch.isfinite(out).all()


# --- the README's Python example ------------------------------------------------------------


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL) if "bsbr_core" in b]


def test_the_readme_has_a_bsbr_core_example():
    assert readme_python_blocks()


@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_readme_python_example_runs(index, tmp_path, monkeypatch):
    """Each README block that uses bsbr_core runs as printed, in a fresh
    directory that sees the shipped models/ (for blocks that load them)."""
    block = readme_python_blocks()[index]
    if (ROOT / "models").is_dir():
        (tmp_path / "models").symlink_to(ROOT / "models")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})  # noqa: S102
