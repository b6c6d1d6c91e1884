"""``fastgen bench``: argument parsing and dispatch to the benchmark modules."""

from __future__ import annotations

import argparse


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``fastgen bench``."""
    p.add_argument("suite", choices=["attention"], help="which benchmark to run")


def run_bench(args: argparse.Namespace) -> int:
    """Run the selected benchmark."""
    raise ValueError(f"suite={args.suite!r} is not implemented yet")
