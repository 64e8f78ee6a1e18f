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

from backend_tasks import BatchSquare, PlainSquare, Square
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


# ------------------------------------------------------------------------------------------------
# batches (run_tasks(..., batch=B)): chunks of B items in order, task.run_batch per chunk


@pytest.mark.parametrize("backend", ["local", "processes"])
def test_batches_keep_order_indices_and_isolate_a_failure(backend):
    """10 items in chunks of 4: [0..3] holds the bad item 3, so its run_batch raises and its
    items run alone (3 fails alone, 0-2 succeed); [4..7] and [8, 9] run as batches."""
    items = list(range(10))
    with run_tasks(BatchSquare(), items, backend=backend, workers=2, progress=False,
                   batch=4) as run:
        out = list(run)
    if backend == "local":
        assert [i for i, _ in out] == items                          # in order
    got = dict(out)
    assert sorted(got) == items and len(out) == len(items)
    fail = got[3]
    assert isinstance(fail, Failure) and fail.index == 3 and fail.item == 3
    assert fail.message == "ValueError: three is refused"           # the item's own error
    assert run.stats["failures"] == 1
    for i in (0, 1, 2):
        assert got[i][0] == i * i and got[i][2] is None              # alone, after the batch failed
    for i in range(4, 10):
        assert got[i][0] == i * i and got[i][2] == ((4, 5, 6, 7) if i < 8 else (8, 9))
    pids = {got[i][1] for i in items if i != 3}
    if backend == "local":
        assert pids == {os.getpid()}
    else:
        assert os.getpid() not in pids and run.stats["workers"] == 2   # three chunks, two workers


def test_batch_larger_than_the_items_is_one_chunk():
    with run_tasks(BatchSquare(), [5, 6, 7], progress=False, batch=50) as run:
        assert dict(run) == {0: (25, os.getpid(), (5, 6, 7)), 1: (36, os.getpid(), (5, 6, 7)),
                             2: (49, os.getpid(), (5, 6, 7))}
    with run_tasks(BatchSquare(), [5, 6], backend="processes", workers=4, progress=False,
                   batch=50) as run:
        assert {i: r[2] for i, r in run} == {0: (5, 6), 1: (5, 6)}
    assert run.stats["workers"] == 1                # one chunk: one worker, not four


def test_batch_1_runs_each_item_alone():
    """batch=1 (the default) never calls run_batch: every item is task(item), as before."""
    for kwargs in ({}, {"batch": 1}):
        with run_tasks(BatchSquare(), list(range(6)), progress=False, **kwargs) as run:
            got = dict(run)
        assert [got[i][2] for i in range(6) if i != 3] == [None] * 5
        assert isinstance(got[3], Failure) and got[3].message == "ValueError: three is refused"


@pytest.mark.parametrize("backend", ["local", "processes"])
def test_a_task_without_run_batch_is_batched_one_by_one(backend):
    with run_tasks(PlainSquare(), list(range(7)), backend=backend, workers=2, progress=False,
                   batch=3) as run:
        assert dict(run) == {i: i * i for i in range(7)}
    assert run.stats["failures"] == 0


def test_bad_batch_is_refused():
    with pytest.raises(NAFlowError, match="--batch must be >= 1, got 0"):
        run_tasks(Square(), [1], batch=0)


def test_default_batch_is_for_gpus():
    """--batch by default: 8 images where torch runs on a GPU, 1 on a CPU (where a batch ran at
    0.76-1.05x the one-by-one rate, bench/results/throughput.json); as given otherwise."""
    from naflow_onnx.backends import resolve_batch
    assert resolve_batch(None, "cuda") == 8 and resolve_batch(None, "cuda:1") == 8
    assert resolve_batch(None, "cpu") == 1
    assert resolve_batch(3, "cpu") == 3 and resolve_batch(1, "cuda") == 1
    import torch
    assert resolve_batch(None) == (8 if torch.cuda.is_available() else 1)
    with pytest.raises(NAFlowError, match="--batch must be >= 1, got 0"):
        resolve_batch(0, "cuda")
