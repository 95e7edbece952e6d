"""How much slower the model reads beside an idle server: the in-process
reference of bench/serve_latency.py against the same read with `bsbr-serve up`
running and taking no requests.

In this process, the shipped bsbr model reads a 100-page (51,200-token)
document one-shot in 4096-token steps (`model.step`, as a one-shot classify
does), `--repeats` times: first alone, then while `bsbr-serve up` (what
`make up` runs, every model under models/, on free ports) is up and idle,
then alone again. It also reads the CPU time every process of the machine
used over `--idle-s` seconds of that idle server (/proc/<pid>/stat), as a
share of the machine's cores.

    python bench/cluster_noise.py          # writes bench/results/cluster_noise.json

The JSON records the load average before and after.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def reads(model, x, repeats: int) -> list[float]:
    import torch

    out = []
    with torch.inference_mode():
        model.step(x[:, :4096], model.init_state(1))  # warm
        for _ in range(repeats):
            state, t0 = model.init_state(1), time.perf_counter()
            for lo in range(0, x.shape[1], 4096):
                _, state = model.step(x[:, lo : lo + 4096], state)
            out.append((time.perf_counter() - t0) * 1000)
    return out


def machine_cpu_ms(seconds: float) -> float:
    """CPU ms all processes used over `seconds` (utime + stime of each, from /proc)."""
    hz = os.sysconf("SC_CLK_TCK")

    def snap() -> dict[str, int]:
        out = {}
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                out[p] = int(f[11]) + int(f[12])
        return out

    a = snap()
    time.sleep(seconds)
    b = snap()
    return sum(b[p] - a[p] for p in b if p in a) * 1000 / hz


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--idle-s", type=float, default=10.0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster_noise.json"))
    a = p.parse_args()
    import torch
    from serve_latency import bsbr_serve_up, machine, make_text, write_result
    from tokenizers import Tokenizer

    from bsbr_core.backends import load_backend

    models = Path(a.models_dir)
    tok = Tokenizer.from_file(str(models / "bsbr" / "tokenizer.json"))
    ids = tok.encode(make_text(tok, 51200, seed=1), add_special_tokens=False).ids[:51200]
    x = torch.tensor([ids])
    threads = os.cpu_count() or 2
    model = load_backend("torch", str(models / "bsbr"), device="cpu", threads=threads)
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "machine": machine(),
           "torch_threads": threads, "tokens": len(ids), "loadavg": {"before": list(os.getloadavg())}}
    out["alone_ms"] = reads(model, x, a.repeats)
    with bsbr_serve_up(models, ready_s=300):
        time.sleep(10)  # past its start-up work
        idle_ms = machine_cpu_ms(a.idle_s)
        out["idle_server"] = {"cpu_ms": idle_ms, "seconds": a.idle_s,
                              "share_of_cores": idle_ms / (a.idle_s * 1000 * (os.cpu_count() or 1))}
        out["beside_idle_server_ms"] = reads(model, x, a.repeats)
    time.sleep(10)
    out["alone_after_ms"] = reads(model, x, a.repeats)
    med = {k: sorted(out[k])[len(out[k]) // 2] for k in ("alone_ms", "beside_idle_server_ms", "alone_after_ms")}
    out["median_ms"] = med
    out["beside_over_alone"] = med["beside_idle_server_ms"] / min(med["alone_ms"], med["alone_after_ms"])
    print(f"100-page one-shot, median ms: alone {med['alone_ms']:.0f}, beside an idle server "
          f"{med['beside_idle_server_ms']:.0f}, alone after {med['alone_after_ms']:.0f} "
          f"({out['beside_over_alone']:.2f}x); the idle server took {out['idle_server']['share_of_cores']:.1%} "
          f"of the cores")
    write_result(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
