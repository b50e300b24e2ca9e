"""The ``medseek`` command.

Each subsystem registers its own sub-commands through a ``register(subparsers)``
function, so this file only wires them together; heavy imports happen inside the
command handlers, never at ``medseek --help`` time.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands. A module listed here exposes
# ``register(subparsers: argparse._SubParsersAction) -> None`` and sets
# ``func`` on each parser it adds.
_COMMAND_MODULES = (
    "medseek.demo",
    "medseek.data.commands",
    "medseek.eval.commands",
    "medseek.train.commands",
    "medseek.export.commands",
    "medseek.serve.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseek",
        description="Medical image retrieval: radiographs, CT/MR volumes and report text.",
    )
    from medseek import __version__

    parser.add_argument("--version", action="version", version=f"medseek {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only a module of ours that does not exist yet is skipped; a missing
            # third-party dependency inside it is a real error and propagates.
            if exc.name != name and not name.startswith(f"{exc.name}."):
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
