"""How long a long document's tokenising holds up a replica's event loop (Engine._tokenized).

In-process engine (the shipped bsbr model, memory store). A one-shot
classify of `--pages` pages of 512 tokens sent as one text without form
feeds, while a ticker on the same event loop sleeps 1 ms at a time: the
longest gap between its ticks is how long every other request of the
replica would have waited. Three ways, in turn for `--rounds` rounds, each
in this process with the engine's own settings changed:

- `encode_on_loop`: as before this bench: one `tokenizer.encode` of the
  whole text, on the event loop (it holds the GIL throughout);
- `pieces_on_loop`: bsbr_core.tokenizer.encode (pieces through
  encode_batch, which lets go of the GIL), still on the loop;
- `pieces_off_loop`: as the engine now runs it: the same, in the engine's
  tokenize thread.

For each: `tokenize_ms` (the tokenising alone), `max_loop_gap_ms` and
`classify_ms` (the whole classify), medians over the rounds.

    python bench/tokenize_loop.py       # writes bench/results/tokenize_loop.json
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

WAYS = ("encode_on_loop", "pieces_on_loop", "pieces_off_loop")


def main() -> int:
    from serve_latency import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--pages", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "tokenize_loop.json"))
    a = p.parse_args()
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "machine": machine(),
           "loadavg": {"before": list(os.getloadavg())}, "settings": {"pages": a.pages, "page_tokens": 512}}

    import serve.pages
    from bsbr_core.tokenizer import encode as encode_pieces
    from serve.config import ModelSpec, SessionConfig
    from serve.engine import load_engine
    from serve.store import MemorySessionStore
    from serve_latency import make_text

    models = Path(a.models_dir)
    spec = ModelSpec(name="bsbr", path=str(models / "bsbr"), page_tokens=512, max_tokens=1 << 22)
    eng = load_engine("bsbr", spec, SessionConfig(), MemorySessionStore())
    text = make_text(eng.tokenizer, a.pages * 512, seed=3).replace("\f", " ")
    out["settings"]["chars"] = len(text)

    def one_encode(tok, t):
        return tok.encode(t, add_special_tokens=False).ids

    def setup(way: str) -> None:
        serve.pages.encode = one_encode if way == "encode_on_loop" else encode_pieces
        eng.tokenize_inline_chars = 1 << 62 if way != "pieces_off_loop" else len(text) - 1

    async def measure() -> dict:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        await eng.classify(text=text)
        classify_ms = (time.perf_counter() - t0) * 1000
        stop.set()
        await tick
        t0 = time.perf_counter()
        eng.tokenize(text, None)
        return {"tokenize_ms": (time.perf_counter() - t0) * 1000, "max_loop_gap_ms": max(gaps) * 1000,
                "classify_ms": classify_ms}

    rounds: dict[str, list[dict]] = {w: [] for w in WAYS}

    async def run_all() -> None:  # one event loop: the engine's batcher belongs to the loop it started on
        setup("pieces_off_loop")
        await measure()  # warm-up
        for _ in range(a.rounds):
            for way in WAYS:
                setup(way)
                rounds[way].append(await measure())
                r = rounds[way][-1]
                print(f"{way:>16}: tokenize {r['tokenize_ms']:6.1f} ms  longest loop gap "
                      f"{r['max_loop_gap_ms']:6.1f} ms  classify {r['classify_ms']:6.1f} ms", flush=True)

    asyncio.run(run_all())
    out["ways"] = {w: {"median": {k: statistics.median(r[k] for r in rounds[w]) for k in rounds[w][0]},
                       "rounds": rounds[w]} for w in WAYS}
    eng.shutdown()
    from serve_latency import write_result

    write_result(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
