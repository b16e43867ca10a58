"""The ``bayespose`` command: the Scipion protocols' jobs on plain ``.star``/``.mrcs``/``.mrc``/``.cs`` files.

One module per sub-command (``add_parser(sub)`` builds its arguments, ``run(args)`` does the job and returns the
exit code); :mod:`._common` holds what they share. Every sub-command calls the same core function as its
protocol. Bad arguments end with one readable line on stderr and exit code 2, unreadable inputs or failed work
with exit code 1; outputs are written completely or not at all.
"""

from __future__ import annotations

import argparse
import sys

from bayespose.cli import assign, demo, import_cs, plot_poses, predict, refine, simulate, train
from bayespose.cli._common import EXIT_INPUT_ERROR, EXIT_USAGE, CliError, Parser

COMMANDS = (simulate, import_cs, plot_poses, assign, refine, train, predict, demo)


def build_parser() -> argparse.ArgumentParser:
    from bayespose import __version__

    parser = Parser(prog="bayespose",
                     description="Bayesian and learned particle-pose estimation for cryo-EM (plain-file commands; "
                                 "the same jobs exist as Scipion protocols).")
    parser.add_argument("--version", action="version", version=f"bayespose {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except (CliError, ValueError, FileNotFoundError, PermissionError, OSError) as exc:
        sys.stderr.write(f"bayespose {args.command}: error: {exc}\n")
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("bayespose: interrupted\n")
        return 130

