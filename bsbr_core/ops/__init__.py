"""The math of every attention mechanism, defined once (the flash-linear-attention layout).

One module per mechanism (`bsbr`, `standard`, `linear`, `sliding_window`,
`delta_net`), each with public, documented functions:
- `chunkwise(...)`: the parallel form over whole chunks of a piece, given
  the carried state as plain tensors. The ONNX graph (bsbr_core.onnx.graphs)
  runs it; where export needs another formulation (ONNX Scan for a loop,
  forward substitution for a triangular solve), it is a strategy argument
  of this function that the tests check against `naive` too.
- `streaming(...)`: a piece of any length with the carried state in the
  torch layout (dicts of tensors and AppendLogs); pads to whole chunks and
  runs the same pieces as `chunkwise`. The torch layer
  (bsbr_core.attention.<mech>) runs it.
- `naive(...)`: the obviously-correct slow loop, entered with the same
  carried state; the tests' reference.
- `state_layout(cfg)`: what the mechanism carries per layer, as
  `StateEntry(name, kind, shape)` ("log", "tensor" or "window"); the torch
  layer declares it (`Attention.state_layout`) and the export, the ONNX
  runtime and the state checks read it from the registry
  (bsbr_core.attention.MECHANISMS).

The functions take tensors and plain arguments, not torch modules: the
layer passes its weights (e.g. `bsbr.Params`) and its `sdpa`.
"""
from bsbr_core.ops import bsbr, delta_net, linear, sliding_window, standard
from bsbr_core.ops.common import StateEntry

__all__ = ["StateEntry", "bsbr", "delta_net", "linear", "sliding_window", "standard"]
