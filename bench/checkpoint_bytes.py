"""A session page's checkpoint bytes: State.to_bytes's own safetensors writer against safetensors.torch.save.

The shipped bsbr model reads 3 pages of 512 random tokens; the checkpoint is
the delta of the third page against the second (what a session page commits,
about 136 KB). Both writers serialise the same tensors (the delta's narrowed
append logs and small tensors) with the same metadata and hash, in
`--rounds` interleaved rounds of `--calls` calls each; the medians are
reported per round and their ratio. The payloads are checked to read back the
same tensors.

    python bench/checkpoint_bytes.py     # writes bench/results/checkpoint_bytes.json

The JSON records the load average before and after.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint_bytes.json"))
    a = p.parse_args()
    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from bsbr_core import load_model
    from bsbr_core.state import AppendLog, _safetensors_parts
    from serve_latency import git_revision, machine

    load_before = list(os.getloadavg())
    model, _ = load_model(ROOT / "models" / "bsbr")
    torch.manual_seed(0)
    state = base = model.init_state(1)
    with torch.no_grad():
        for _ in range(3):
            base, (_, state) = state, model.step(torch.randint(0, model.config.vocab_size, (1, 512)), state)
    logs = base._log_lengths()

    def delta_tensors() -> dict:
        out = state.tensors()
        for i, layer in enumerate(state.layers):
            for name, v in layer.items():
                key = f"layers.{i}.{name}"
                if isinstance(v, AppendLog) and key in out:
                    start = logs.get(key, 0)
                    out[key] = out[key].narrow(v.dim, start, v.length - start)
        return out

    meta = {"bsbr_state": json.dumps({"bench": True})}

    def with_safetensors() -> bytes:
        payload = st_save({k: v.detach().to("cpu").contiguous() for k, v in delta_tensors().items()}, metadata=meta)
        return hashlib.sha256(payload).digest() + payload

    def own_writer() -> bytes:
        parts = _safetensors_parts(delta_tensors(), meta)
        h = hashlib.sha256()
        for part in parts:
            h.update(part)
        return b"".join([h.digest(), *parts])

    a_blob, b_blob = with_safetensors(), own_writer()
    x, y = st_load(a_blob[32:]), st_load(b_blob[32:])
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    rounds = []
    for _ in range(a.rounds):
        row = {}
        for name, fn in (("safetensors_save_ms", with_safetensors), ("own_writer_ms", own_writer)):
            times = []
            for _ in range(a.calls):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
            row[name] = statistics.median(times)
        row["own_over_safetensors"] = row["own_writer_ms"] / row["safetensors_save_ms"]
        rounds.append(row)
        print(f"safetensors.save {row['safetensors_save_ms']:.3f} ms, own writer {row['own_writer_ms']:.3f} ms "
              f"({row['own_over_safetensors']:.2f}x)", flush=True)
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "machine": machine(), "code": git_revision(),
           "loadavg": {"before": load_before, "after": list(os.getloadavg())}, "blob_bytes": len(b_blob),
           "calls_per_round": a.calls, "rounds": rounds,
           "median": {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
