"""The ``scaling`` command. Each subcommand lives beside the code it drives and registers
itself through a ``register(subparsers)`` function, imported only when needed.

Errors: any ``scaling.errors.ScalingError`` (``ConfigError``, ``UsageError``, ``RunDirBusy``,
...) anywhere becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
import warnings

from scaling.errors import EXIT_USAGE, CheckpointWarning, ConfigError, ScalingError, UsageError  # noqa: F401  (re-exported)


# subcommand -> module that defines register(subparsers)
COMMANDS = {
    "train": "scaling.train.cli",
    "sweep": "scaling.sweep.cli",
    "status": "scaling.sweep.cli",
    "quickstart": "scaling.sweep.cli",
    "fit": "scaling.fit.cli",
    "plot": "scaling.fit.cli",
    "sample": "scaling.train.sample_cli",
    "eval": "scaling.train.eval_cli",
    "coord-check": "scaling.train.coord_check",
    "bench": "scaling.bench",
    "data": "scaling.data.cli",
    "forecast": "scaling.fit.forecast_cli",
    "curves": "scaling.fit.curves_cli",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaling", description="Scaling-law experiments in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    registered = set()
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            continue
        if module in registered:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith(module):
                continue  # subcommand not built yet
            raise
        mod.register(sub)
        registered.add(module)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the console as one line; those the code already printed, not again."""
    if issubclass(category, CheckpointWarning):
        return ""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _one_line_warning
    first = next((a for a in argv if not a.startswith("-")), None)
    only = first if first in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except ScalingError as err:
        print(f"scaling {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_is_broken():
            raise  # some other pipe (a worker's): a real failure
        _silence_stdout()  # `scaling sweep --plan | head`: the reader left; not an error
        return 0
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"scaling {args.command}: error: {err.strerror}{where}; free space and run the same command again "
              f"(runs resume from their last checkpoint)", file=sys.stderr)
        return 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    return int(rc or 0)


def _stdout_is_broken() -> bool:
    """Whether stdout is a pipe whose reader has gone."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
