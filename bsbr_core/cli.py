"""Command line of the model library: data builders and tokenizer training.

    python -m bsbr_core.cli data kernel-docs [--out DIR] [--deb FILE] [--force]
    python -m bsbr_core.cli tokenizer train [--data DIR] [--vocab-size N] [--out FILE]

``serve/cli.py`` mounts the same commands under ``bsbr-serve`` by calling
:func:`add_subcommands` on its own sub-parsers. Every command sets ``func``:
``args.func(args)`` runs it and returns the process exit code; library errors
(:class:`bsbr_core.data.DataError`) are printed as one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from bsbr_core import data as data_lib

EXIT_ERROR = 2


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``data`` and ``tokenizer`` on ``subparsers`` (from
    ``parser.add_subparsers()``); each leaf command sets ``func``."""
    data = subparsers.add_parser("data", help="build a corpus")
    datasets = data.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    kd = datasets.add_parser(
        "kernel-docs",
        help="Linux kernel Documentation/ classified by top-level folder (Debian linux-doc-6.1)",
        description="Fetch Debian's linux-doc-6.1 with apt-get (or use --deb), label each document "
        "by its top-level folder under Documentation/, split 80/10/10 by a hash of its path and write "
        "train/validation/test.jsonl and meta.json. A second run with the same inputs does nothing.",
    )
    kd.add_argument("--out", type=Path, default=None,
                    help="output folder (default: $BSBR_DATA_DIR/kernel-docs or data/kernel-docs in the checkout)")
    kd.add_argument("--deb", type=Path, default=None, help="use this linux-doc .deb instead of apt-get download")
    kd.add_argument("--force", action="store_true", help="rebuild (and re-download) even if a matching build exists")
    kd.add_argument("--min-docs", type=int, default=40, help="documents a folder needs to become a class (default 40)")
    kd.set_defaults(func=_handles_data_errors(_cmd_kernel_docs))

    tok = subparsers.add_parser("tokenizer", help="train a tokenizer")
    tok_cmds = tok.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    train = tok_cmds.add_parser("train", help="train a byte-level BPE on a corpus's training split")
    train.add_argument("--data", type=Path, default=None, help="corpus folder (default: the kernel-docs folder)")
    train.add_argument("--vocab-size", type=int, default=16384)
    train.add_argument("--out", type=Path, default=None, help="tokenizer.json to write (default: DATA/tokenizer.json)")
    train.add_argument("--no-stats", action="store_true",
                       help="skip encoding every split to report document lengths in tokens")
    train.set_defaults(func=_handles_data_errors(_cmd_tokenizer_train))

    from bsbr_core import evaluate as evaluate_lib, train as train_lib

    train_lib.register_cli(subparsers)
    evaluate_lib.register_cli(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bsbr_core.cli", description=__doc__.split("\n\n")[0])
    add_subcommands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def _handles_data_errors(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except data_lib.DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_ERROR

    return run


def _cmd_kernel_docs(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else data_lib.default_kernel_docs_dir()
    t0 = time.perf_counter()
    meta = data_lib.build_kernel_docs(out, deb_path=args.deb, min_docs=args.min_docs, force=args.force)
    print(f"{meta['package']} {meta['version']} -> {out} ({time.perf_counter() - t0:.1f}s)")
    header = f"{'label':<20}" + "".join(f"{s:>12}" for s in data_lib.SPLITS)
    print(header)
    for label in meta["labels"]:
        print(f"{label:<20}" + "".join(f"{meta['counts'][s]['per_label'][label]:>12}" for s in data_lib.SPLITS))
    print(f"{'total':<20}" + "".join(f"{meta['counts'][s]['total']:>12}" for s in data_lib.SPLITS))
    maj = meta["test_majority"]
    print(f"{len(meta['labels'])} classes; test majority class {maj['label']}: {maj['rate']:.3f}")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from bsbr_core import tokenizer as tok_lib

    data_dir = args.data if args.data is not None else data_lib.default_kernel_docs_dir()
    out = args.out if args.out is not None else data_dir / "tokenizer.json"
    train_docs = data_lib.load_split(data_dir, "train")
    t0 = time.perf_counter()
    tokenizer = tok_lib.train_tokenizer([d.text for d in train_docs], vocab_size=args.vocab_size, show_progress=True)
    tok_lib.save_tokenizer(tokenizer, out)
    print(f"trained on {len(train_docs)} documents in {time.perf_counter() - t0:.1f}s: "
          f"vocab {tokenizer.get_vocab_size()} -> {out}")
    if not args.no_stats:
        stats = {
            split: length_stats(
                [len(ids) for ids in tok_lib.encode_many(tokenizer, [d.text for d in data_lib.load_split(data_dir, split)])]
            )
            for split in data_lib.SPLITS
        }
        print("document length in tokens:")
        print(json.dumps(stats, indent=2))
    return 0


LENGTH_PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
LENGTH_THRESHOLDS = (512, 2048, 8192, 32768)


def length_stats(lengths: list[int]) -> dict[str, object]:
    """Percentiles (nearest rank) and counts over thresholds of document lengths."""
    xs = sorted(lengths)
    if not xs:
        return {"count": 0}
    return {
        "count": len(xs),
        "total": sum(xs),
        "mean": round(sum(xs) / len(xs), 1),
        "min": xs[0],
        "max": xs[-1],
        "percentiles": {f"p{q}": xs[min(len(xs) - 1, -(-q * len(xs) // 100) - 1)] for q in LENGTH_PERCENTILES},
        "over": {str(t): sum(x > t for x in xs) for t in LENGTH_THRESHOLDS},
    }


if __name__ == "__main__":
    sys.exit(main())
