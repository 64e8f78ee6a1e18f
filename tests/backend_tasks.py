"""Tasks for tests/test_backends.py: importable by spawned worker processes (tests/ is on their
path), so they cannot live in the test module itself."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from naflow_onnx.backends import Task


class Square(Task):
    """item -> (item², worker pid); item 3 raises; ``setup`` records that it ran."""

    def __init__(self, fail_setup: bool = False):
        self.fail_setup, self.ready = fail_setup, False

    def setup(self) -> None:
        if self.fail_setup:
            raise RuntimeError("no model here")
        self.ready = True

    def __call__(self, item):
        assert self.ready
        if item == 3:
            raise ValueError("three is refused\nsecond line")
        return item * item, os.getpid()


class Block(Task):
    """Writes ``<folder>/<pid>`` when an item starts, then blocks for ever (until its process
    ends): a worker that is known to be computing when its parent is killed."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, item):
        Path(self.folder, str(os.getpid())).write_text(str(item))
        threading.Event().wait()


class BatchSquare(Square):
    """Square with a ``run_batch``: item -> (item², worker pid, the chunk it was computed in, or
    None when computed alone); a chunk holding 3 raises as a whole."""

    def __call__(self, item):
        return (*super().__call__(item), None)

    def run_batch(self, chunk):
        assert self.ready
        if 3 in chunk:
            raise ValueError("a batch with three")
        return [(x * x, os.getpid(), tuple(chunk)) for x in chunk]


class PlainSquare:
    """Not a ``Task`` subclass (like AnalyzeTask, CheckTask): set-up and call only."""

    def setup(self) -> None:
        pass

    def __call__(self, item):
        return item * item
