"""ONNX Runtime backend: export a classifier's graphs and run them behind the
backend interface of bsbr_core.backends (see export.py, graphs.py, runtime.py).

    from bsbr_core.backends import load_backend
    model = load_backend("onnx", "models/bsbr")   # exports into models/bsbr/onnx/ if needed
    logits = model(input_ids, attention_mask)
    logits, state = model.step(piece_ids, model.init_state(1))

`load_onnx_model(dir, providers=...)` is the same with ONNX Runtime's own
options. Needs the `cpu` extra (onnxruntime) or, on CUDA machines, the `gpu`
extra (onnxruntime-gpu), plus onnx and onnxscript for exporting.
"""
from bsbr_core.onnx.export import StaleGraphError, export_onnx, weights_digest
from bsbr_core.onnx.runtime import (
    OrtClassifier, OrtEncoder, default_providers, load_onnx_backend, load_onnx_model, providers_for,
)

__all__ = ["OrtClassifier", "OrtEncoder", "StaleGraphError", "default_providers", "export_onnx",
           "load_onnx_backend", "load_onnx_model", "providers_for", "weights_digest"]
