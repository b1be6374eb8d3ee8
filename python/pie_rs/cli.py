"""The ``pie-rs`` command: ``demo``, ``bench``, ``simulate`` and ``serve``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from . import bench, demo, serve

    parser = argparse.ArgumentParser(
        prog="pie-rs",
        description="Pool CPU memory into the KV cache of HuggingFace transformers models.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,simulate,serve}")
    demo.add_arguments(
        sub.add_parser(
            "demo",
            help="generate with DynamicCache and with pie-rs, check the tokens match, draw a timeline",
            description=demo.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    bench.add_arguments(
        sub.add_parser(
            "bench",
            help="DynamicCache, transformers' caches and pie-rs over budgets, batches and contexts",
            description=bench.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    serve.add_arguments(
        sub.add_parser(
            "serve",
            help="an OpenAI-compatible HTTP server (transformers serve) with pooled KV",
            description=serve.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    sub.add_parser("simulate", help="what-if runs of the engine in virtual time (see pie-rs simulate --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pie-rs`` console script; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "simulate":
        try:
            from . import simulate
        except ImportError as exc:
            print(f"pie-rs simulate is not available: {exc}", file=sys.stderr)
            return 2
        return int(simulate.main(args_list[1:]) or 0)
    parser = _parser()
    args = parser.parse_args(args_list)
    if args.version:
        from . import __version__

        print(f"pie-rs {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    from . import PieError

    if args.command == "serve":
        from .serve import run_serve

        try:
            return run_serve(args)
        except PieError as exc:
            print(f"pie-rs serve: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    from .bench import run_bench
    from .demo import run_demo

    try:
        return run_demo(args) if args.command == "demo" else run_bench(args)
    except PieError as exc:
        print(f"pie-rs {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
