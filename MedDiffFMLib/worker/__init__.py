"""Run one task in a separate process, and the client that drives it.

Why a process: a GUI (3D Slicer) must stay responsive while a task runs for minutes, a cancel
must stop the GPU work at once (killing a thread is impossible; killing a process is not), and
a CUDA out-of-memory error or a crash must not take the application down with it.

* :mod:`.protocol`: the request / result folders, the stdout lines and the exit codes;
* :mod:`.server`: the worker process (``python -m MedDiffFMLib.worker --request DIR``);
* :mod:`.client`: :class:`WorkerClient` (start, poll, cancel, collect), :class:`WorkerRunner`
  (``run_task``'s signature, in a worker) and :func:`query_environment` (``--info``).

Out-of-memory errors are retried once, in one place: ``run_task`` halves the batch down to 1.
"""

from .client import WorkerClient, WorkerRunner, library_parent, popen_kwargs, query_environment
from .protocol import (EXIT_BAD_REQUEST, EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_OUT_OF_MEMORY, INFO_PREFIX,
                       OOM_MESSAGE, PROTOCOL_VERSION, WorkerError, WorkerOutOfMemory, parse_line, read_request,
                       read_result, write_request, write_result)
from .server import environment_info, main

__all__ = ["WorkerClient", "WorkerRunner", "WorkerError", "WorkerOutOfMemory", "query_environment",
           "library_parent", "popen_kwargs", "environment_info", "main", "parse_line", "read_request",
           "read_result", "write_request", "write_result", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_REQUEST",
           "EXIT_OUT_OF_MEMORY", "EXIT_CANCELLED", "INFO_PREFIX", "OOM_MESSAGE", "PROTOCOL_VERSION"]
