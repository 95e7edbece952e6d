"""python -m experiments run NAME|all [--profile smoke|cpu|gpu] [--device cpu] [--out DIR] | report"""
from __future__ import annotations

import argparse
import sys

from experiments.runner import EXPERIMENTS, PROFILE_NAMES, RESULTS_DIR, run_experiment, write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run an experiment (or all) and write experiments/results/NAME.json")
    r.add_argument("name", choices=(*EXPERIMENTS, "all"))
    r.add_argument("--profile", choices=PROFILE_NAMES, default="cpu")
    r.add_argument("--device", default="cpu")
    r.add_argument("--out", default=None, help="results folder (default experiments/results, smoke: results/smoke)")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--quiet", action="store_true")
    rep = sub.add_parser("report", help="write docs/experiments.md from the results")
    rep.add_argument("--results", default=str(RESULTS_DIR))
    rep.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.command == "report":
        kw = {} if args.out is None else {"path": args.out}
        print(write_report(args.results, **kw))
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    names = EXPERIMENTS if args.name == "all" else (args.name,)
    for name in names:
        cmd = f"python -m experiments run {name} --profile {args.profile}" + (
            f" --threads {args.threads}" if args.threads else "")
        record = run_experiment(name, args.profile, args.device, args.out, not args.quiet, cmd)
        print(f"{name}: {record['wall_time_s']:.1f}s -> {args.out or 'experiments/results'}/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
