"""The `msrnn` command: one argparse parser, each feature module registering its own subcommands.

    msrnn generate --chat "What is the capital of France?" --policy tova --states 64
    msrnn chat | msrnn info | msrnn eval | msrnn bench | msrnn inspect      (each has its own --help)

A module takes part by exposing `add_cli(subparsers)`, which adds its subparser(s) and sets `func` to the function
that runs them. Modules are imported here, lazily, and one that does not exist (yet) is simply skipped.
Errors msrnn raises on purpose (MsrnnError) end as one line, "msrnn: error: ...", and exit code 2, like argparse's
own usage errors; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import MsrnnError

COMMAND_MODULES = ("generate", "eval", "bench", "inspect")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msrnn", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Transformers are Multi-State RNNs: run a Llama/Mistral checkpoint as a bounded recurrence "
                    "(TOVA, H2O, window, sinks...).",
        epilog='example:\n  msrnn generate --chat "What is the capital of France?" --policy tova --states 64\n'
               "run `msrnn COMMAND --help` for each command's options.")
    parser.add_argument("--version", action="version", version=f"msrnn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = _optional_module(f"msrnn.{name}")
        if module is not None and hasattr(module, "add_cli"):
            module.add_cli(subparsers)
    return parser


def _optional_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:  # the module itself is absent; a missing dependency inside it is a real error
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    """Run `msrnn ARGS`; returns 0, or exits with code 2 (after one line on stderr) on a usage or msrnn error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except MsrnnError as e:
        parser.exit(2, f"msrnn: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\n")
    except BrokenPipeError:  # `msrnn generate ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
