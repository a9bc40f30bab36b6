"""`umae report`: regenerates the performance tables from the recorded GPU results (report.py:
the full table in docs/benchmarks.md, its headline rows in README.md)."""
from __future__ import annotations

import argparse

HELP = "regenerate the performance tables (docs/benchmarks.md, README's headline) from bench/results"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="bench/results")
    p.add_argument("--readme", default="README.md")


def main(args) -> int:
    from .report import update_readme

    print(update_readme(args.results, args.readme))
    return 0
