"""The ``python -m rnnjax`` command line.

Subcommands are registered in :data:`COMMANDS` as ``name -> (help, add_arguments, main)``; a new one is a
module with ``add_arguments(parser)`` and ``main(args) -> int`` plus one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train a model on a task, with checkpoints and exact resume", "rnnjax.train.cli"),
    "generate": ("continue a text prompt with a trained character-level language model", "rnnjax.generation_cli"),
    "export": ("write a trained model's step or sequence program as StableHLO or ONNX", "rnnjax.export_cli"),
}
"""Subcommand name -> (one-line help, module defining ``add_arguments(parser)`` and ``main(args)``)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand (their modules are imported to define arguments)."""
    parser = argparse.ArgumentParser(prog="python -m rnnjax", description="rnnjax: recurrent sequence models in JAX")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, module_name) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        module.add_arguments(sub)
        sub.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` and runs the chosen subcommand; returns its exit status."""
    args = build_parser().parse_args(argv)
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
