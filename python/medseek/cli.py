"""The ``medseek`` command.

Each subsystem registers its own sub-commands through a ``register(subparsers)``
function, so this file only wires them together; heavy imports happen inside the
command handlers, never at ``medseek --help`` time.

What every sub-command gets from here: help that shows defaults (:class:`HelpFormatter`,
inherited by every sub-parser through :class:`Parser`), the global ``--log-level``, and
:func:`dispatch`, which names a missing install extra instead of dying on an
``ImportError`` deep inside a handler.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import textwrap

# Modules that contribute sub-commands. A module listed here exposes
# ``register(subparsers: argparse._SubParsersAction) -> None`` and sets
# ``func`` on each parser it adds; it may also set ``needs`` (modules the handler
# imports, checked before it runs) and ``default_log_level``.
_COMMAND_MODULES = (
    "medseek.demo",
    "medseek.data.commands",
    "medseek.eval.commands",
    "medseek.train.commands",
    "medseek.export.commands",
    "medseek.serve.commands",
    "medseek.serve.pacs_commands",
    "medseek.serve.draft_commands",
)

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# Third-party packages (dotted prefixes) -> the pyproject extra that installs them.
EXTRA_OF_PACKAGE = {
    "grpc": "server", "grpc_health": "server", "grpc_reflection": "server",
    "google.protobuf": "server", "prometheus_client": "server",
    "tritonclient": "triton", "pytriton": "triton", "onnx": "triton", "onnxruntime": "triton",
    "pymilvus": "milvus", "milvus_lite": "milvus",
}

ENVIRONMENT_EPILOG = """\
environment (a flag given on the command line overrides its variable):
  MEDSEEK_LOG_LEVEL   --log-level
  MEDSEEK_ADDRESS     --server of ingest, query, stats (host:port)
  MEDSEEK_TOKEN_FILE  --token-file of ingest, query, stats
  MEDSEEK_TOKEN       the bearer token itself, used when no token file is given
  MEDSEEK_CONFIG      --config of serve
  MEDSEEK_HOST        --host of serve
  MEDSEEK_PORT        --port of serve"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after each option's help, except where it says nothing:
    no default (None, "" or []), an off switch (False), or help that already names its default.
    Paragraphs of descriptions and epilogs are filled one by one, and indented lines
    (tables such as the environment list) are kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        default = action.default
        if not text or default is None or default is False or default == argparse.SUPPRESS:
            return text
        if isinstance(default, (str, list, tuple)) and not default:  # "" or []: nothing
            return text
        if "default" in text.lower():
            return text
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in textwrap.dedent(text).strip("\n").split("\n\n"):
            lines = block.splitlines()
            if len(lines) > 1 and all(line.startswith("  ") for line in lines[1:]):
                blocks.append("\n".join(indent + line for line in lines))
            else:
                blocks.append(super()._fill_text(block, width, indent))
        return "\n\n".join(blocks)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose sub-parsers (``add_subparsers`` makes them of the
    parent's class) share :class:`HelpFormatter` and record their own command name."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # The deepest parser's defaults are applied last, so this names the command run.
        self.set_defaults(command_name=self.prog)


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """The global ``--log-level`` option (before the sub-command)."""
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=None,
                        help="logging level of the root logger (default: $MEDSEEK_LOG_LEVEL, "
                             "else info for serve and warning for the other commands); "
                             "debug also prints the traceback of a failed call")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="medseek",
        description="Medical image retrieval: radiographs, CT/MR volumes and report text.",
        epilog=ENVIRONMENT_EPILOG,
    )
    from medseek import __version__

    parser.add_argument("--version", action="version", version=f"medseek {__version__}",
                        help="print the version and exit")
    add_log_level(parser)
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


def log_level(args: argparse.Namespace, environ=os.environ) -> str:
    """``--log-level``, else ``MEDSEEK_LOG_LEVEL``, else the command's default level."""
    if getattr(args, "log_level", None):
        return args.log_level
    value = environ.get("MEDSEEK_LOG_LEVEL", "").strip().lower()
    if value:
        if value not in LOG_LEVELS:
            raise SystemExit(f"medseek: MEDSEEK_LOG_LEVEL must be one of "
                             f"{', '.join(LOG_LEVELS)}, got {value!r}")
        return value
    return getattr(args, "default_log_level", "warning")


def configure_logging(level: str) -> None:
    """Configure the root logger, once per process (a no-op when it has handlers already,
    as under pytest or when medseek is embedded in a program that set up logging)."""
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The extra that installs the module ``exc`` failed to find, None if not ours to name."""
    parts = (exc.name or "").split(".")
    for n in range(len(parts), 0, -1):  # "google.protobuf.message" -> "google.protobuf"
        extra = EXTRA_OF_PACKAGE.get(".".join(parts[:n]))
        if extra is not None:
            return extra
    return None


def _missing_extra_message(command: str, extra: str) -> str:
    return f'{command} needs the {extra!r} extra: pip install "medseek[{extra}]"'


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command: configure logging, import what it ``needs``, call it.

    A third-party package of a known extra that fails to import, up front or inside the
    handler, ends the command with one line naming the install command, exit status 2.
    """
    args.log_level = log_level(args)
    configure_logging(args.log_level)
    command = getattr(args, "command_name", "medseek")
    try:
        for module in getattr(args, "needs", ()):
            importlib.import_module(module)
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None:
            raise
        logging.getLogger(__name__).debug("import failed", exc_info=True)
        print(_missing_extra_message(command, extra), file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
