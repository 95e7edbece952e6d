"""Export (or check) a checkpoint's ONNX graphs ahead of serving, e.g. in a Docker build:

    python -m bsbr_core.onnx models/bsbr models/standard [--cache-dir DIR] [--check]

Without --check, graphs that are missing or stale are exported; with it,
nothing is written and the exit status says whether every cache is current.
"""
from __future__ import annotations

import argparse
import sys

from bsbr_core.onnx.runtime import StaleGraphError, load_onnx_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bsbr_core.onnx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dirs", nargs="+", help="checkpoint directories (config.json + model.safetensors)")
    ap.add_argument("--cache-dir", help="where the graphs go (default: <model_dir>/onnx)")
    ap.add_argument("--check", action="store_true", help="only check that current graphs exist")
    args = ap.parse_args(argv)
    if args.cache_dir and len(args.model_dirs) > 1:
        ap.error("--cache-dir takes one model directory")
    status = 0
    for model_dir in args.model_dirs:
        try:
            model = load_onnx_model(model_dir, providers=["CPUExecutionProvider"], export_if_missing=not args.check,
                                    cache_dir=args.cache_dir)
        except StaleGraphError as e:
            print(f"{model_dir}: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"{model_dir}: {model.onnx_dir} (opset {model.manifest['opset']}, {model.config.arch})")
    return status


if __name__ == "__main__":
    sys.exit(main())
