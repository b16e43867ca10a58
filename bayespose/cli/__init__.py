"""The ``bayespose`` command: the Scipion protocols' jobs on plain ``.star``/``.mrcs``/``.mrc``/``.cs`` files.

One module per sub-command (``add_parser(sub)`` builds its arguments, ``run(args)`` does the job and returns the
exit code); :mod:`._common` holds what they share. Every sub-command calls the same core function as its
protocol. Errors end with one readable line on stderr (warnings too), never a traceback; :func:`main` maps them
to exit codes in one place:

* 2: a bad argument, found by the parser or afterwards (:class:`~._common.UsageError`: a value out of range, an
  unknown symmetry or prior, an ``--out`` that would overwrite an input);
* 1: an unreadable or inconsistent input, or failed work (:class:`~._common.CliError`, ``ValueError`` of the
  readers, ``OSError`` such as a full disk, ``MemoryError``);
* 130: interrupted (Ctrl-C).

Outputs are written completely or not at all, also when interrupted; no command writes over its inputs.

Data-parallel runs: ``torchrun --nproc-per-node N bayespose assign|predict|refine|train ...`` starts N processes
that split the particles (:mod:`bayespose.core.parallel`: gloo on CPU, NCCL with one GPU per process) and write
exactly what one process writes; only the main process (rank 0) prints and writes. Other commands refuse to run
under ``torchrun`` (they would write the same files N times).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import warnings

from bayespose.cli import assign, demo, import_cs, plot_poses, predict, refine, simulate, train
from bayespose.cli._common import (
    EXIT_INPUT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CliError,
    Parser,
    UsageError,
    end_progress_line,
)
from bayespose.core.openmp import openmp_waits_asleep

COMMANDS = (simulate, import_cs, plot_poses, assign, refine, train, predict, demo)
DATA_PARALLEL = ("assign", "refine", "train", "predict")  # the commands that run under torchrun


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


def _os_error_message(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC and exc.filename is not None:
        return f"no space left on the device while writing {exc.filename}; free some space or write elsewhere"
    if exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return exc.strerror or str(exc)


@contextlib.contextmanager
def _processes(args):
    """Under torchrun: join the process group for a data-parallel command (a usage error for the others) and
    silence the standard output of the worker processes; leave the group at the end."""
    from bayespose.core.parallel import launched_by_torchrun

    if not launched_by_torchrun():
        yield
        return
    if args.command not in DATA_PARALLEL:
        raise UsageError(f"bayespose {args.command} does not run under torchrun (it would write its outputs once per "
                         f"process); run it as one process (data-parallel commands: {', '.join(DATA_PARALLEL)})")
    from bayespose.core import parallel

    parallel.init_from_env(None if getattr(args, "device", "auto") == "auto" else args.device)
    with contextlib.ExitStack() as stack:
        if not parallel.is_main():
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        try:
            yield
        finally:
            parallel.shutdown()


def run() -> None:
    """Console entry point (``bayespose``, ``python -m bayespose.cli``): :func:`main`, then exit with its code.

    A torchrun worker leaves with ``os._exit`` once its output is flushed: at interpreter exit a C++ destructor of the
    distributed backend now and then aborted a worker whose work and files were all done ("terminate called without
    an active exception", SIGABRT, in about 1 of 3 two-process ``predict`` runs, so torchrun reported a failure).
    """
    from bayespose.core.parallel import launched_by_torchrun

    code = main()
    if launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    prog = "bayespose"

    def fail(message: str, code: int) -> int:
        end_progress_line()
        sys.stderr.write(f"{prog}: {message}\n")
        return code

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        end_progress_line()
        sys.stderr.write(f"{prog}: warning: {message}\n")

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        prog = f"bayespose {args.command}"
        if args.command in ("assign", "refine") or (args.command == "predict" and args.refine_map is not None):
            openmp_waits_asleep()  # before the command loads torch and numba (core.openmp: measured)
        with warnings.catch_warnings(), _processes(args):
            warnings.showwarning = one_line_warning
            return args.func(args)
    except UsageError as exc:
        return fail(f"error: {exc}", EXIT_USAGE)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except MemoryError as exc:
        return fail(f"error: out of memory: {exc}", EXIT_INPUT_ERROR)
    except OSError as exc:
        return fail(f"error: {_os_error_message(exc)}", EXIT_INPUT_ERROR)
    except (CliError, ValueError) as exc:
        return fail(f"error: {exc}", EXIT_INPUT_ERROR)
