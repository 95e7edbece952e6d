"""Export a DocumentClassifier to two ONNX graphs and a manifest.

    <out_dir>/encoder.onnx   whole chunks of a piece + the carried state -> hidden states + new state parts
    <out_dir>/forward.onnx   input_ids, attention_mask (batch, length) int64 -> logits (batch, num_labels)
    <out_dir>/onnx.json      format, opset, graph files and I/O, config, fingerprint, weights digest

Exporter: torch.export (non-strict, dynamic shapes) + torch.onnx's dynamo
translation. The TorchScript exporter is deprecated since torch
2.9 and traces Python loops and size branches into constants; scripting
the loops instead would fork the model code. torch.export keeps batch, piece
length and history length symbolic, and its `scan` higher-order op becomes
ONNX Scan, which carries the two loops that cannot be unrolled (graphs.py).

Opset: 23 where the installed ONNX Runtime has kernels for its Attention op
on every provider it offers (CPU from 1.23; CUDA assumed from 1.26), since
SDPA then becomes one fused op instead of MatMul/Softmax/MatMul (1.4x faster
for standard and bsbr at 8K tokens on CPU); else 18. The manifest records
it, and a cache exported for another opset counts as stale.

Only the encoder is traced; forward.onnx is that graph wrapped in a few
ONNX nodes: truncate to max_length, pad to whole chunks, start from an empty
state, masked mean pooling and the linear head. One trace per model instead
of two (tracing is most of the export time), and the two graphs cannot
drift apart.

The manifest is written last and holds each graph's sha256, so a reader never
trusts a half-written or foreign graph; `check_manifest` says why a cache is
stale (another checkpoint, another config, another export format, a changed file).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from bsbr_core.attention import mechanism
from bsbr_core.config import ModelConfig
from bsbr_core.model import weights_digest
from bsbr_core.onnx.graphs import SegmentEncoder

# Bumped whenever the graphs' formulation or I/O changes, so old caches re-export.
EXPORT_FORMAT = 2  # 2: the graphs run the ops of bsbr_core.ops (delta_net: one matmul a chunk in its Scan)
FORWARD_FILE, ENCODER_FILE, MANIFEST_FILE = "forward.onnx", "encoder.onnx", "onnx.json"
FORWARD_IO = (["input_ids", "attention_mask"], ["logits"])


def default_opset() -> int:
    """23 where the installed ONNX Runtime runs the Attention op on each of its providers, else 18."""
    try:
        import onnxruntime as ort
    except ImportError:
        return 18
    version = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
    # CPU kernel: ORT 1.23. CUDA kernel: merged in 2026-03 (onnxruntime#27542); before
    # it, Attention nodes of a CUDA session silently ran on the CPU.
    needed = (1, 26) if "CUDAExecutionProvider" in ort.get_available_providers() else (1, 23)
    return 23 if version >= needed else 18


class StaleGraphError(RuntimeError):
    """ONNX graphs are missing, corrupt, or were exported from another checkpoint."""


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encoder_io(cfg: ModelConfig) -> tuple[list[str], list[str]]:
    """Input and output names of encoder.onnx, in order."""
    spec = mechanism(cfg.arch)
    inputs = ["input_ids", "attention_mask", "position", *spec.export_inputs]
    outputs = ["hidden"]
    for i in range(cfg.num_layers):
        for name, _kind, _shape in spec.state_layout(cfg):
            inputs.append(f"layers.{i}.{name}")
            outputs.append(f"layers.{i}.{name}.new")
    return inputs, outputs


# --- encoder.onnx: traced ----------------------------------------------------------

def _encoder_example(cfg: ModelConfig):
    """Example inputs and dynamic shapes of encoder.onnx. Example sizes are
    distinct and >= 2 so that export neither specialises nor ties them."""
    Dim = torch.export.Dim
    spec = mechanism(cfg.arch)
    B = cfg.block_size
    batch, chunks = Dim("batch", min=1), Dim("chunks", min=1)
    history = Dim("history", min=0)  # the length of the "log" entries (the mechanism's unit)
    piece = B * chunks
    b, C = 2, 3
    hist = spec.export_history(cfg)
    args = [torch.randint(0, cfg.vocab_size, (b, C * B)), torch.ones(b, C * B, dtype=torch.int64),
            torch.tensor(7 * B, dtype=torch.int64)]
    dyn = [{0: batch, 1: piece}, {0: batch, 1: piece}, None]
    for value in spec.export_examples(cfg, C * B):  # the mechanism's scalar inputs
        args.append(torch.tensor(value, dtype=torch.int64))
        dyn.append(None)
    for _ in range(cfg.num_layers):
        for _name, kind, shape in spec.state_layout(cfg):
            args.append(torch.randn(b, *[hist if s == -1 else s for s in shape]) * 0.1)
            dyn.append({0: batch, 2: history} if kind == "log" else {0: batch})
    # forward(input_ids, attention_mask, position, *rest): export sees *rest as one tuple argument.
    return tuple(args), (*dyn[:3], tuple(dyn[3:]))


def _trace_encoder(model, path: Path, opset: int) -> None:
    """torch.export (non-strict) with our dynamic shapes, then ONNX translation.

    torch.export is called here rather than through torch.onnx.export, which on
    a constraint error would retry with shapes "refined" from the error's
    suggestions, i.e. silently specialised; here such an error is an error.
    Size-oblivious tracing keeps 0/1 sizes (an empty history) general.
    """
    cfg = model.config
    args, dyn = _encoder_example(cfg)
    names_in, names_out = encoder_io(cfg)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            program = torch.export.export(SegmentEncoder(model).eval(), args, dynamic_shapes=dyn, strict=False)
        onnx_program = torch.onnx.export(
            program, args, dynamo=True, dynamic_shapes=dyn, opset_version=opset, input_names=names_in, output_names=names_out,
            external_data=False, optimize=True, verbose=False,
        )
    onnx_program.save(str(path), external_data=False)


# --- forward.onnx: the encoder graph wrapped in ONNX nodes -------------------------------

def _rename_uses(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename value uses in graph's nodes and in their subgraphs (Scan bodies see outer values)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_uses(attr.g, mapping)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename_uses(g, mapping)


def _used_names(node: onnx.NodeProto) -> set[str]:
    """Inputs of a node, including outer-scope values its subgraphs read."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {v.name for v in g.input} | {t.name for t in g.initializer}
            for sub in g.node:
                inner |= set(sub.output)
            for sub in g.node:
                names |= _used_names(sub) - inner
    return names


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if needed & set(node.output):
            keep.append(node)
            needed |= _used_names(node)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    vinfo = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(vinfo)


def compose_forward(encoder: onnx.ModelProto, cfg: ModelConfig, head_weight: np.ndarray, head_bias: np.ndarray) -> onnx.ModelProto:
    """forward.onnx from encoder.onnx: (input_ids, attention_mask) of any length -> logits.

    An empty input (length 0) becomes one chunk of padding, so the encoder's
    Scan loops never run zero times (ONNX Runtime rejects that) and the
    logits are the head's bias, as in torch.
    """
    m = onnx.ModelProto()
    m.CopyFrom(encoder)
    g = m.graph
    enc_in, enc_out = encoder_io(cfg)
    p = "oneshot/"
    B = cfg.block_size
    c = lambda name, arr: numpy_helper.from_array(np.asarray(arr), p + name)
    inits = [c("B", np.array([B], np.int64)), c("B_minus_1", np.array([B - 1], np.int64)),
             c("one", np.array([1], np.int64)), c("zeros3", np.zeros(3, np.int64)),
             c("zero", np.array(0, np.int64)), c("fone", np.array(1.0, np.float32)),
             c("axis1", np.array([1], np.int64)), c("axis_last", np.array([-1], np.int64)),
             c("head_weight", head_weight.astype(np.float32)), c("head_bias", head_bias.astype(np.float32))]
    nodes = []
    ids, mask = "input_ids", "attention_mask"
    if cfg.max_length is not None:
        inits += [c("starts", np.array([0], np.int64)), c("ends", np.array([cfg.max_length], np.int64))]
        nodes += [helper.make_node("Slice", [ids, p + "starts", p + "ends", p + "axis1"], [p + "ids_cut"]),
                  helper.make_node("Slice", [mask, p + "starts", p + "ends", p + "axis1"], [p + "mask_cut"])]
        ids, mask = p + "ids_cut", p + "mask_cut"
    nodes += [
        helper.make_node("Shape", [ids], [p + "batch"], start=0, end=1),
        helper.make_node("Shape", [ids], [p + "length"], start=1, end=2),
        # chunks = max(ceil(length / B), 1); pad = chunks * B - length
        helper.make_node("Add", [p + "length", p + "B_minus_1"], [p + "len_up"]),
        helper.make_node("Div", [p + "len_up", p + "B"], [p + "chunks0"]),
        helper.make_node("Max", [p + "chunks0", p + "one"], [p + "chunks"]),
        helper.make_node("Mul", [p + "chunks", p + "B"], [p + "padded"]),
        helper.make_node("Sub", [p + "padded", p + "length"], [p + "pad"]),
        helper.make_node("Concat", [p + "zeros3", p + "pad"], [p + "pads"], axis=0),
        helper.make_node("Pad", [ids, p + "pads", p + "zero"], [p + "ids_padded"]),
        helper.make_node("Pad", [mask, p + "pads", p + "zero"], [p + "mask_padded"]),
    ]
    spec = mechanism(cfg.arch)
    # A one-shot read starts from an empty state: every extra scalar input is 0.
    feeds = {"input_ids": p + "ids_padded", "attention_mask": p + "mask_padded", "position": p + "zero",
             **{name: p + "zero" for name in spec.export_inputs}}
    for i in range(cfg.num_layers):
        for name, _kind, shape in spec.state_layout(cfg):
            dims = np.array([0 if s == -1 else s for s in shape], np.int64)
            key = f"layers.{i}.{name}"
            inits.append(c(f"{key}.dims", dims))
            nodes += [helper.make_node("Concat", [p + "batch", p + f"{key}.dims"], [p + f"{key}.shape"], axis=0),
                      helper.make_node("ConstantOfShape", [p + f"{key}.shape"], [p + f"{key}.empty"],
                                       value=numpy_helper.from_array(np.zeros(1, np.float32)))]
            feeds[key] = p + f"{key}.empty"
    assert set(feeds) == set(enc_in)
    _rename_uses(g, feeds)
    hidden = enc_out[0]
    tail = [
        helper.make_node("Cast", [p + "mask_padded"], [p + "weights"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [p + "weights", p + "axis_last"], [p + "weights3"]),
        helper.make_node("Mul", [hidden, p + "weights3"], [p + "weighted"]),
        helper.make_node("ReduceSum", [p + "weighted", p + "axis1"], [p + "pooled_sum"], keepdims=0),
        helper.make_node("ReduceSum", [p + "weights", p + "axis1"], [p + "count0"], keepdims=1),
        helper.make_node("Max", [p + "count0", p + "fone"], [p + "count"]),
        helper.make_node("Div", [p + "pooled_sum", p + "count"], [p + "pooled"]),
        helper.make_node("Gemm", [p + "pooled", p + "head_weight", p + "head_bias"], ["logits"], transB=1),
    ]
    body = list(g.node)
    del g.node[:]
    g.node.extend(nodes + body + tail)
    g.initializer.extend(inits)
    del g.input[:]
    g.input.extend([helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "length"]),
                    helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "length"])])
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cfg.num_labels])])
    g.name = "bsbr_forward"
    _prune(g)
    onnx.checker.check_model(m)
    return m


# --- the whole export --------------------------------------------------------------------

def export_onnx(model, out_dir: str | Path, weights_sha256: str | None = None, opset: int | None = None) -> dict:
    """Write encoder.onnx, forward.onnx and onnx.json for `model` into out_dir.

    model: a DocumentClassifier (its weights are read, not changed).
    weights_sha256: the checkpoint's `weights_digest`; computed from the
        model's state_dict when not given.
    opset: 18 or 23; default_opset() when not given.
    Returns the manifest. Files are written under temporary names and renamed
    into place, the manifest last, so concurrent readers and writers are safe.
    """
    cfg: ModelConfig = model.config
    if cfg.pooling != "mean":
        raise ValueError(f"the ONNX backend exports mean pooling only (this model pools by {cfg.pooling})")
    opset = default_opset() if opset is None else opset
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        digest = weights_sha256 or weights_digest(model.state_dict())
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
            tmp = Path(tmp)
            _trace_encoder(model, tmp / ENCODER_FILE, opset)
            forward = compose_forward(onnx.load(str(tmp / ENCODER_FILE)), cfg,
                                      model.head.weight.detach().cpu().numpy(), model.head.bias.detach().cpu().numpy())
            onnx.save(forward, str(tmp / FORWARD_FILE))
            graphs = {}
            for key, file, (names_in, names_out) in (("encoder", ENCODER_FILE, encoder_io(cfg)),
                                                     ("forward", FORWARD_FILE, FORWARD_IO)):
                graphs[key] = {"file": file, "sha256": _file_sha256(tmp / file), "inputs": names_in, "outputs": names_out}
            manifest = {
                "format": EXPORT_FORMAT,
                "opset": opset,
                "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}, onnx {onnx.__version__}",
                "arch": cfg.arch,
                "fingerprint": model.fingerprint,
                "weights_sha256": digest,
                "config": cfg.to_dict(),
                "block_size": cfg.block_size,
                "state_layout": [[name, kind] for name, kind, _ in mechanism(cfg.arch).state_layout(cfg)],
                "graphs": graphs,
            }
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            for file in (ENCODER_FILE, FORWARD_FILE, MANIFEST_FILE):
                os.replace(tmp / file, out_dir / file)
        return manifest
    finally:
        model.train(was_training)


def read_manifest(onnx_dir: str | Path) -> dict:
    path = Path(onnx_dir) / MANIFEST_FILE
    if not path.is_file():
        raise StaleGraphError(f"{path} not found: no exported graphs there")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise StaleGraphError(f"{path} is not valid JSON: {e}") from e


def check_manifest(onnx_dir: str | Path, cfg: ModelConfig, fingerprint: str,
                   weights_sha256: str | None, opset: int | None = None, verify_files: bool = True) -> dict:
    """The manifest of onnx_dir if its graphs belong to this checkpoint (and, if
    given, were exported for this opset), else StaleGraphError."""
    onnx_dir = Path(onnx_dir)
    m = read_manifest(onnx_dir)
    if m.get("format") != EXPORT_FORMAT:
        raise StaleGraphError(f"{onnx_dir}: export format {m.get('format')} != {EXPORT_FORMAT} (exported by another version)")
    if opset is not None and m.get("opset") != opset:
        raise StaleGraphError(f"{onnx_dir}: graphs use opset {m.get('opset')}, this ONNX Runtime wants {opset}")
    if m.get("config") != cfg.to_dict():
        raise StaleGraphError(f"{onnx_dir}: graphs were exported for another config")
    if weights_sha256 is not None and m.get("weights_sha256") != weights_sha256:
        raise StaleGraphError(f"{onnx_dir}: graphs were exported from other weights (the checkpoint changed since)")
    # The fingerprint names config and weights together (so it follows from the two
    # checks above); it also changes with the fingerprint scheme itself.
    if m.get("fingerprint") != fingerprint:
        raise StaleGraphError(f"{onnx_dir}: graphs carry another model fingerprint "
                              f"({m.get('fingerprint')}, this model {fingerprint})")
    for key, (names_in, names_out) in (("encoder", encoder_io(cfg)), ("forward", FORWARD_IO)):
        g = m.get("graphs", {}).get(key)
        if g is None or g.get("inputs") != names_in or g.get("outputs") != names_out:
            raise StaleGraphError(f"{onnx_dir}: the {key} graph's inputs/outputs do not match this model")
        path = onnx_dir / g["file"]
        if not path.is_file():
            raise StaleGraphError(f"{path} is missing")
        if verify_files and _file_sha256(path) != g["sha256"]:
            raise StaleGraphError(f"{path} does not match its sha256 in {MANIFEST_FILE} (changed or corrupt)")
    return m
