"""A head's fine-tuning, in a process of its own that ends with it.

Fine-tuning in the API worker left PyTorch, the backbone's torch copy and the optimiser's
state in the worker after the job: a server at 1,745 MiB idle held 4,489 MiB after five
MPNet heads had been created. In a process that ends with the job, a worker never
imports PyTorch, and what the job allocated goes back to the system when it ends: 1,771
MiB after the same five (BENCHMARKS.md, issue 27). The process imports PyTorch each
time; the heads took as long to create (62.1 s against 62.7 s on average).

The process starts at the job's nice (the training thread's, which it inherits), runs
`adapters.finetune_head.fine_tune_head` on the request and sends its progress and
result over a socket pair; it ends with the worker that started it
(`service/lifetime.py`).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from adapters.finetune_head import FineTuning, TuningRequest, fine_tune_head
from models.registry import BackboneSpec, load_catalog
from service.lifetime import start_python
from service.link import hang_up

_START = (
    "from service.lifetime import end_with_starter; end_with_starter(); "
    "from service.fine_tuning import main; main()"
)


class FineTuningFailed(RuntimeError):
    pass


def fine_tune_in_process(
    spec: BackboneSpec,
    request: TuningRequest,
    catalog: tuple[Path | None, Path],
    progress: Callable[[int, int], None],
) -> FineTuning:
    """`fine_tune_head(spec, request)` in a new process, which has ended when this returns.
    `catalog`: the backbones file and sources folder the process finds `spec` in again."""
    ours, theirs = socket.socketpair()
    with theirs:
        process = start_python(_START, str(theirs.fileno()), pass_fds=(theirs.fileno(),))
    conn = Connection(ours.detach())
    try:
        conn.send((spec.id, *catalog, request))
        while True:
            kind, *body = conn.recv()
            if kind == "progress":
                progress(*body)
            elif kind == "done":
                return body[0]
            else:
                raise FineTuningFailed(body[0])
    except (EOFError, OSError):
        raise FineTuningFailed(
            f"the fine-tuning process ended unexpectedly (exit code {process.wait()})"
        ) from None
    finally:
        hang_up(conn)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    """The fine-tuning process: one request in, progress and the result (or the error)
    out."""
    # A worker's clean stop (SIGTERM, which BentoML's arbiter also sends its workers'
    # children) waits for the job to end, as it did when tuning ran in the worker; a
    # worker that dies takes this process with it (SIGKILL).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(int(sys.argv[1]))
    backbone, backbones_file, sources_dir, request = conn.recv()
    try:
        spec = load_catalog(backbones_file, sources_dir)[backbone]
        result = fine_tune_head(
            spec, request, lambda done, total: conn.send(("progress", done, total))
        )
    except Exception as exc:  # the job records it as the head's error; the log, where
        traceback.print_exc()  # (the worker's stderr, which this process shares)
        conn.send(("failed", str(exc)))
        return
    conn.send(("done", result))
