"""`pdbench`: transfer, connector, proxy and end-to-end benchmarks.

Each subcommand lives in its own module exposing `add_parser(subparsers)` and
`run(args) -> int`; a module that is not installed is simply not listed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS = ("transfer", "connector", "proxy", "e2e", "chaos")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdbench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ImportError:
            continue
        if not hasattr(mod, "add_parser"):
            continue
        sp = mod.add_parser(sub)
        sp.set_defaults(func=mod.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
