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
    python bench/cluster_noise.py --variants default,calm --rounds 2 \
        --out bench/results/cluster_noise_calm.json

`--variants` serves the idle server once per variant of SERVER_VARIANTS (an
environment `bsbr-serve up` starts with, over its own defaults), in
`--rounds` interleaved rounds, with a read alone before each round and after
the last, so a slow spell of this VM falls on every variant:
`beside_over_alone` per variant is the median of its reads beside the server
over the median of all the reads alone.

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


# Environments for the idle server (--variants): `calm` wakes Serve's controller
# every 0.5 s instead of 0.1 s and exports the replicas' cached metrics every
# 1 s instead of 0.1 s.
SERVER_VARIANTS = {
    "default": {},
    "calm": {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"},
}


def beside(models: Path, model, x, a, env: dict[str, str]) -> dict:
    """The reads beside an idle `bsbr-serve up` started with `env`, and the CPU it took idle."""
    from serve_latency import bsbr_serve_up

    with bsbr_serve_up(models, ready_s=300, env=env):
        time.sleep(10)  # past its start-up work
        idle_ms = machine_cpu_ms(a.idle_s)
        ms = reads(model, x, a.repeats)
    time.sleep(10)  # its processes wind down
    return {"idle_server": {"cpu_ms": idle_ms, "seconds": a.idle_s,
                            "share_of_cores": idle_ms / (a.idle_s * 1000 * (os.cpu_count() or 1))},
            "beside_idle_server_ms": ms}


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--idle-s", type=float, default=10.0)
    p.add_argument("--variants", default="", help=f"comma-separated, of {sorted(SERVER_VARIANTS)}")
    p.add_argument("--rounds", type=int, default=2, help="with --variants: interleaved rounds")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster_noise.json"))
    a = p.parse_args()
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        if v not in SERVER_VARIANTS:
            p.error(f"unknown variant {v!r}: one of {sorted(SERVER_VARIANTS)}")
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
    if variants:
        from serve_latency import git_revision

        out["code"] = git_revision()  # at the start: what the servers run
        out["variants"] = {v: {"env": SERVER_VARIANTS[v], "rounds": []} for v in variants}
        alone = []
        for r in range(a.rounds):
            alone.append(reads(model, x, a.repeats))
            for v in variants:
                print(f"round {r + 1}: {v}", flush=True)
                out["variants"][v]["rounds"].append(beside(models, model, x, a, SERVER_VARIANTS[v]))
        alone.append(reads(model, x, a.repeats))
        out["alone_ms"] = alone
        ref = median([t for ms in alone for t in ms])
        out["alone_median_ms"] = ref
        for v, d in out["variants"].items():
            d["median_ms"] = median([t for r in d["rounds"] for t in r["beside_idle_server_ms"]])
            d["beside_over_alone"] = d["median_ms"] / ref
            d["idle_share_of_cores"] = [r["idle_server"]["share_of_cores"] for r in d["rounds"]]
            print(f"{v}: beside an idle server {d['median_ms']:.0f} ms against {ref:.0f} alone "
                  f"({d['beside_over_alone']:.2f}x); idle it took "
                  f"{', '.join(f'{s_:.1%}' for s_ in d['idle_share_of_cores'])} of the cores")
        write_result(out, a.out)
        return 0
    out["alone_ms"] = reads(model, x, a.repeats)
    with bsbr_serve_up(models, ready_s=300):
        time.sleep(10)  # past its start-up work
        idle_ms = machine_cpu_ms(a.idle_s)
        out["idle_server"] = {"cpu_ms": idle_ms, "seconds": a.idle_s,
                              "share_of_cores": idle_ms / (a.idle_s * 1000 * (os.cpu_count() or 1))}
        out["beside_idle_server_ms"] = reads(model, x, a.repeats)
    time.sleep(10)
    out["alone_after_ms"] = reads(model, x, a.repeats)
    med = {k: median(out[k]) for k in ("alone_ms", "beside_idle_server_ms", "alone_after_ms")}
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
