"""The ``scaling`` command. Each subcommand lives beside the code it drives and registers
itself through a ``register(subparsers)`` function, imported only when needed.

Errors: a ``ConfigError`` or ``UsageError`` anywhere becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from scaling.config import ConfigError


class UsageError(ValueError):
    """Bad command-line or file input; reported as one line with exit status 2."""


# subcommand -> module that defines register(subparsers)
COMMANDS = {
    "train": "scaling.train.cli",
    "sweep": "scaling.sweep.cli",
    "status": "scaling.sweep.cli",
    "quickstart": "scaling.sweep.cli",
    "fit": "scaling.fit.cli",
    "plot": "scaling.fit.cli",
    "sample": "scaling.train.sample_cli",
    "bench": "scaling.bench",
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    only = first if first in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except (ConfigError, UsageError) as err:
        print(f"scaling {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    # `python -m scaling.cli` runs this file as __main__, a second copy of the module whose
    # UsageError would differ from the one subcommands raise: call the imported module's main.
    from scaling.cli import main as _main

    sys.exit(_main())
