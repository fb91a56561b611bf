"""The ``fourbit`` command line (``fourbit ...`` and ``python -m fourbit ...`` are the same).

Subcommands register themselves in ``COMMANDS``: each has an ``add_arguments(parser)`` and a ``run(args)``; one
module per group of commands (``bundled``, ``inspect``, ``ptqd``, ``export``, ``pipeline``), imported by
``_load_commands``.

Errors: every expected failure (a bad argument, variant, config, checkpoint, file, calibration data; a missing
GPU; a full disk) ends as one line on stderr, ``fourbit COMMAND: error: ...``, and exit status 2; anything else
as one line naming the exception and exit status 1; ``--debug`` shows the traceback instead. A closed stdout
(``fourbit inspect x | head -1``) ends quietly. Argument checks shared by the commands: ``positive_int``,
``at_least_two``, ``nonnegative_int``, ``resolve_device``.
"""
from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
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
        code = COMMANDS[args.command][2](args) or 0
        sys.stdout.flush()  # a closed pipe shows here, inside the handler
        return code
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"fourbit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line; --debug shows the traceback
        if args.debug:
            raise
        expected = isinstance(e, _expected_errors())
        prefix = "error" if expected else f"internal error ({type(e).__name__}; run with --debug for the traceback)"
        print(f"fourbit {args.command}: {prefix}: {error_message(e)}", file=sys.stderr)
        return 2 if expected else 1


def _expected_errors() -> tuple:
    """What a user's input or machine can cause (as opposed to a bug in fourbit)."""
    from ..calibration import CalibrationError

    return ValueError, KeyError, OSError, CalibrationError, MemoryError


def error_message(e: BaseException) -> str:
    """The exception as one line: OSError as 'file: reason', KeyError without its quotes."""
    from ..utils.files import error_text

    if isinstance(e, OSError):
        text = error_text(e)
    elif isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so that Python's exit flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# ---- argument checks shared by the commands ---------------------------------------------------------
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def at_least_two(text: str) -> int:
    """argparse type for sample counts that feed a Frechet distance: an integer >= 2."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (the Frechet distance needs two or more samples), got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def resolve_device(name: Optional[str]) -> str:
    """``--device``: None -> cuda if available else cpu; a CUDA device without CUDA is refused here, before work."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (no GPU, or torch {torch.__version__} "
                             f"built without CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: the bundled commands run on cpu or cuda")
    return str(device)


if __name__ == "__main__":
    sys.exit(main())
