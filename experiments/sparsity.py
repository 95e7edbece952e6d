"""Structured sparsity: the token pairs BSBR never scores, and how concentrated its retrieval is.

    python -m experiments run sparsity --profile cpu --threads 1

Two measurements on the trained kernel-docs models (models/bsbr and
models/standard) over real documents of the kernel-docs test split, each cut
to its first n tokens (n = 512 .. 8192), and on the synthetic recall task's
checkpoints (experiments/checkpoints/long_range/{bsbr,standard}):

1. **Pairs not scored.** A causal pair is (query t, key s) with s <= t. The
   pairs a layer scores with a token-level softmax are read from the layer's
   own code: `attend` is called with queries and keys whose first feature is
   the token's position + 1, and every call it makes to its softmax kernel
   (`Attention.sdpa`) records which positions met which under its mask. So
   "within chunk" (s in t's chunk), "between chunks" (s in an earlier
   chunk) and "overall" are counted, not assumed. The set depends on n and
   the chunk size only (no layer's weights decide it), but it is counted on
   the trained models' layers at each length.
2. **Concentration of the retrieval softmax** a_{c,j} over the earlier
   chunks j < c (BSBRAttentionCore.retrieval_weights, the layer's own
   functions): entropy (nats), entropy / log(number of candidates), and the
   mass of the top 1 and top 4 chunks, per layer and head, averaged over
   documents and over the query chunks with at least 2 candidates (c >= 2).
   For standard, the same statistics of its softmax aggregated per key
   chunk: for query chunk c, the mean over its tokens of the mass on each
   earlier chunk j < c, renormalised over j < c (plus the share of its
   attention that goes to earlier chunks at all). A uniform distribution
   over the same candidates is the reference row.

If the corpus is missing, build it with ``python -m bsbr_core.cli data
kernel-docs``. The smoke profile needs neither the corpus nor a trained model:
tiny random-weight models read random token ids.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The research page's sparsity figure: fraction of (query, key) pairs not scored.
CLAIMS = {"fraction_not_scored": {"within": 0.0, "between": 0.85, "overall": 0.65}}

ARCHS = ("bsbr", "standard")
STATS = ("entropy", "norm_entropy", "top1", "top4")


@dataclass
class SparsitySettings:
    # Model folders relative to the checkout, by arch; random_model (ModelConfig
    # fields) replaces them with random-weight models reading random ids.
    model_dirs: dict = field(default_factory=lambda: {"bsbr": "models/bsbr", "standard": "models/standard"})
    random_model: dict | None = None
    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    docs_per_length: int = 8  # test documents with >= n tokens, evenly spaced by path (fewer if fewer exist)
    recall_dirs: dict = field(default_factory=lambda: {
        "bsbr": "experiments/checkpoints/long_range/bsbr", "standard": "experiments/checkpoints/long_range/standard"})
    recall_lengths: tuple[int, ...] = (512, 2048, 8192)
    recall_count: int = 8
    seed: int = 0


PROFILES = {
    "smoke": SparsitySettings(
        random_model=dict(vocab_size=64, hidden_dim=16, num_layers=2, num_heads=2, ff_dim=16, chunk_size=8,
                          labels=["a", "b"]),
        lengths=(16, 40, 64), docs_per_length=2, recall_dirs={}),
    "cpu": SparsitySettings(),
    "gpu": SparsitySettings(lengths=(512, 1024, 2048, 4096, 8192), docs_per_length=64, recall_count=64),
}


# --- reading a model's layers -----------------------------------------------------


@torch.no_grad()
def layer_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each block's normalised attention input (1, n, D) for one document
    ids (n,), captured from the model's own forward pass."""
    n = ids.numel()
    if n > model.config.segment_tokens or model.config.max_length is not None:
        raise ValueError("layer_inputs reads one segment of a model without max_length")
    xs: list[torch.Tensor] = []
    hooks = [b.norm_attn.register_forward_hook(lambda mod, inp, out: xs.append(out)) for b in model.encoder.blocks]
    try:
        model(ids.reshape(1, -1).to(model.device))
    finally:
        for h in hooks:
            h.remove()
    return xs


def heads(attn, x: torch.Tensor):
    """q, k, v (1, H, n, d) of a layer for its input x, as its forward computes them (RoPE from 0)."""
    return attn._heads(attn.qkv(x), 0)


@torch.no_grad()
def scored_pairs(attn, n: int) -> torch.Tensor:
    """(n, n) bool: [t, s] is True when the layer's attend, reading a
    document of n tokens one-shot, puts query t and key s in one token-level
    softmax (an `sdpa` call, under its mask). Read from the calls themselves:
    the first feature of every query and key is its position + 1 (padding 0)."""
    H, d, D = attn.num_heads, attn.head_dim, attn.cfg.hidden_dim
    dev = next(attn.parameters()).device
    tag = torch.arange(1, n + 1, dtype=torch.float32, device=dev)
    q = torch.zeros(1, H, n, d, device=dev)
    q[..., 0] = tag
    seen = torch.zeros(n, n, dtype=torch.bool, device=dev)

    def record(qs, ks, vs, attn_mask=None):
        G, Lq, Lk = qs.shape[1], qs.shape[2], ks.shape[2]
        m = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=dev) if attn_mask is None else attn_mask
        m = m.expand(qs.shape[0], G, Lq, Lk)
        for bi in range(qs.shape[0]):
            for g in range(G):
                tq, tk = qs[bi, g, :, 0].long(), ks[bi, g, :, 0].long()
                rows, cols = tq > 0, tk > 0
                sub = m[bi, g][rows][:, cols]
                ii, jj = (tq[rows] - 1)[:, None], (tk[cols] - 1)[None, :]
                seen[ii, jj] = seen[ii, jj] | sub
        return qs.new_zeros(*qs.shape[:-1], vs.shape[-1])

    attn.sdpa = record  # an instance attribute shadows the method for this call only
    try:
        attn.attend(q, q.clone(), torch.zeros_like(q), torch.zeros(1, n, D, device=dev), 0, None, None, False)
    finally:
        del attn.sdpa
    return seen


def pair_fractions(seen: torch.Tensor, B: int) -> dict:
    """Fractions of causal pairs (s <= t) not scored: within t's chunk,
    with s in an earlier chunk, and overall; and the counts."""
    n = seen.shape[0]
    pos = torch.arange(n, device=seen.device)
    cnt = dict(within=0, between=0, causal=0, within_scored=0, between_scored=0, causal_scored=0, noncausal_scored=0)
    for r0 in range(0, n, 1024):  # row blocks bound the memory at 8K tokens
        t = pos[r0 : r0 + 1024, None]
        causal = pos[None, :] <= t
        same = (pos[None, :] // B) == (t // B)
        within, between = causal & same, causal & ~same
        sb = seen[r0 : r0 + 1024]
        cnt["within"] += int(within.sum())
        cnt["between"] += int(between.sum())
        cnt["causal"] += int(causal.sum())
        cnt["within_scored"] += int((sb & within).sum())
        cnt["between_scored"] += int((sb & between).sum())
        cnt["causal_scored"] += int((sb & causal).sum())
        cnt["noncausal_scored"] += int((sb & ~causal).sum())

    def not_scored(part):
        return None if cnt[part] == 0 else 1.0 - cnt[f"{part}_scored"] / cnt[part]

    return {"within": not_scored("within"), "between": not_scored("between"), "overall": not_scored("causal"),
            "causal_pairs": cnt["causal"], "within_pairs": cnt["within"], "between_pairs": cnt["between"],
            "scored_pairs": int(seen.sum()), "scored_noncausal_pairs": cnt["noncausal_scored"]}


def expected_overall(n: int, B: int) -> float:
    """The closed form if exactly the within-chunk causal pairs are scored:
    between-chunk causal pairs / all causal pairs."""
    within = sum(L * (L + 1) // 2 for L in [B] * (n // B) + ([n % B] if n % B else []))
    return 1.0 - within / (n * (n + 1) // 2)


# --- attention weights --------------------------------------------------------------


def standard_probs(attn, q, k, s: int = 0, e: int | None = None) -> torch.Tensor:
    """Standard's softmax weights of queries s..e-1 over keys 0..K-1 (K =
    the end of the last query's chunk), block-causal as its attend: query t
    sees key u when u // B <= t // B. q, k (b, H, n, d); returns (b, H, e-s, K)."""
    n, B = q.shape[2], attn.chunk_size
    e = n if e is None else e
    K = min(n, ((e - 1) // B + 1) * B)
    sc = (q[:, :, s:e] @ k[:, :, :K].transpose(-1, -2)) * attn.scale
    allowed = (torch.arange(K, device=q.device)[None, :] // B) <= (torch.arange(s, e, device=q.device)[:, None] // B)
    return torch.softmax(sc.masked_fill(~allowed, float("-inf")), dim=-1)


def standard_chunk_mass(attn, q, k) -> torch.Tensor:
    """(H, C, C): [h, c, j] = the mean over chunk c's query tokens of the
    softmax mass standard puts on key chunk j (0 for j > c). One document (b = 1)."""
    n, B, H = q.shape[2], attn.chunk_size, q.shape[1]
    C = -(-n // B)
    out = q.new_zeros(H, C, C)
    for c in range(C):
        s, e = c * B, min(c * B + B, n)
        P = standard_probs(attn, q, k, s, e)[0]  # (H, e - s, K)
        K = P.shape[-1]
        P = torch.nn.functional.pad(P, (0, (c + 1) * B - K))
        out[:, c, : c + 1] = P.view(H, e - s, c + 1, B).sum(-1).mean(1)
    return out


def row_stats(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Concentration of distributions p (..., m) over m >= 2 candidates."""
    m = p.shape[-1]
    ent = -(torch.where(p > 0, p * p.clamp_min(1e-45).log(), p.new_zeros(()))).sum(-1)
    top = p.topk(min(4, m), dim=-1).values
    return {"entropy": ent, "norm_entropy": ent / math.log(m), "top1": top[..., 0], "top4": top.sum(-1)}


def uniform_stats(m: int) -> dict[str, float]:
    return {"entropy": math.log(m), "norm_entropy": 1.0, "top1": 1.0 / m, "top4": min(4, m) / m}


class StatsAccumulator:
    """Sums of the concentration statistics per (layer, head) over documents and query chunks."""

    def __init__(self, layers: int, heads: int):
        self.sum = {s: torch.zeros(layers, heads, dtype=torch.float64) for s in STATS}
        self.uniform = {s: 0.0 for s in STATS}
        self.count = 0  # query chunks per (layer, head)
        self.extra: dict[str, torch.Tensor] = {}

    def add(self, layer: int, dist: torch.Tensor) -> None:
        """dist (H, C, C): row c a distribution over j < c (entries j >= c ignored)."""
        C = dist.shape[1]
        for c in range(2, C):
            st = row_stats(dist[:, c, :c].double())
            for s in STATS:
                self.sum[s][layer] += st[s].cpu()
            if layer == 0:
                self.count += 1
                for s, v in uniform_stats(c).items():
                    self.uniform[s] += v

    def add_extra(self, key: str, layer: int, values: torch.Tensor) -> None:
        """A per-head mean over the same query chunks (e.g. standard's mass on earlier chunks)."""
        L, H = self.sum["top1"].shape
        self.extra.setdefault(key, torch.zeros(L, H, dtype=torch.float64))
        self.extra[key][layer] += values.double().cpu()

    def result(self) -> dict:
        if self.count == 0:
            return {"query_chunks": 0}
        per = {s: (self.sum[s] / self.count) for s in STATS}
        per.update({k: v / self.count for k, v in self.extra.items()})
        return {
            "query_chunks": self.count,
            "mean": {s: float(v.mean()) for s, v in per.items()},
            "per_layer_head": {s: v.tolist() for s, v in per.items()},
            "uniform": {s: v / self.count for s, v in self.uniform.items()},
        }


@torch.no_grad()
def concentration(model, docs: list[torch.Tensor]) -> dict:
    """Concentration statistics of one model over documents (see the module docstring)."""
    cfg = model.config
    acc = StatsAccumulator(cfg.num_layers, cfg.num_heads)
    for ids in docs:
        for li, (block, x) in enumerate(zip(model.encoder.blocks, layer_inputs(model, ids))):
            attn = block.attn
            if cfg.arch == "bsbr":
                acc.add(li, attn.retrieval_weights(x)[0])
            elif cfg.arch == "standard":
                q, k, _ = heads(attn, x)
                M = standard_chunk_mass(attn, q, k)  # (H, C, C)
                C = M.shape[1]
                earlier = torch.stack([M[:, c, :c].sum(-1) for c in range(2, C)], -1) if C > 2 else None
                norm = torch.zeros_like(M)
                for c in range(1, C):
                    norm[:, c, :c] = M[:, c, :c] / M[:, c, :c].sum(-1, keepdim=True)
                acc.add(li, norm)
                if earlier is not None:  # summed over query chunks c >= 2; result() divides as for the rest
                    acc.add_extra("earlier_mass", li, earlier.sum(-1))
            else:
                raise ValueError(f"concentration measures bsbr and standard, not {cfg.arch}")
    return acc.result()


# --- documents and models -------------------------------------------------------------


def pick(items: list, count: int) -> list:
    """count items evenly spaced over the list (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / max(1, count - 1))] for i in range(count)]


def test_documents(tokenizer, lengths, per_length: int) -> dict[int, list[tuple[str, torch.Tensor]]]:
    """For each n: up to per_length kernel-docs test documents with at least
    n tokens (evenly spaced in path order), each cut to its first n tokens."""
    from bsbr_core.data import DataError, default_kernel_docs_dir
    from bsbr_core.evaluate import load_tokenized

    try:
        split = load_tokenized(default_kernel_docs_dir(), "test", tokenizer)
    except DataError as e:
        raise DataError(f"{e}\nThis experiment reads the kernel-docs test split; build the corpus with "
                        "`python -m bsbr_core.cli data kernel-docs`.") from e
    order = sorted(range(len(split)), key=lambda i: split.paths[i])
    out = {}
    for n in lengths:
        long_enough = [i for i in order if split.docs[i].numel() >= n]
        out[n] = [(split.paths[i], split.docs[i][:n]) for i in pick(long_enough, per_length)]
    return out


def synthetic_documents(vocab: int, lengths, per_length: int, seed: int) -> dict[int, list[tuple[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    return {n: [(f"random-{n}-{i}", torch.randint(0, vocab, (n,), generator=g)) for i in range(per_length)]
            for n in lengths}


def load_models(s, device: str) -> dict:
    """arch -> model (eval mode), trained or (random_model) random-weight."""
    from bsbr_core import ModelConfig, build_model, load_model
    from experiments.runner import ROOT

    models = {}
    for i, arch in enumerate(ARCHS):
        if s.random_model is not None:
            torch.manual_seed(s.seed + i)
            models[arch] = (build_model(ModelConfig(arch=arch, **s.random_model)).to(device).eval(), None)
        else:
            models[arch] = load_model(ROOT.parent / s.model_dirs[arch], device=device)
    return models


def _digest(model) -> str:
    return model.fingerprint


def _cached(path: Path, key: str, compute):
    if path.is_file():
        d = json.loads(path.read_text())
        if d.get("key") == key:
            return d["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "value": value}) + "\n")
    return value


# --- the experiment -------------------------------------------------------------------


def run(s: SparsitySettings, ctx) -> dict:
    models = load_models(s, ctx.device)
    B = {a: m.config.chunk_size for a, (m, _) in models.items()}
    pairs, conc, docs_used = {}, {a: {} for a in ARCHS}, {}
    for n in s.lengths:
        pairs[str(n)] = {}
        for a, (m, _) in models.items():
            def count(m=m, a=a, n=n):
                seen = None
                for block in m.encoder.blocks:  # a pair counts as scored if any layer scores it
                    sp = scored_pairs(block.attn, n)
                    seen = sp if seen is None else seen | sp
                return pair_fractions(seen, B[a])
            key = hashlib.sha256(f"pairs/{_digest(m)}/{n}".encode()).hexdigest()[:16]
            pairs[str(n)][a] = _cached(ctx.work_dir / f"pairs-{a}-{n}.json", key, count)
        pairs[str(n)]["expected_bsbr_overall"] = expected_overall(n, B["bsbr"])
        ctx.log(f"n={n}: not scored " + ", ".join(
            f"{a} {pairs[str(n)][a]['overall']:.4f}" for a in ARCHS))
    for a, (m, tok) in models.items():
        if s.random_model is not None:
            docs = synthetic_documents(m.config.vocab_size, s.lengths, s.docs_per_length, s.seed)
        else:
            docs = test_documents(tok, s.lengths, s.docs_per_length)
        for n, items in docs.items():
            docs_used.setdefault(str(n), [p for p, _ in items])
            key = hashlib.sha256(json.dumps([_digest(m), n, [p for p, _ in items]]).encode()).hexdigest()[:16]
            conc[a][str(n)] = _cached(ctx.work_dir / f"concentration-{a}-{n}.json", key,
                                      lambda m=m, items=items: {"documents": len(items),
                                                                **concentration(m, [d for _, d in items])})
            ctx.log(f"{a} n={n}: {conc[a][str(n)].get('mean')}")
    out = {"chunk_size": B, "pairs": pairs, "concentration": conc, "documents": docs_used,
           "data": "random ids, random-weight models" if s.random_model is not None else "kernel-docs test split"}
    if s.recall_dirs:
        out["recall"] = recall(s, ctx)
    plot(out, ctx.out_dir / "sparsity.png")
    return out


@torch.no_grad()
def recall(s: SparsitySettings, ctx) -> dict:
    """The same statistics on the recall task's checkpoints, plus where the
    last chunk's retrieval goes: the mass on the chunk holding the queried
    pair (the pairs open the sequence), which the answer needs."""
    from bsbr_core import load_model
    from experiments import long_range
    from experiments.runner import ROOT

    task = long_range.PROFILES["cpu"].task
    res = {}
    for a, path in s.recall_dirs.items():
        m, _ = load_model(ROOT.parent / path, device=ctx.device)
        if m.config.vocab_size != task.vocab_size:
            raise ValueError(f"{path} was not trained on the cpu profile's recall task")
        res[a] = {}
        for n in s.recall_lengths:
            docs, labels = task.samples([n - task.num_pairs] * s.recall_count, seed=50_000 + n)

            def compute(m=m, docs=docs, labels=labels):
                L, H, B = m.config.num_layers, m.config.num_heads, m.config.chunk_size
                on_pair = torch.zeros(L, H, dtype=torch.float64)
                top_is_pair = torch.zeros(L, H, dtype=torch.float64)
                correct = 0
                for ids, y in zip(docs, labels):
                    key = int(ids[-1])
                    pair_pos = next(i for i, t in enumerate(ids[: task.pairs_len].tolist())
                                    if t in task.pair_ids and (task.pair_ids.index(t) // task.num_pairs)
                                    == task.key_ids.index(key))
                    j = pair_pos // B
                    correct += int(m(ids[None].to(m.device)).argmax()) == y
                    for li, (block, x) in enumerate(zip(m.encoder.blocks, layer_inputs(m, ids))):
                        if m.config.arch == "bsbr":
                            row = block.attn.retrieval_weights(x)[0, :, -1]  # (H, C): the last chunk's retrieval
                        else:
                            q, k, _ = heads(block.attn, x)
                            M = standard_chunk_mass(block.attn, q, k)[:, -1]
                            C = M.shape[-1]
                            row = M[:, : C - 1] / M[:, : C - 1].sum(-1, keepdim=True)
                        row = row[:, : -1] if m.config.arch == "bsbr" else row
                        on_pair[li] += row[:, j].double()
                        top_is_pair[li] += (row.argmax(-1) == j).double()
                k = len(docs)
                return {"sequences": k, "accuracy": correct / k, "pair_chunk_mass": (on_pair / k).tolist(),
                        "top1_is_pair_chunk": (top_is_pair / k).tolist(),
                        "candidates": -(-len(docs[0]) // B) - 1,
                        **concentration(m, docs)}
            key = hashlib.sha256(json.dumps([_digest(m), n, s.recall_count]).encode()).hexdigest()[:16]
            res[a][str(n)] = _cached(ctx.work_dir / f"recall-{a}-{n}.json", key, compute)
            ctx.log(f"recall {a} n={n}: pair-chunk mass {res[a][str(n)]['pair_chunk_mass']}")
    return res


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(n) for n in res["pairs"]]
    rec = res.get("recall")
    fig, axes = plt.subplots(1, 4 if rec else 3, figsize=(18.5 if rec else 14, 4))
    ax = axes[0]
    for part, style in (("overall", "o-"), ("between", "s--"), ("within", "^:")):
        ax.plot(ns, [res["pairs"][str(n)]["bsbr"][part] for n in ns], style, label=f"bsbr {part}")
    ax.plot(ns, [res["pairs"][str(n)]["standard"]["overall"] for n in ns], "kx-", label="standard overall")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("document length n (tokens)")
    ax.set_ylabel("fraction of causal pairs not scored")
    ax.set_title("pairs never in a token-level softmax")
    ax.legend(fontsize=7)
    for ax, stat, title in ((axes[1], "norm_entropy", "entropy / log(candidates)"),
                            (axes[2], "top1", "top-1 mass (dashed: top 4)")):
        for a, color in (("bsbr", "tab:blue"), ("standard", "tab:orange")):
            rows = [res["concentration"][a].get(str(n), {}).get("mean") for n in ns]
            xs = [n for n, r in zip(ns, rows) if r]
            ax.plot(xs, [r[stat] for r in rows if r], "o-", color=color,
                    label="bsbr retrieval a_{c,j}" if a == "bsbr" else "standard, mass per key chunk")
            if stat == "top1":
                ax.plot(xs, [r["top4"] for r in rows if r], "o--", color=color)
        uni = [res["concentration"]["bsbr"].get(str(n), {}).get("uniform") for n in ns]
        ax.plot([n for n, u in zip(ns, uni) if u], [u[stat] for u in uni if u], "k:", label="uniform")
        if stat == "top1":
            ax.plot([n for n, u in zip(ns, uni) if u], [u["top4"] for u in uni if u], "k:")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("document length n (tokens)")
        ax.set_title(title + " over earlier chunks")
        ax.legend(fontsize=7)
    if rec:
        ax = axes[3]
        for a, rows in rec.items():
            rn = [int(n) for n in rows]
            for li in range(len(next(iter(rows.values()))["pair_chunk_mass"])):
                ax.plot(rn, [sum(rows[str(n)]["pair_chunk_mass"][li]) / len(rows[str(n)]["pair_chunk_mass"][li])
                             for n in rn], "o-" if a == "bsbr" else "s--", label=f"{a} layer {li}")
            ax.plot(rn, [1 / rows[str(n)]["candidates"] for n in rn], "k:", label="uniform" if a == "bsbr" else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title("recall: last chunk's mass on the pair's chunk")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(record: dict) -> str:
    r, s = record["results"], record["settings"]
    ns = list(r["pairs"])
    B = r["chunk_size"]["bsbr"]
    docs = {n: len(p) for n, p in r["documents"].items()}
    lines = [
        f"**What was run.** Data: {r['data']}; models `{s['model_dirs']['bsbr']}` and `{s['model_dirs']['standard']}`"
        + (" (replaced by random-weight models)" if s.get("random_model") else "")
        + f", chunk size B = {B}. At each length n, documents with at least n tokens, cut to their first n "
        f"(documents per length: {', '.join(f'{n}: {k}' for n, k in docs.items())}). "
        "Pairs: a causal pair is (query t, key s <= t); the pairs each layer scores with a token-level softmax are "
        "recorded from the layer's own softmax calls (queries and keys tagged with their positions), over every "
        "layer, and counted within t's chunk, in earlier chunks, and overall. Concentration: BSBR's retrieval "
        "softmax a_{c,j} over earlier chunks j < c (recomputed by the layer's own functions), and standard's "
        "softmax summed per key chunk (the mean over query chunk c's tokens, renormalised over j < c); averaged "
        "over documents, layers, heads and the query chunks with at least 2 candidates (c >= 2). `uniform` is a "
        "uniform distribution over the same candidates.",
        "",
        "**The page's claim** (fraction of pairs not scored): within chunk 0.0, between chunks 0.85, overall 0.65.",
        "",
        "**Measured: fraction of causal pairs not scored.**",
        "",
        "| n | bsbr within | bsbr between | bsbr overall | closed form | standard overall | "
        "scored pairs bsbr / standard |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in ns:
        p = r["pairs"][n]
        lines.append(f"| {n} | {p['bsbr']['within']:.3f} | {p['bsbr']['between']:.3f} | {p['bsbr']['overall']:.4f} | "
                     f"{p['expected_bsbr_overall']:.4f} | {p['standard']['overall']:.3f} | "
                     f"{p['bsbr']['scored_pairs'] / p['standard']['scored_pairs']:.3f} |")
    lines += ["", "**Measured: concentration over earlier chunks** (mean over layers and heads).", "",
              "| n | candidates | model | entropy (nats) | entropy / log(cand.) | top-1 mass | top-4 mass |",
              "|---:|---|---|---:|---:|---:|---:|"]
    for n in ns:
        ca = r["concentration"]["bsbr"].get(n, {})
        if not ca.get("query_chunks"):
            continue
        C = -(-int(n) // B)
        cands = f"2-{C - 1}" if C > 3 else "2"
        for name, row in (("bsbr a_{c,j}", ca["mean"]), ("standard per chunk",
                                                         r["concentration"]["standard"][n].get("mean")),
                          ("uniform", ca["uniform"])):
            if row:
                lines.append(f"| {n} | {cands} | {name} | {row['entropy']:.3f} | {row['norm_entropy']:.3f} | "
                             f"{row['top1']:.3f} | {row['top4']:.3f} |")
    longest = next((n for n in reversed(ns) if r["concentration"]["bsbr"].get(n, {}).get("query_chunks")), None)
    if longest:
        lines += ["", f"Per layer and head at n = {longest} (top-1 mass; normalised entropy in brackets):", "",
                  "| model | " + " | ".join(f"L{li} H{h}" for li, row in enumerate(
                      r["concentration"]["bsbr"][longest]["per_layer_head"]["top1"]) for h in range(len(row))) + " |",
                  "|---|" + "---:|" * sum(len(row) for row in
                                          r["concentration"]["bsbr"][longest]["per_layer_head"]["top1"])]
        for a in ARCHS:
            ph = r["concentration"][a][longest]["per_layer_head"]
            cells = [f"{t:.2f} ({e:.2f})" for tr, er in zip(ph["top1"], ph["norm_entropy"]) for t, e in zip(tr, er)]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        if "earlier_mass" in r["concentration"]["standard"][longest].get("mean", {}):
            em = r["concentration"]["standard"][longest]["mean"]["earlier_mass"]
            lines.append(f"\nStandard puts {em:.2f} of its attention (mean over layers, heads and query chunks c >= 2) "
                         f"on earlier chunks at n = {longest}.")
    if "recall" in r:
        lines += ["", "**Recall task checkpoints** (experiments/checkpoints/long_range; the queried pair sits in "
                  "chunk 0, the answer is read at the last token): the last chunk's distribution over earlier "
                  "chunks, its mass on the pair's chunk and how often that chunk is the top one, per layer "
                  "(mean over heads), and the model's accuracy on these sequences.", "",
                  "| model | n | sequences | accuracy | pair-chunk mass (L0, L1, ...) | top-1 is the pair's chunk | "
                  "uniform mass | top-1 mass (all chunks c >= 2) |",
                  "|---|---:|---:|---:|---|---|---:|---:|"]
        for a, rows in r["recall"].items():
            for n, row in rows.items():
                pm = ", ".join(f"{sum(x) / len(x):.3f}" for x in row["pair_chunk_mass"])
                tp = ", ".join(f"{sum(x) / len(x):.2f}" for x in row["top1_is_pair_chunk"])
                lines.append(f"| {a} | {n} | {row['sequences']} | {row['accuracy']:.2f} | {pm} | {tp} | "
                             f"{1 / row['candidates']:.4f} | {row['mean']['top1']:.3f} |")
    lines += ["", "![sparsity](../experiments/results/sparsity.png)", "", "**Does the claim hold here?** " + verdict(r)]
    return "\n".join(lines) + "\n"


def verdict(r: dict) -> str:
    ns = list(r["pairs"])
    b = [r["pairs"][n]["bsbr"] for n in ns]
    B = r["chunk_size"]["bsbr"]
    claim = CLAIMS["fraction_not_scored"]
    out = []
    within = max(x["within"] for x in b)
    between = min(x["between"] for x in b)
    ov = [x["overall"] for x in b]
    gap = max(abs(r["pairs"][n]["bsbr"]["overall"] - r["pairs"][n]["expected_bsbr_overall"]) for n in ns)
    # The length at which 1 - (B+1)/(n+1), the fraction for whole chunks, equals the page's overall figure.
    n_claim = (B + 1) / (1 - claim["overall"]) - 1
    out.append(
        f"Within chunks BSBR scores every causal pair (largest fraction not scored {within:.3f}; the page: "
        f"{claim['within']}). Between chunks it scores none at the token level (smallest fraction not scored "
        f"{between:.3f}; the page: {claim['between']}): such a pair is reached only through the chunk states. "
        f"Overall the fraction not scored grows with n, {ov[0]:.3f} at {ns[0]} tokens to {ov[-1]:.3f} at {ns[-1]} "
        f"(the closed form for scoring exactly the within-chunk pairs, matched to {gap:.1e}); the page's "
        f"{claim['overall']} is one point on that curve, near n = {n_claim:.0f} for B = {B}. "
        f"Standard scores every causal pair (largest fraction not scored "
        f"{max(r['pairs'][n]['standard']['overall'] for n in ns):.3f}).")
    measured = {"within": [x["within"] for x in b], "between": [x["between"] for x in b], "overall": ov}
    held = [k for k, v in measured.items() if all(abs(m - claim[k]) <= 0.02 for m in v)]
    missed = [k for k in measured if k not in held]
    out.append(f"So the page's figure holds here for: {', '.join(held) or 'none'}; it does not for: "
               f"{', '.join(missed) or 'none'} (holding: within 0.02 of it at every length measured).")
    cb, cs = r["concentration"]["bsbr"], r["concentration"]["standard"]
    rows = [(n, cb[n]["mean"], cs[n].get("mean"), cb[n]["uniform"]) for n in ns if cb.get(n, {}).get("query_chunks")]
    if rows:
        diffs = [ms["norm_entropy"] - mb["norm_entropy"] for _, mb, ms, _ in rows if ms]
        if diffs:
            out.append(f"BSBR's retrieval has a lower normalised entropy than standard's per-chunk attention (by more "
                       f"than 0.02) at {sum(d > 0.02 for d in diffs)} of {len(diffs)} lengths, a higher one at "
                       f"{sum(d < -0.02 for d in diffs)}, and within 0.02 at {sum(abs(d) <= 0.02 for d in diffs)}.")
        n, mb, ms, u = rows[-1]
        diff = ms["norm_entropy"] - mb["norm_entropy"] if ms else 0.0
        sharper = "about as" if abs(diff) < 0.02 else ("more" if diff > 0 else "less")
        out.append(
            f"At {n} tokens BSBR's retrieval puts {mb['top1']:.2f} of its mass on the top chunk and {mb['top4']:.2f} on "
            f"the top 4 (uniform: {u['top1']:.2f} / {u['top4']:.2f}; normalised entropy {mb['norm_entropy']:.2f})"
            + (f", against standard's {ms['top1']:.2f} / {ms['top4']:.2f} (normalised entropy {ms['norm_entropy']:.2f})"
               f": BSBR's retrieval is {sharper} concentrated {'as' if sharper == 'about as' else 'than'} standard's attention "
               "aggregated per chunk." if ms else "."))
        L = len(cb[n]["per_layer_head"]["norm_entropy"])
        per_layer = [sum(row) / len(row) for row in cb[n]["per_layer_head"]["norm_entropy"]]
        out.append("By layer, BSBR's normalised entropy at that length is "
                   + ", ".join(f"{per_layer[li]:.2f} (layer {li})" for li in range(L)) + ".")
    rec = r.get("recall", {})
    if "bsbr" in rec:
        lo = {a: min(max(sum(x) / len(x) for x in row["pair_chunk_mass"]) for row in rows.values())
              for a, rows in rec.items()}
        longest = list(rec["bsbr"])[-1]
        out.append(
            f"On the recall task, where the answer needs one chunk, BSBR's best layer puts at least {lo['bsbr']:.2f} "
            f"of the last chunk's retrieval on the queried pair's chunk at every length (uniform at {longest} tokens: "
            f"{1 / rec['bsbr'][longest]['candidates']:.4f})"
            + (f"; standard's best layer, aggregated per chunk, at least {lo['standard']:.2f}." if "standard" in lo
               else "."))
    return " ".join(out)
