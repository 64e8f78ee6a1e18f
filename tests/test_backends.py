"""The execution layer (naflow_onnx.backends.run_tasks): the ``processes`` backend returns what
``local`` does, reports failures per item, stops on a failed set-up, and its workers exit when
the process that started them dies."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend_tasks import Square
from conftest import ROOT
from naflow_onnx.backends import Failure, run_tasks
from naflow_onnx.errors import NAFlowError

TESTS = Path(__file__).resolve().parent


def test_processes_equal_local_and_fail_per_item():
    items = list(range(7))
    got = {}
    for backend in ("local", "processes"):
        with run_tasks(Square(), items, backend=backend, workers=2, progress=False) as run:
            got[backend] = dict(run)
        assert run.stats["failures"] == 1
    assert got["processes"].keys() == set(items)
    for i in items:
        a, b = got["local"][i], got["processes"][i]
        if i == 3:
            assert isinstance(a, Failure) and isinstance(b, Failure)
            assert a.message == b.message == "ValueError: three is refused" and b.index == 3
        else:
            assert a[0] == b[0] == i * i
    assert {r[1] for i, r in got["local"].items() if i != 3} == {os.getpid()}
    workers = {r[1] for i, r in got["processes"].items() if i != 3}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2


def test_processes_setup_failure_stops_the_run():
    with pytest.raises(NAFlowError, match="worker set-up failed: RuntimeError: no model here"):
        list(run_tasks(Square(fail_setup=True), [1, 2], backend="processes", workers=2,
                       progress=False))


def test_bad_backend_options_are_refused():
    with pytest.raises(NAFlowError, match="unknown backend 'threads'"):
        run_tasks(Square(), [1], backend="threads")
    with pytest.raises(NAFlowError, match="--address needs --backend ray"):
        run_tasks(Square(), [1], backend="processes", address="1.2.3.4:6379")


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    """Both workers are known to be inside an item (each wrote its pid file and blocks) when the
    parent is killed; both must then exit. Polls with deadlines, no sleep as synchronisation."""
    driver = ("import sys; from backend_tasks import Block; from naflow_onnx.backends import run_tasks; "
              "list(run_tasks(Block(sys.argv[1]), [0, 1], backend='processes', workers=2, progress=False))")
    proc = subprocess.Popen([sys.executable, "-c", driver, str(tmp_path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"})
    try:
        deadline = time.monotonic() + 120
        while len(pids := [int(p.name) for p in tmp_path.iterdir()]) < 2:
            assert proc.poll() is None, "the driver ended early"
            assert time.monotonic() < deadline, "the workers did not start their items"
            time.sleep(0.05)
        assert all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while alive := [p for p in pids if _alive(p)]:
            assert time.monotonic() < deadline, f"workers still running after their parent died: {alive}"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
