"""Exit codes, one-line error messages and signals for the command line.

Exit codes: 0 success, 1 internal failure, 2 bad input (arguments, files, models), and for a
run stopped by a signal 128 + the signal number: 130 (SIGINT, Ctrl-C), 143 (SIGTERM),
129 (SIGHUP). Whatever goes wrong, the user sees one line on stderr and no traceback
(``meddiff-fm -v`` shows the traceback).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
# The signals a run stops on, cleaning up first; each exits with 128 + its number.
STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)


class UsageError(ValueError):
    """Bad input found by the command line's own checks (exit 2)."""


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived: raised in the main thread so that ``finally`` blocks clean up.

    A subclass of KeyboardInterrupt so that code which cleans up on Ctrl-C does so for
    SIGTERM and SIGHUP as well.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


# Bad input: the user can fix it (exit 2). Other exceptions are internal failures (exit 1).
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
             FileExistsError)


class _SignalState:
    """What the handlers do: raise once, or (once outputs are in place) only remember."""

    def __init__(self) -> None:
        self.raised: int | None = None  # the signal the handler raised Interrupted for
        self.held = False
        self.pending: int | None = None


_STATE = _SignalState()


def _handler(signum, frame) -> None:
    if _STATE.held or _STATE.raised is not None:
        # Outputs are being (or have been) moved into place, or cleanup is already running:
        # finish that rather than leave half of it.
        _STATE.pending = _STATE.pending or signum
        return
    _STATE.raised = signum
    raise Interrupted(signum)


@contextmanager
def stop_signals() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (once).

    Only the main thread can install handlers; elsewhere (a test calling ``main`` from a
    thread) the block runs with the handlers it finds.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _STATE.__init__()
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def hold_signals() -> None:
    """From now on a stop signal no longer interrupts: the outputs are being committed."""
    _STATE.held = True


def signal_received_after_commit() -> int | None:
    """The signal that arrived while outputs were being committed, if any."""
    return _STATE.pending


def one_line(error: BaseException | str) -> str:
    """The message of ``error`` on one line (newlines and runs of spaces collapsed)."""
    text = str(error) if not isinstance(error, BaseException) or str(error) else type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror if error.filename is None else f"{error.strerror}: {os.fspath(error.filename)!s}"
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"^error: ", "", text)


def _say(text: str) -> None:
    """One line on stderr; a closed terminal (SIGHUP) must not turn into a traceback."""
    try:
        print(text, file=sys.stderr)
    except (OSError, ValueError):
        pass


def report(error: BaseException, verbose: bool = False) -> int:
    """Print ``error`` as one line and return the exit code it stands for.

    A failure that follows a stop signal is reported as the stop: native code (a weights
    reader, for one) may turn the :class:`Interrupted` raised inside it into an error of
    its own, which would otherwise blame the input.
    """
    if _STATE.raised is not None and not isinstance(error, KeyboardInterrupt):
        error = Interrupted(_STATE.raised)
    if isinstance(error, Interrupted):
        _say("\ninterrupted: nothing written")
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        _say("\ninterrupted: nothing written")
        return 128 + int(signal.SIGINT)
    from ..progress import Cancelled

    if isinstance(error, Cancelled):
        _say("cancelled: nothing written")
        return 128 + int(signal.SIGINT)
    if isinstance(error, BAD_INPUT):
        _say(f"error: {one_line(error)}")
        return EXIT_BAD_INPUT
    if isinstance(error, MemoryError):
        _say("error: out of memory; nothing written. Use a smaller image, a smaller --window or "
             "--batch-size, or a computer with more memory")
        return EXIT_INTERNAL
    hint = "" if verbose else "; run 'meddiff-fm -v ...' for the traceback"
    _say(f"error: internal failure ({type(error).__name__}: {one_line(error)}); nothing written{hint}")
    return EXIT_INTERNAL
