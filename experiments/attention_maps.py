"""Attention maps: BSBR's effective token-to-token weights beside standard's softmax.

    python -m experiments run attention_maps --profile cpu --threads 1

On the trained kernel-docs models (models/bsbr, models/standard) and real
documents of the kernel-docs test split cut to n = 256, 512 and 1024 tokens.
Per layer and head, two n x n maps of BSBR (t the query, s the key, c and j
their chunks, |j| the tokens of chunk j):

- **routing** (what the per-model figures draw): p_{t,s}, the local softmax,
  for s in t's own chunk; a_{c,j} / |j|, the retrieval weight of the key's
  chunk spread evenly over its tokens, for s in an earlier chunk; 0 for
  later chunks. A row of a chunk c >= 1 sums to 2 (1 local + 1 retrieval),
  a row of chunk 0 to 1.
- **exact**: the coefficient of v_s in the layer's output,
  o_t = sum_s W_{t,s} v_s: p_{t,s} in the own chunk and
  g * a_{c,j} * (q_t . k_s) / |j| in earlier chunks (o_t = O_loc_t + g q_t S_c
  with S_c = sum_j a_{c,j} (1/|j|) sum_{s in j} k_s v_s^T). Signed; it
  reproduces the layer's output exactly (tested). Only without compression.

For standard, both are its softmax P (block-causal: a token sees its own and
earlier chunks). Summary numbers per map (per layer, head-averaged, over
`docs` documents): the exact map's share of |W| on the token's own chunk
(the mass on the diagonal chunk) and its mean distance sum_s |W| |t - s| /
sum_s |W|; the share of the output's norm from earlier chunks
(|R_t| / (|L_t| + |R_t|), L and R the own-chunk and earlier-chunk parts of
o_t); over earlier chunks, the share of the previous chunk and the mean
chunk distance (BSBR: a_{c,j}; standard: its mass per key chunk, renormalised
over j < c).

If the corpus is missing, build it with ``python -m bsbr_core.cli data
kernel-docs``. The smoke profile needs neither the corpus nor a trained model.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiments.sparsity import (
    ARCHS,
    heads,
    layer_inputs,
    load_models,
    pick,
    standard_probs,
    synthetic_documents,
)

# The research page shows attention maps but gives no numbers; the claim is the
# picture: block-diagonal local attention plus retrieval of earlier chunks.
CLAIMS = {"maps": "BSBR: dense blocks on the diagonal (local softmax) plus chunk-level retrieval of earlier "
                  "chunks; standard: dense lower block triangle", "lengths": [256, 512, 1024]}

SUMMARY = ("own_chunk_share", "mean_distance", "earlier_output_share", "previous_chunk_share",
           "earlier_chunk_distance")


@dataclass
class AttentionMapsSettings:
    model_dirs: dict = field(default_factory=lambda: {"bsbr": "models/bsbr", "standard": "models/standard"})
    random_model: dict | None = None
    lengths: tuple[int, ...] = (256, 512, 1024)
    # Summary numbers: test documents with at least max(lengths) tokens, evenly
    # spaced by path, each cut to n; the maps drawn are of the first of them.
    docs: int = 8
    seed: int = 0


PROFILES = {
    "smoke": AttentionMapsSettings(
        random_model=dict(vocab_size=64, hidden_dim=16, num_layers=2, num_heads=2, ff_dim=16, chunk_size=8,
                          labels=["a", "b"]),
        lengths=(16, 32), docs=2),
    "cpu": AttentionMapsSettings(),
    "gpu": AttentionMapsSettings(docs=64),
}


# --- the maps ------------------------------------------------------------------------


def local_probs(attn, q, k) -> torch.Tensor:
    """BSBR's local softmax as an (b, H, n, n) matrix: query t over the keys
    of its own chunk (s <= t too when causal), zero elsewhere. One document, no padding."""
    n, B = q.shape[2], attn.chunk_size
    pos = torch.arange(n, device=q.device)
    allowed = (pos[None, :] // B) == (pos[:, None] // B)
    if attn.causal:
        allowed = allowed & (pos[None, :] <= pos[:, None])
    sc = (q @ k.transpose(-1, -2)) * attn.scale
    return torch.softmax(sc.masked_fill(~allowed, float("-inf")), dim=-1)


@torch.no_grad()
def bsbr_maps(attn, x) -> dict:
    """A BSBR layer's maps for one document x (1, n, D): local (p), a, routing,
    exact (None with compression), and q, k, v. Shapes (1, H, n, n), a (1, H, C, C)."""
    q, k, v = heads(attn, x)
    n, B = q.shape[2], attn.chunk_size
    local = local_probs(attn, q, k)
    a = attn.retrieval_weights(x)
    ch = torch.arange(n, device=q.device) // B
    size = torch.bincount(ch).to(q.dtype)  # |j|: every token of a single unpadded document is real
    spread = a[:, :, ch][:, :, :, ch] / size[ch]  # [t, s] = a_{c(t), c(s)} / |c(s)|, 0 unless c(s) < c(t)
    exact = None
    if not attn.compressed:
        exact = local + attn.gate.view(1, -1, 1, 1) * spread * (q @ k.transpose(-1, -2))
    return {"local": local, "a": a, "routing": local + spread, "exact": exact, "q": q, "k": k, "v": v}


@torch.no_grad()
def standard_maps(attn, x) -> dict:
    q, k, v = heads(attn, x)
    P = standard_probs(attn, q, k)
    return {"routing": P, "exact": P, "q": q, "k": k, "v": v}


def layer_maps(model, ids) -> list[dict]:
    fn = bsbr_maps if model.config.arch == "bsbr" else standard_maps
    return [fn(b.attn, x) for b, x in zip(model.encoder.blocks, layer_inputs(model, ids))]


def chunk_distribution(maps: dict, B: int) -> torch.Tensor:
    """(H, C, C): each query chunk's distribution over earlier chunks j < c
    (rows 0 zero). BSBR: a_{c,j}; standard: the mean over the chunk's tokens
    of P's mass per key chunk, renormalised over j < c."""
    if "a" in maps:
        return maps["a"][0]
    P = maps["exact"][0]
    H, n, _ = P.shape
    C = -(-n // B)
    Pp = torch.nn.functional.pad(P, (0, C * B - n, 0, C * B - n))
    M = Pp.view(H, C * B, C, B).sum(-1)  # (H, n', C): mass per key chunk
    real = torch.nn.functional.pad(torch.ones(n, dtype=P.dtype, device=P.device), (0, C * B - n)).view(C, B)
    M = (M.view(H, C, B, C) * real[None, :, :, None]).sum(2) / real.sum(1)[None, :, None]  # (H, C, C)
    out = torch.zeros_like(M)
    for c in range(1, C):
        out[:, c, :c] = M[:, c, :c] / M[:, c, :c].sum(-1, keepdim=True)
    return out


@torch.no_grad()
def summarize(maps: dict, B: int) -> dict[str, list[float]]:
    """Per head (H,): the summary numbers of one layer's maps of one document (see the module docstring)."""
    W = maps["exact"][0] if maps["exact"] is not None else maps["routing"][0]  # (H, n, n)
    H, n, _ = W.shape
    pos = torch.arange(n, device=W.device)
    own = (pos[None, :] // B) == (pos[:, None] // B)
    earlier = (pos[None, :] // B) < (pos[:, None] // B)
    absW = W.abs()
    tot = absW.sum(-1)  # (H, n)
    out = {
        "own_chunk_share": ((absW * own).sum(-1) / tot).mean(-1),
        "mean_distance": ((absW * (pos[:, None] - pos[None, :]).abs()).sum(-1) / tot).mean(-1),
    }
    v = maps["v"][0]  # (H, n, d)
    later = pos >= B  # tokens with earlier chunks
    if bool(later.any()):
        L = ((W * own) @ v).norm(dim=-1)
        R = ((W * earlier) @ v).norm(dim=-1)
        out["earlier_output_share"] = (R / (L + R).clamp_min(1e-30))[:, later].mean(-1)
        D = chunk_distribution(maps, B)  # (H, C, C)
        C = D.shape[1]
        cs = torch.arange(1, C, device=W.device)
        out["previous_chunk_share"] = D[:, cs, cs - 1].mean(-1)
        dist = (cs[:, None] - torch.arange(C, device=W.device)[None, :]).clamp_min(0).to(D.dtype)  # c - j
        out["earlier_chunk_distance"] = (D[:, 1:] * dist).sum(-1).mean(-1)
    return {k: [float(x) for x in t] for k, t in out.items()}


# --- the experiment -------------------------------------------------------------------


def documents(s, models) -> list[tuple[str, torch.Tensor]]:
    """The documents every map reads (each cut to n): as many as s.docs, of at least max(lengths) tokens."""
    m, tok = models["bsbr"]
    need = max(s.lengths)
    if s.random_model is not None:
        return synthetic_documents(m.config.vocab_size, [need], s.docs, s.seed)[need]
    from bsbr_core.data import DataError, default_kernel_docs_dir
    from bsbr_core.evaluate import load_tokenized

    try:
        split = load_tokenized(default_kernel_docs_dir(), "test", tok)
    except DataError as e:
        raise DataError(f"{e}\nThis experiment reads the kernel-docs test split; build the corpus with "
                        "`python -m bsbr_core.cli data kernel-docs`.") from e
    order = sorted((i for i in range(len(split)) if split.docs[i].numel() >= need), key=lambda i: split.paths[i])
    return [(split.paths[i], split.docs[i]) for i in pick(order, s.docs)]


def run(s: AttentionMapsSettings, ctx) -> dict:
    models = load_models(s, ctx.device)
    toks = [t for _, t in models.values() if t is not None]
    if len(toks) == 2 and toks[0].to_str() != toks[1].to_str():
        raise ValueError("the two models use different tokenizers; the maps would not read the same tokens")
    docs = documents(s, models)
    B = {a: m.config.chunk_size for a, (m, _) in models.items()}
    res = {"chunk_size": B, "documents": [p for p, _ in docs], "drawn_document": docs[0][0], "maps": {},
           "data": "random ids, random-weight models" if s.random_model is not None else "kernel-docs test split"}
    drawn = {}
    for a, (m, _) in models.items():
        res["maps"][a] = {}
        for n in s.lengths:
            key = hashlib.sha256(json.dumps([m.fingerprint, n, res["documents"]]).encode()).hexdigest()[:16]
            cache = ctx.work_dir / f"{a}-{n}.json"
            cached = json.loads(cache.read_text()) if cache.is_file() else {}
            first = layer_maps(m, docs[0][1][:n])
            drawn[(a, n)] = [{"routing": lm["routing"][0].float().cpu(),
                              "exact": None if lm["exact"] is None else lm["exact"][0].float().cpu()} for lm in first]
            if cached.get("key") == key:
                res["maps"][a][str(n)] = cached["value"]
            else:
                per_doc = [[summarize(lm, B[a]) for lm in (first if i == 0 else layer_maps(m, ids[:n]))]
                           for i, (_, ids) in enumerate(docs)]
                res["maps"][a][str(n)] = value = aggregate(per_doc)
                cache.write_text(json.dumps({"key": key, "value": value}) + "\n")
            ctx.log(f"{a} n={n}: " + ", ".join(f"{k} {v:.3f}" for k, v in res["maps"][a][str(n)]["mean"].items()))
            plot_model(drawn[(a, n)], a, n, B[a], docs[0][0], ctx.out_dir / f"attention_maps_{a}_{n}.png")
    plot_overview(drawn, s.lengths, B, docs[0][0], ctx.out_dir / "attention_maps.png")
    return res


def aggregate(per_doc: list[list[dict]]) -> dict:
    """Mean over documents: per layer and head, per layer (head mean), and over all layers and heads."""
    L = len(per_doc[0])
    layers = []
    for li in range(L):
        keys = per_doc[0][li].keys()
        layers.append({k: [sum(d[li][k][h] for d in per_doc) / len(per_doc) for h in range(len(per_doc[0][li][k]))]
                       for k in keys})
    return {
        "documents": len(per_doc),
        "per_layer_head": layers,
        "per_layer": [{k: sum(v) / len(v) for k, v in lay.items()} for lay in layers],
        "mean": {k: sum(sum(lay[k]) / len(lay[k]) for lay in layers) / L for k in layers[0]},
    }


# --- figures ------------------------------------------------------------------------------


def _imshow(ax, W, title, B, vmin=1e-5):
    import matplotlib.colors as mcolors

    n = W.shape[-1]
    im = ax.imshow(W.abs().clamp_min(vmin).numpy(), norm=mcolors.LogNorm(vmin=vmin, vmax=1.0), cmap="magma",
                   interpolation="antialiased", extent=(0, n, n, 0))
    for e in range(B, n, B):
        ax.axhline(e, color="white", lw=0.3, alpha=0.5)
        ax.axvline(e, color="white", lw=0.3, alpha=0.5)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)
    return im


def _colorbar_and_save(fig, im, path: Path) -> None:
    """A colour bar at the right, then a PNG with a 64-colour palette: maps of
    thousands of noisy cells compress badly in RGB (4x larger). The layout is
    set by hand: matplotlib's constrained layout takes seconds per figure."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    fig.subplots_adjust(left=0.05, right=0.91, bottom=0.07, top=0.9, wspace=0.28, hspace=0.32)
    fig.colorbar(im, cax=fig.add_axes((0.93, 0.25, 0.012, 0.5)))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def plot_model(layers: list[dict], arch: str, n: int, B: int, doc: str, path: Path) -> None:
    """Rows: layers; columns: the head mean, then each head. BSBR draws its routing map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H = len(layers), layers[0]["routing"].shape[0]
    fig, axes = plt.subplots(L, H + 1, figsize=(3.0 * (H + 1) + 0.8, 3.0 * L + 0.5), squeeze=False)
    im = None
    for li, lm in enumerate(layers):
        W = lm["routing"]
        im = _imshow(axes[li][0], W.mean(0), f"layer {li}, mean of {H} heads", B)
        for h in range(H):
            _imshow(axes[li][h + 1], W[h], f"layer {li}, head {h}", B)
        axes[li][0].set_ylabel("query t", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("key s", fontsize=7)
    what = ("routing weights: local softmax in the own chunk, a_{c,j}/|j| on earlier chunks"
            if arch == "bsbr" else "softmax weights (block-causal)")
    fig.suptitle(f"{arch}, {n} tokens of {doc}: {what} (log scale, chunks of {B})", fontsize=9)
    _colorbar_and_save(fig, im, path)


def plot_overview(drawn: dict, lengths, B: dict, doc: str, path: Path) -> None:
    """The last layer, mean over heads: BSBR's routing and |exact| maps beside standard's softmax, by length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("bsbr", "routing", "bsbr routing"), ("bsbr", "exact", "bsbr |exact coefficient|"),
            ("standard", "routing", "standard softmax")]
    rows = [r for r in rows if all(drawn[(r[0], n)][-1][r[1]] is not None for n in lengths)]
    fig, axes = plt.subplots(len(rows), len(lengths), figsize=(3.4 * len(lengths) + 0.8, 3.3 * len(rows)),
                             squeeze=False)
    im = None
    for i, (a, kind, label) in enumerate(rows):
        for j, n in enumerate(lengths):
            W = drawn[(a, n)][-1][kind]
            im = _imshow(axes[i][j], W.abs().mean(0), f"{label}, n = {n}", B[a])
    fig.suptitle(f"last layer, mean over heads of |W|, {doc} (log scale)", fontsize=9)
    _colorbar_and_save(fig, im, path)


# --- report -----------------------------------------------------------------------------------


def report(record: dict) -> str:
    r, s = record["results"], record["settings"]
    ns = [str(n) for n in s["lengths"]]
    B = r["chunk_size"]["bsbr"]
    lines = [
        f"**What was run.** Data: {r['data']}; models `{s['model_dirs']['bsbr']}` and `{s['model_dirs']['standard']}`"
        + (" (replaced by random-weight models)" if s.get("random_model") else "")
        + f", chunk size B = {B}. {len(r['documents'])} test documents of at least {max(s['lengths'])} tokens, "
        f"each cut to n = {', '.join(ns)} tokens; the maps drawn are of `{r['drawn_document']}`. Each per-model "
        "figure shows every layer (rows) as the mean over heads and each head (columns), on a log scale. "
        "What is drawn for BSBR is its routing map: for key s in the query's own chunk, the local softmax weight; "
        "for s in an earlier chunk j, the retrieval weight a_{c,j} divided by the chunk's token count (spread "
        "evenly over its tokens), so a row sums to 1 (chunk 0) or 2 (1 local + 1 retrieval). The overview figure "
        "adds BSBR's exact coefficients |W_{t,s}| (o_t = sum_s W_{t,s} v_s: g a_{c,j} (q_t . k_s) / |j| in earlier "
        "chunks), which say how much the retrieved term weighs against the local one. Standard's map is its "
        "softmax. Summary numbers are over the exact maps, averaged over documents, layers and heads (per layer "
        "in the JSON): own-chunk share of |W| (the mass on the diagonal chunk), mean distance |t - s| weighted "
        "by |W|, the share of the output's norm that comes from earlier chunks, and over earlier chunks the "
        "previous chunk's share and the mean chunk distance c - j.",
        "",
        "**The page's claim**: the maps themselves (BSBR block-diagonal local attention plus chunk-level retrieval; "
        "standard dense); it gives no numbers.",
        "",
        "**Measured** (mean over documents, layers and heads):",
        "",
        "| model | n | own-chunk share of abs(W) | mean distance (tokens) | earlier-chunk share of output | "
        "previous-chunk share | mean chunk distance |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def f(row, k, fmt):
        return format(row[k], fmt) if k in row else "-"

    for a in ARCHS:
        for n in ns:
            row = r["maps"][a][n]["mean"]
            lines.append(f"| {a} | {n} | {f(row, 'own_chunk_share', '.3f')} | {f(row, 'mean_distance', '.1f')} | "
                         f"{f(row, 'earlier_output_share', '.3f')} | {f(row, 'previous_chunk_share', '.3f')} | "
                         f"{f(row, 'earlier_chunk_distance', '.2f')} |")
    lines += ["", "Per layer at the longest length (head mean):", "",
              "| model | layer | own-chunk share | mean distance | earlier-chunk share of output | previous-chunk share |",
              "|---|---:|---:|---:|---:|---:|"]
    for a in ARCHS:
        for li, row in enumerate(r["maps"][a][ns[-1]]["per_layer"]):
            lines.append(f"| {a} | {li} | {f(row, 'own_chunk_share', '.3f')} | {f(row, 'mean_distance', '.1f')} | "
                         f"{f(row, 'earlier_output_share', '.3f')} | {f(row, 'previous_chunk_share', '.3f')} |")
    lines += ["", "![overview: last layer, BSBR routing and exact maps beside standard](../experiments/results/"
              "attention_maps.png)", ""]
    for a in ARCHS:
        lines.append(" ".join(f"![{a} at {n} tokens](../experiments/results/attention_maps_{a}_{n}.png)" for n in ns))
    lines += ["", "**Does the claim hold here?** " + verdict(r, ns)]
    return "\n".join(lines) + "\n"


def verdict(r: dict, ns: list[str]) -> str:
    b, st = r["maps"]["bsbr"][ns[-1]]["mean"], r["maps"]["standard"][ns[-1]]["mean"]
    out = [f"At {ns[-1]} tokens BSBR's effective weights put {b['own_chunk_share']:.2f} of their absolute mass on the "
           f"token's own chunk against standard's {st['own_chunk_share']:.2f}, and {b.get('earlier_output_share', 0):.2f} "
           f"of its output's norm comes from earlier chunks against standard's {st.get('earlier_output_share', 0):.2f}."]
    if "previous_chunk_share" in b:
        out.append(f"Over earlier chunks the previous one gets {b['previous_chunk_share']:.2f} of BSBR's retrieval and "
                   f"{st['previous_chunk_share']:.2f} of standard's attention (mean chunk distance "
                   f"{b['earlier_chunk_distance']:.2f} and {st['earlier_chunk_distance']:.2f}).")
    out.append("The page's picture holds by construction: BSBR's only token-level softmax is inside the diagonal "
               "blocks, and its routing weight on an earlier chunk is one number per (query chunk, key chunk), drawn "
               "as a flat block; standard's softmax fills the lower block triangle. The numbers above say how much "
               "each part is used.")
    return " ".join(out)
