"""Test-only pause points. Nothing here is for users: nothing happens unless a test asks for it.

A pause point is one line at a known place of a run (``reached("analyze.image")``). Tests use it
to act at that place deterministically, never after a sleep:

* in this process: ``with pause("check.result", fn): ...`` calls ``fn(count)`` each time the point
  is reached (``count`` = how many times so far in this ``with``), while the run waits;
* in a child process: the environment variable ``NAFLOW_TEST_PAUSE = "NAME:N:WFD:RFD"`` (two pipe
  ends passed to the child with ``pass_fds``) makes the N-th arrival at NAME write one line to WFD
  and then wait until RFD yields a byte or closes; the test does what it needs meanwhile (sends
  SIGINT, kills a worker) and then writes or closes its end.
"""
from __future__ import annotations

import contextlib
import os

ENV = "NAFLOW_TEST_PAUSE"
_callbacks: dict = {}          # name -> [callback, count]
_env_counts: dict = {}


@contextlib.contextmanager
def pause(name: str, callback):
    """Call ``callback(count)`` at every arrival at ``name`` in this process while in the block."""
    _callbacks[name] = [callback, 0]
    try:
        yield
    finally:
        _callbacks.pop(name, None)


def reached(name: str, detail=None) -> None:
    """A pause point (a no-op unless a test has set one up for ``name``). ``detail``, when given,
    is passed to the callback after the count (e.g. the pid of the Ray actor an item went to)."""
    entry = _callbacks.get(name)
    if entry is not None:
        entry[1] += 1
        entry[0](entry[1]) if detail is None else entry[0](entry[1], detail)
    spec = os.environ.get(ENV)
    if spec and spec.split(":")[0] == name:
        _, n, wfd, rfd = spec.split(":")
        _env_counts[name] = _env_counts.get(name, 0) + 1
        if _env_counts[name] == int(n):
            os.write(int(wfd), f"{name} {n}\n".encode())
            os.read(int(rfd), 1)        # until the test writes or closes its end
