"""A process started by a Graft process ends when its starter dies (service/lifetime.py),
shown on plain Python processes; tests/test_e2e_lifetime.py kills a whole server."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.server import ROOT, alive, process_tree, wait_until_ended

STARTER = """
import time
from service.lifetime import start_python
child = start_python(
    "from service.lifetime import end_with_starter; end_with_starter();"
    " print('asked', flush=True); import time; time.sleep(600)"
)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_child_ends_when_its_starter_is_sigkilled() -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        child = process_tree(int(starter.stdout.readline()))
        assert starter.stdout.readline().strip() == "asked"  # the child's own line
        assert alive(child)
    finally:
        starter.send_signal(signal.SIGKILL)
        starter.wait()
    wait_until_ended(child)


def test_a_child_whose_starter_died_already_ends_at_once() -> None:
    # Its parent is not the process it was told it is (here: this one, not pid 1).
    code = "from service.lifetime import end_with_parent; end_with_parent(1); print('alive')"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL and "alive" not in done.stdout
