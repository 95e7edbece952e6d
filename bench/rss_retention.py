"""Does a model's RSS keep growing while the states it holds stay bounded?

A probe of the soak's finding (bench/results/load.json: the standard
replica's RSS grew in steps while it held a flat 25-30 sessions): read
documents of 1-24 pages (512 random tokens each) with the streaming `step`,
keep at most `--live` of their states (a random one dropped past that, like
evicted hot sessions), and sample the RSS beside the bytes the live states
hold. At the end, glibc's malloc_trim(0) hands the allocator's free pages
back: what it returns is memory the allocator kept, not memory in use.

    python bench/rss_retention.py --model models/standard --docs 200

Writes bench/results/rss_retention.json (the command, the load average before
and after, the samples, the RSS before and after the trim).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bsbr_core.io import load_model  # noqa: E402
from experiments.memory import release_free_memory, rss_bytes  # noqa: E402

MIB = 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "standard"))
    p.add_argument("--docs", type=int, default=200)
    p.add_argument("--live", type=int, default=28, help="most states held at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rss_retention.json"))
    a = p.parse_args()
    load_before = os.getloadavg()
    torch.set_num_threads(1)
    model, _ = load_model(a.model, with_tokenizer=False)
    model.eval()
    vocab = model.config.vocab_size
    rng = random.Random(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    live, samples, t0 = [], [], time.time()
    with torch.no_grad():
        for doc in range(a.docs):
            st = model.init_state(1)
            for _ in range(rng.choice([1, 2, 4, 8, 16, 24])):
                _, st = model.step(torch.randint(0, vocab, (1, 512), generator=g), st)
            live.append(st)
            if len(live) > a.live:
                live.pop(rng.randrange(len(live)))
            if doc % 10 == 0 or doc == a.docs - 1:
                samples.append({"doc": doc, "s": round(time.time() - t0, 1), "rss_mib": rss_bytes() / MIB,
                                "live_state_mib": sum(s.nbytes for s in live) / MIB})
                print(f"doc {doc:4d}  rss {samples[-1]['rss_mib']:7.0f} MiB  "
                      f"live states {samples[-1]['live_state_mib']:6.0f} MiB", flush=True)
    before_trim = rss_bytes() / MIB
    trimmed = release_free_memory()
    after_trim = rss_bytes() / MIB
    out = {
        "command": " ".join(["python"] + sys.argv), "model": a.model, "docs": a.docs, "live": a.live,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": 1},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "samples": samples, "live_state_mib_at_end": sum(s.nbytes for s in live) / MIB,
        "rss_mib_before_trim": before_trim, "rss_mib_after_trim": after_trim, "malloc_trim": trimmed,
        "returned_by_trim_mib": before_trim - after_trim,
    }
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"end: rss {before_trim:.0f} MiB, after malloc_trim {after_trim:.0f} MiB; "
          f"live states {out['live_state_mib_at_end']:.0f} MiB; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
