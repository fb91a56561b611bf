"""The ``fourbit`` command line (``fourbit ...`` and ``python -m fourbit ...`` are the same).

Subcommands register themselves in ``COMMANDS``: each has an ``add_arguments(parser)`` and a ``run(args)``; one
module per group of commands (``bundled``, ``inspect``, ``ptqd``, ``export``, ``pipeline``), imported by ``_load_commands``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}
COMMAND_MODULES = ("bundled", "inspect", "ptqd", "export", "pipeline")


def command(name: str, help: str):
    """Decorator pair: ``@command("x", "...")`` on a function ``add_arguments(p)`` returning ``run``."""

    def deco(add_arguments):
        def run(args):
            return add_arguments.run(args)

        COMMANDS[name] = (help, add_arguments, run)
        return add_arguments

    return deco


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="fourbit", description="4-bit quantization of diffusion models: "
                                     "SVDQuant, PTQD, QuaRTZ, with kernels, calibration and evaluation.")
    parser.add_argument("--version", action="version", version=f"fourbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _load_commands()
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _load_commands() -> None:
    """Import the modules whose commands register themselves."""
    import importlib

    for mod in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the trainer has its own parser: hand it every argument unchanged
        from ..training.train import main as train_main

        return train_main([a for a in argv[1:] if a != "--"] ) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command][2](args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"fourbit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
