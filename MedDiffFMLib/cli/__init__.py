"""``meddiff-fm``: the library's tasks, training and tools from a shell.

Every task command reads an image (NIfTI, NRRD, MetaImage or a DICOM folder), runs the same
``run_task`` the Slicer module runs, writes its outputs (NIfTI or NRRD, by extension) and
prints one summary line. Bad input is refused with one line before any work; nothing is
written when a run fails or is stopped (Ctrl-C, SIGTERM, SIGHUP).

Modules: :mod:`.tasks` (the six task commands, from the task registry), :mod:`.train`
(train, finetune), :mod:`.models` (export), :mod:`.tools` (phantom, demo, benchmark),
:mod:`.outputs` (output paths), :mod:`.options` (options from parameter specs) and
:mod:`.errors` (exit codes, one-line messages, signals).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Optional, Sequence

from . import errors

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2) that says where the help is."""

    def error(self, message: str):
        print(f"error: {errors.one_line(message)} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(errors.EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    from ..tasks.registry import TASKS
    from . import models, tasks, tools, train

    parser = _Parser(prog="meddiff-fm", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch and onnxruntime (default 0: "
                        "OMP_NUM_THREADS, else the CPUs this process may use, shared among torchrun's processes)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    train.add_commands(sub)
    for spec in TASKS.values():
        tasks.add_task_command(sub, spec)
    models.add_commands(sub)
    tools.add_commands(sub)
    from .. import batch, onnx_backend  # their commands live with their code

    batch.add_cli(sub)
    onnx_backend.add_cli(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit code (see :mod:`.errors`)."""
    verbose = "-v" in (argv if argv is not None else sys.argv[1:]) or "--verbose" in (
        argv if argv is not None else sys.argv[1:])
    with errors.stop_signals():
        try:
            args = build_parser().parse_args(argv)
            logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                                format="%(levelname)s %(message)s")
            if not args.verbose:
                # third-party deprecation notes are not the user's business
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)
                warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|monai|nibabel)\b")
            if args.threads < 0:
                raise errors.UsageError(f"--threads must be >= 0, got {args.threads}")
            from ..threads import set_threads

            set_threads(args.threads)
            code = int(args.func(args) or 0)
            errors.hold_signals()  # done: a signal from here on must not report "nothing written"
            late = errors.signal_received_after_commit()
            if late is not None:
                print("note: a stop signal arrived after every output was written; the run is complete",
                      file=sys.stderr)
            return code
        except SystemExit:
            raise
        except BaseException as e:  # noqa: B902 - every failure becomes one line and an exit code
            if verbose and not isinstance(e, KeyboardInterrupt):
                import traceback

                traceback.print_exc()
            return errors.report(e, verbose)
