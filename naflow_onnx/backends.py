"""Run one per-image task over many items on a backend: in this process, in worker processes,
or on Ray actors. Every command that runs work per image (analyze, check, baseline, evaluate)
goes through ``run_tasks``.

A ``Task`` is a small picklable object (paths and options, never a session). ``setup()`` runs
once per worker (load the model: graph analysis, onnxruntime session); ``task(item)`` turns one
item into one picklable result. ``run_tasks`` yields ``(index, result)`` as results arrive; an
item whose call raised yields a ``Failure`` instead and the run goes on.

Batches: with ``batch=B`` the items are grouped, in order, into chunks of B (the same chunks on
every backend and for any number of workers, so that a batched engine sees the same batches
wherever it runs); a worker turns a chunk into its results with ``task.run_batch(chunk)``
(``Task.run_batch`` by default calls the task on each item; a task that is not a ``Task``
subclass gets the same default, ``run_batch``). When ``run_batch`` raises, the chunk's items are
run again one by one with ``task(item)``, so that one bad item fails alone and the others
succeed. A chunk of one item is just ``task(item)``: ``batch=1`` is the one-by-one run.
Results are still yielded per item and the progress bar counts items.

Backends:

``local``  ``setup()`` once in this process, then every chunk in order.
``processes`` ``workers`` (default: the CPU count, at most one per chunk) spawned processes on
           this machine, each running ``setup()`` once; a chunk at a time per process, results
           in completion order. Every worker watches its parent and exits when it dies (a
           killed command leaves nothing computing on). A worker that dies (out of memory)
           fails the items not yet done with one line; a ``setup()`` that raises
           stops the run with ``NAFlowError``.
``ray``    ``ray.init(address=...)``, or a new local Ray instance when ``address`` is None
           (``num_cpus = workers``). ``workers`` actors (default: the cluster's CPUs; one CPU
           each, spread over the nodes) each run ``setup()`` once; chunks are handed to the
           actors two at a time (one running, one queued) and results are streamed back with
           ``ray.wait``, in completion order. When an actor dies (its process or node is
           killed, out of memory), a replacement actor is started and the items of the chunks
           it held are resubmitted; as it is unknown which of them killed it, each is then run
           alone (a chunk of one) on an actor, and an item whose actor dies while it runs
           alone more than ``retries`` times becomes a ``Failure``. A ``setup()`` that raises
           stops the run with ``NAFlowError`` (a model that cannot be loaded on a node will not
           load on a retry).

Ray is an optional dependency (``pip install naflow-onnx[ray]``); it is imported only for the
``ray`` backend.
"""
from __future__ import annotations

import collections
import logging
import os
import sys
import time
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

from . import testhooks
from .errors import NAFlowError

BACKENDS = ("local", "processes", "ray")
IN_FLIGHT_PER_WORKER = 2
# images per run_batch call of the commands' --batch (1 = one by one); None: resolve_batch
DEFAULT_BATCH = None
GPU_BATCH = 8
# how long a ray run waits for a first worker to be started (no free CPU in the cluster?)
STALL_S = 600.0


class Task:
    """A per-item computation. Subclass it; instances must be picklable (hold paths and options,
    not sessions): the ``ray`` backend pickles the task once per actor before ``setup()``."""

    def setup(self) -> None:
        """Once per worker process / actor: load the model (Analyzer etc.)."""

    def __call__(self, item):
        """One item -> one picklable result."""
        raise NotImplementedError

    def run_batch(self, chunk: list) -> list:
        """Several items -> their results, in order (override to compute them together). If it
        raises, ``run_tasks`` runs the chunk's items one by one with ``task(item)``."""
        return [self(item) for item in chunk]


@dataclass
class Failure:
    """An item whose task raised (or whose worker died more than ``retries`` times)."""
    index: int
    item: Any
    message: str   # one line


def run_batch(task, chunk: list) -> list:
    """``task.run_batch(chunk)``, or ``[task(item) for item in chunk]`` for a task without one
    (a plain class with ``setup`` and ``__call__``)."""
    fn = getattr(task, "run_batch", None)
    results = list(fn(chunk)) if fn is not None else [task(item) for item in chunk]
    if len(results) != len(chunk):
        raise NAFlowError(f"internal error: run_batch gave {len(results)} results for "
                          f"{len(chunk)} items")
    return results


def run_chunk(task, chunk: list) -> list[tuple[bool, Any]]:
    """One chunk on a worker: ``[(True, result) or (False, one-line message)]`` per item. The
    chunk runs together (``run_batch``); if that raises, each item runs alone, so that only the
    items that fail alone fail."""
    if len(chunk) > 1:
        try:
            return [(True, r) for r in run_batch(task, chunk)]
        except Exception:  # noqa: BLE001 - which item broke the batch is found one by one below
            pass
    out = []
    for item in chunk:
        try:
            out.append((True, task(item)))
        except Exception as exc:  # noqa: BLE001 - the item fails, the run goes on
            out.append((False, one_line(exc)))
    return out


def chunks(n: int, batch: int) -> list[list[int]]:
    """The indices 0..n-1 in order, in chunks of ``batch`` (the last one shorter)."""
    return [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]


def one_line(exc: BaseException) -> str:
    """A NAFlowError's own message; anything else prefixed with its type; first line only."""
    text = str(exc).strip()
    if not isinstance(exc, NAFlowError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


class TaskRun(Iterator):
    """The iterator ``run_tasks`` returns: ``(index, result-or-Failure)`` pairs, plus ``stats``
    (``backend``, ``workers``, ``worker_deaths``, ``resubmitted``, ``failures``), final once the
    iteration is over. ``close()`` (or leaving a ``with`` block) stops the workers."""

    def __init__(self, gen, stats: dict):
        self._gen, self.stats = gen, stats

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_tasks(task: Task, items: list, *, backend: str = "local", address: str | None = None,
              workers: int | None = None, retries: int = 2, progress: bool = True,
              desc: str = "images", stall_s: float = STALL_S,
              batch: int = 1) -> Iterator[tuple[int, Any]]:
    """Yields (index, result-or-Failure) as results arrive (any order for ray and processes, in
    order for local); a tqdm progress bar over len(items) (on a terminal only). ``stall_s``
    (ray): how long to wait for a first actor before the items left fail. ``batch``: items per
    ``task.run_batch`` call (module docstring)."""
    if backend not in BACKENDS:
        raise NAFlowError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if workers is not None and int(workers) < 1:
        raise NAFlowError(f"--workers must be >= 1, got {workers}")
    if retries < 0:
        raise NAFlowError(f"retries must be >= 0, got {retries}")
    check_batch(batch)
    items = list(items)
    groups = chunks(len(items), int(batch))
    stats = {"backend": backend, "address": address, "workers": 1 if backend == "local" else workers,
             "worker_deaths": 0, "resubmitted": 0, "failures": 0}
    if backend != "ray" and address is not None:
        raise NAFlowError("--address needs --backend ray")
    if backend == "local":
        gen = _run_local(task, items, groups, stats, progress, desc)
    elif backend == "processes":
        stats["workers"] = max(1, min(int(workers or os.cpu_count() or 1), len(groups)))
        gen = _run_processes(task, items, groups, stats, progress, desc)
    else:
        ray = import_ray()
        gen = _ray_chatter_to_stderr(
            _run_ray(ray, task, items, groups, address, workers, retries, stats, progress, desc,
                     stall_s))
    return TaskRun(gen, stats)


def check_backend_options(backend: str, address: str | None, workers: int | None) -> None:
    """--address belongs to --backend ray, --workers to processes or ray."""
    if backend not in BACKENDS:
        raise NAFlowError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if backend != "ray" and address:
        raise NAFlowError("--address needs --backend ray")
    if backend == "local" and workers is not None:
        raise NAFlowError("--workers needs --backend ray (or processes)")
    if workers is not None and int(workers) < 1:
        raise NAFlowError(f"--workers must be >= 1, got {workers}")


def check_batch(batch: int | None) -> None:
    """--batch is a positive number of items (or None: ``resolve_batch``)."""
    if batch is not None and int(batch) < 1:
        raise NAFlowError(f"--batch must be >= 1, got {batch}")


def resolve_batch(batch: int | None, device: str | None = None) -> int:
    """--batch as given; by default ``GPU_BATCH`` images where torch runs on a GPU (a batched
    pass saves per-op launches there) and 1 on a CPU, where a batch does not pay: at 1 thread a
    batch of 8 ran at 0.76× (MobileNetV2) and 1.05× (ResNet-50) the one-by-one images/s
    (bench/results/throughput.json). ``device`` as the commands' ``--device`` (None: CUDA when
    torch sees it)."""
    if batch is not None:
        check_batch(batch)
        return int(batch)
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return GPU_BATCH if str(device).startswith("cuda") else 1


def import_ray():
    try:
        import ray
    except ImportError:
        raise NAFlowError("the ray backend needs Ray: pip install naflow-onnx[ray]") from None
    return ray


def _bar(total: int, progress: bool, desc: str):
    from tqdm import tqdm
    # a bar on a terminal only (disable=None), never into CI logs
    return tqdm(total=total, desc=desc, disable=None if progress else True, leave=False)


def _outcome(i, item, ok, value, stats):
    """An item's result, or its ``Failure`` (counted)."""
    if ok:
        return value
    stats["failures"] += 1
    return Failure(i, item, value)


def _run_local(task, items, groups, stats, progress, desc):
    task.setup()
    bar = _bar(len(items), progress, desc)
    try:
        for group in groups:
            for i, (ok, value) in zip(group, run_chunk(task, [items[i] for i in group])):
                bar.update(1)
                yield i, _outcome(i, items[i], ok, value, stats)
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------------
# processes

_PROCESS_TASK: dict = {}


def _exit_with_parent() -> None:
    """In a worker: exit as soon as the parent process is gone (killed or crashed). A daemon
    thread blocks on the parent's sentinel (a pipe that closes when the parent exits): no
    polling, and it works while the main thread computes."""
    import multiprocessing
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        wait([parent.sentinel])
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="naflow-parent-watch").start()


def _process_init(task: Task) -> None:
    _exit_with_parent()
    try:
        task.setup()
    except Exception as exc:  # noqa: BLE001 - reported with the first item, stops the run
        _PROCESS_TASK["error"] = one_line(exc)
    _PROCESS_TASK["task"] = task


def _process_call(chunk):
    if "error" in _PROCESS_TASK:
        return "setup", _PROCESS_TASK["error"]
    return "ok", run_chunk(_PROCESS_TASK["task"], chunk)


def _run_processes(task, items, groups, stats, progress, desc):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    if not items:
        return
    pool = ProcessPoolExecutor(stats["workers"], mp_context=multiprocessing.get_context("spawn"),
                               initializer=_process_init, initargs=(task,))
    bar = _bar(len(items), progress, desc)
    try:
        futures = {pool.submit(_process_call, [items[i] for i in group]): group
                   for group in groups}
        for fut in as_completed(futures):
            group = futures[fut]
            try:
                status, value = fut.result()
            except BrokenProcessPool:
                stats["worker_deaths"] = max(1, stats["worker_deaths"])
                status, value = "ok", [(False, "a worker process died (out of memory?); try "
                                        "fewer workers")] * len(group)
            if status == "setup":
                raise NAFlowError(f"worker set-up failed: {value}")
            for i, (ok, result) in zip(group, value):
                bar.update(1)
                yield i, _outcome(i, items[i], ok, result, stats)
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------
# ray


class _Worker:
    """The actor: one task, set up once. Wrapped with ``ray.remote`` when the backend starts."""

    def __init__(self, task: Task):
        self.task, self.error = task, None
        try:
            task.setup()
        except Exception as exc:  # noqa: BLE001 - reported by ready(), stops the run
            self.error = one_line(exc)

    def ready(self):
        import socket
        return self.error, socket.gethostname(), os.getpid()

    def run(self, indices: list[int], chunk: list):
        return run_chunk(self.task, chunk)


class _Slot:
    """One actor and what it holds: a set-up probe, then up to IN_FLIGHT_PER_WORKER chunks."""

    def __init__(self, actor_cls, task_ref):
        self.actor = actor_cls.remote(task_ref)     # actor_cls carries its options
        self.ready_ref = self.actor.ready.remote()
        self.ready = False
        self.pid = None                    # the actor's process, once set up
        self.dead = False
        self.in_flight: dict = {}          # object ref -> the chunk's item indices
        self.solo = False                  # holds one suspect item alone (see _run_ray)
        self.born = time.monotonic()


def _probe(address: str) -> None:
    """Fail at once on a HOST:PORT nobody listens on (Ray's own client retries for minutes)."""
    import socket
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise NAFlowError(f"cannot reach Ray at {address}: {exc.strerror or exc}") from None


def _init_ray(ray, address, workers) -> bool:
    """Connect to ``address``, or start a local instance (its workers share this process's
    environment and folder); True if this call connected (and so disconnects at the end). An
    existing connection (``ray.init`` by the caller) is used as it is."""
    if ray.is_initialized():
        return False
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
    if address:
        _probe(address)
        # a cluster started elsewhere: ship this naflow_onnx to its workers (they need its
        # dependencies: torch, onnxruntime, ...), so that driver and workers run the same code
        import naflow_onnx
        ray.init(address=address, runtime_env={"py_modules": [naflow_onnx]}, **quiet)
    else:
        ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, include_dashboard=False,
                 **quiet)
    return True


def _ray_chatter_to_stderr(gen):
    """While connected to Ray, what Ray prints on the driver's stdout (a raylet's "node marked
    dead" notice, seen mid-run after a node was killed) goes to stderr: stdout is the command's
    result (``--json``). The callers print their results after the run, not between items."""
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):
        yield from gen


def _run_ray(ray, task, items, groups, address, workers, retries, stats, progress, desc,
             stall_s):
    from ray.exceptions import RayError, RayTaskError
    try:
        started = _init_ray(ray, address, workers)
    except NAFlowError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad --address, a port in use, ...
        raise NAFlowError(f"cannot start or reach Ray{f' at {address}' if address else ''}: "
                          f"{one_line(exc)}") from None
    n = len(items)
    slots: list[_Slot] = []
    bar = _bar(n, progress, desc)
    try:
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        stats["workers"] = workers
        if n == 0:
            return
        actor_cls = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0,
                               scheduling_strategy="SPREAD")(_Worker)
        task_ref = ray.put(task)
        pending = collections.deque(groups)     # chunks of item indices
        # An actor that dies takes every item it holds; which one killed it is unknown (a
        # finished item's reply can be lost too). Those items become suspects: a suspect runs
        # alone (a chunk of one) on an actor, and only a death during such a solo run is
        # charged to the item.
        attempts = [0] * n         # deaths of the actor while the item ran on it alone
        suspect = [False] * n
        where: dict = {}            # object ref -> (slot, chunk or None for the ready probe)
        done = 0

        def spawn():
            slot = _Slot(actor_cls, task_ref)
            slots.append(slot)
            where[slot.ready_ref] = (slot, None)

        def bury(slot):
            if not slot.dead:
                slot.dead = True
                stats["worker_deaths"] += 1
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
                if done < n:
                    spawn()

        for _ in range(min(workers, len(groups))):
            spawn()
        deaths_before_ready = 0
        while done < n:
            for slot in slots:
                while slot.ready and not slot.dead and not slot.solo and pending and \
                        len(slot.in_flight) < IN_FLIGHT_PER_WORKER:
                    chunk = pending[0]
                    alone = suspect[chunk[0]]           # a suspect is always a chunk of one
                    if alone and slot.in_flight:
                        break                         # a suspect waits for an idle actor
                    pending.popleft()
                    ref = slot.actor.run.remote(chunk, [items[i] for i in chunk])
                    slot.in_flight[ref] = chunk
                    slot.solo = alone
                    where[ref] = (slot, chunk)
                    testhooks.reached("ray.dispatch", slot.pid)   # test-only pause point
            if not where:        # cannot happen: a dead actor is always replaced while items remain
                raise NAFlowError("internal error: no Ray worker left and items remain")
            ready, _ = ray.wait(list(where), num_returns=1, timeout=5.0)
            if not ready:
                live = [s for s in slots if not s.dead]
                if live and not any(s.ready for s in live) and \
                        time.monotonic() - min(s.born for s in live) > stall_s:
                    for i in [i for c in pending for i in c]:
                        yield i, Failure(i, items[i], f"no Ray worker started within {stall_s:.0f} s "
                                         "(no free CPU in the cluster?)")
                        stats["failures"] += 1
                        done += 1
                        bar.update(1)
                    pending.clear()
                    if done >= n:
                        break
                continue
            for ref in ready:
                slot, chunk = where.pop(ref)
                if chunk is None:                   # the set-up probe
                    try:
                        error, host, pid = ray.get(ref)
                    except RayError:
                        deaths_before_ready += 1
                        if deaths_before_ready > workers * (retries + 1):
                            raise NAFlowError(f"Ray workers keep dying during set-up "
                                              f"({deaths_before_ready} times): out of memory?") from None
                        bury(slot)
                        continue
                    if error is not None:
                        raise NAFlowError(f"worker set-up failed on {host}: {error}")
                    slot.ready, slot.pid = True, pid
                    continue
                try:
                    outcomes = ray.get(ref)
                except RayTaskError as exc:          # raised outside the task (e.g. pickling)
                    message = one_line(exc.cause if getattr(exc, "cause", None) else exc)
                    outcomes = [(False, message)] * len(chunk)
                except RayError as exc:              # the actor, its process or its node died
                    alone = slot.solo
                    bury(slot)
                    slot.in_flight.pop(ref, None)
                    for i in reversed(chunk):        # resubmitted in their order, each alone
                        if alone:
                            attempts[i] += 1
                        suspect[i] = True
                        if attempts[i] <= retries:
                            stats["resubmitted"] += 1
                            pending.appendleft([i])
                    chunk = [i for i in chunk if attempts[i] > retries]
                    if not chunk:
                        continue
                    outcomes = [(False, f"the Ray worker died {attempts[i]} times while processing "
                                 f"this item ({type(exc).__name__})") for i in chunk]
                slot.in_flight.pop(ref, None)
                slot.solo = False
                for i, (ok, value) in zip(chunk, outcomes):
                    done += 1
                    bar.update(1)
                    yield i, _outcome(i, items[i], ok, value, stats)
    finally:
        bar.close()
        for slot in slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if started:
            ray.shutdown()
