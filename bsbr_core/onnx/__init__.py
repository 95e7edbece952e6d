"""ONNX Runtime backend: export a classifier's graphs and run them behind the
DocumentClassifier interface (see export.py, graphs.py, runtime.py).

    from bsbr_core.onnx import load_onnx_model
    model = load_onnx_model("models/bsbr")        # exports into models/bsbr/onnx/ if needed
    logits = model(input_ids, attention_mask)
    logits, state = model.step(piece_ids, model.init_state(1))

Needs the `cpu` extra (onnxruntime) or, on CUDA machines, the `gpu` extra
(onnxruntime-gpu), plus onnx and onnxscript for exporting.
"""
from bsbr_core.onnx.export import StaleGraphError, export_onnx, weights_digest
from bsbr_core.onnx.runtime import OrtClassifier, OrtEncoder, default_providers, load_onnx_model

__all__ = ["OrtClassifier", "OrtEncoder", "StaleGraphError", "default_providers", "export_onnx",
           "load_onnx_model", "weights_digest"]
