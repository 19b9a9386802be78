#!/usr/bin/env python
"""Launch a training job: `python launch/submit.py --cfg lsor.yaml --local [key=value ...]`.

--local trains in this process (one CPU or GPU, no Slurm): the debug mode that runs the same
code a Slurm job runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", action="append", default=[], metavar="FILE",
                        help="config file, repeatable, merged in order (bare names resolve "
                             "under configs/)")
    parser.add_argument("--local", action="store_true",
                        help="train in this process without Slurm (debug mode)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hpcbrain.config import ConfigError, load_config
    from hpcbrain.data.store import StoreError

    try:
        cfg = load_config(args.cfg, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.local:
        print("error: only --local is supported in this version (Slurm submission is not "
              "implemented yet); rerun with --local", file=sys.stderr)
        return 2
    from hpcbrain.job import run_training

    try:
        result = run_training(cfg)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(result)
    return 0


def print_summary(result) -> None:
    print(f"run folder:        {result.run_dir}")
    for name, value in sorted((result.metrics or {}).items()):
        print(f"{name:<19}{value:.3f}")
    if result.figures:
        print(f"figures:           {', '.join(str(f) for f in result.figures)}")
    print(f"tracking URI:      {result.tracking_uri}")
    if result.run_id:
        print(f"MLflow run:        {result.run_id}")
    if result.model_uri:
        print(f"registered model:  {result.model_uri}")


if __name__ == "__main__":
    sys.exit(main())
