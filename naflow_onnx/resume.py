"""Resumable output folders: a run over many images builds its output in a staging folder next
to it, one entry folder per finished image with a small marker file inside, so that ``--resume``
can skip what is already done.

Layout while a run goes on (``OUT`` = the output folder the user named)::

    .OUT.partial/                          staging folder, renamed to OUT when the run ends
        000_cat/flow.json ...              one entry per finished image, written to a temporary
        000_cat/.naflow-state.json         folder and renamed into place with its marker inside:
                                           an entry folder that exists is complete

The marker holds ``{"schema": "naflow-onnx/state", "key": ..., ...}``; ``key`` is the sha256 of
everything the entry depends on (model and image file contents, every option that changes the
result, the naflow-onnx version). With ``resume=True`` an image is skipped when its entry exists
with the same key in the staging folder (a run that was interrupted or failed) or in ``OUT``
itself (a finished run; the entry is hard-linked into the staging folder). Without ``resume`` a
leftover staging folder is removed first. When the run ends, the staging folder replaces ``OUT``
in one rename (``io.replace_dir``, as ``io.atomic_dir`` does), markers included, so a later
``--resume`` can build on a finished run too.

``OUT`` and the staging folder follow the output-folder rule of ``naflow_onnx.io``: both must be
absent, empty or naflow's own (the ``.naflow-output`` marker, written into every staging folder);
anything else is refused before anything is touched.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError
from .io import MARKER as OUTPUT_MARKER
from .io import (atomic_write, check_output_dir, current_umask, make_staging_dir, replace_dir,
                 write_marker)

MARKER = ".naflow-state.json"
STATE_SCHEMA = "naflow-onnx/state"
STATE_VERSION = 1


def digest(obj) -> str:
    """sha256 of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def path_digest(path) -> str | None:
    """sha256 of a file's content; of a folder, of its files' names and contents (recursive);
    None when the path does not exist."""
    p = Path(path)
    if p.is_file():
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if p.is_dir():
        return digest([[str(f.relative_to(p)), path_digest(f)] for f in sorted(p.rglob("*"))
                       if f.is_file()])
    return None


def _locked(folder: Path) -> int | None:
    """An fd of ``folder`` holding an exclusive flock, or None when another process holds it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class RunState:
    """The staging folder of one run and its entries (see the module docstring).
    ``markers=False`` (a one-image run): a temporary staging folder as ``io.atomic_dir``'s,
    nothing to resume, removed on failure."""

    def __init__(self, out, *, resume: bool = False, markers: bool = True,
                 command: str = "naflow"):
        self.out = Path(out)
        self.command = command
        parent = self.out.parent if str(self.out.parent) else Path(".")
        self.stage = parent / f".{self.out.name}.partial"
        self.resume, self.markers = bool(resume), markers
        self.reused = 0
        self._open = False
        self._lock = None           # the flock'ed fd of the staging folder (markers=True)

    def open(self) -> Path:
        if not self._open:
            check_output_dir(self.out)
            if not self.markers:    # nothing to resume: a fresh temporary name, as atomic_dir
                self.stage = make_staging_dir(self.out, self.command)
            else:
                try:
                    self._lock_stage()
                except OSError as exc:
                    raise OutputError(f"cannot write to output folder '{self.out}': "
                                      f"{exc.strerror or exc}") from None
            self._open = True
        return self.stage

    def _lock_stage(self) -> None:
        """Own the fixed-name staging folder for this run: hold an exclusive lock on it (flock on
        the folder) until ``finish`` or ``abandon``. An existing one (an earlier run's leftover)
        must be naflow's; it is emptied unless ``resume``. One that another live run holds is
        refused: two runs never write one staging folder."""
        for _ in range(5):
            if check_output_dir(self.stage) == "absent":
                tmp = make_staging_dir(self.out, self.command)
                fd = _locked(tmp)
                try:
                    os.rename(tmp, self.stage)  # onto an absent path (or an empty folder)
                except OSError as exc:
                    os.close(fd)
                    shutil.rmtree(tmp, ignore_errors=True)
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                        raise
                    continue                    # another run created it meanwhile: look again
                self._lock = fd
                return
            try:
                fd = _locked(self.stage)
            except FileNotFoundError:
                continue                        # renamed away meanwhile: look again
            if fd is None:
                raise OutputError(f"output folder '{self.out}' is being written by another "
                                  f"naflow run (its staging folder '{self.stage}' is in use)")
            if os.fstat(fd).st_ino != _inode(self.stage):
                os.close(fd)                    # it became OUT meanwhile: look again
                continue
            self._lock = fd
            if not self.resume:                 # an owned leftover of an earlier run: emptied
                for entry in self.stage.iterdir():
                    if entry.name != OUTPUT_MARKER:
                        (shutil.rmtree if entry.is_dir() and not entry.is_symlink()
                         else os.unlink)(entry)
            write_marker(self.stage, self.command)
            return
        raise OutputError(f"output folder '{self.out}': its staging folder '{self.stage}' keeps "
                          "changing under other runs")

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def lookup(self, folder: str, key: str) -> dict | None:
        """The marker of the finished entry ``folder`` (relative to OUT) with this ``key``
        (hard-linked into the staging folder if it was found in OUT), or None: the image has to
        be processed."""
        if not (self.resume and self.markers):
            return None
        stage = self.open()
        for root in (stage, self.out):
            try:
                rec = json.loads((root / folder / MARKER).read_text())
            except (OSError, ValueError):
                continue
            if rec.get("schema") != STATE_SCHEMA or rec.get("key") != key:
                continue
            if root == self.out:
                dst = stage / folder
                if dst.exists():
                    shutil.rmtree(dst)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(root / folder, dst, copy_function=_link_or_copy)
            self.reused += 1
            return rec
        return None

    def commit(self, folder: str, key: str, files: dict[str, bytes],
               record: dict | None = None) -> None:
        """Write one finished entry: ``files`` (paths relative to ``folder``, itself relative to
        the staging folder) and its marker, in one rename. ``folder = ""`` writes the files into
        the staging folder itself, one by one, without a marker."""
        stage = self.open()
        if not folder:
            for rel, data in files.items():
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                atomic_write(stage / rel, data)
            return
        tmp = Path(tempfile.mkdtemp(prefix=".entry-", dir=stage))
        try:
            os.chmod(tmp, 0o777 & ~current_umask())        # as a plain mkdir would create it
            for rel, data in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            if self.markers:
                rec = {"schema": STATE_SCHEMA, "schema_version": STATE_VERSION, "key": key,
                       **(record or {})}
                (tmp / MARKER).write_text(json.dumps(rec, indent=1) + "\n")
            dst = stage / folder
            if dst.exists():
                shutil.rmtree(dst)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def has_entries(self) -> bool:
        return self.markers and self.stage.is_dir() and next(self.stage.rglob(MARKER), None) is not None

    def finish(self) -> Path:
        """The staging folder replaces OUT in one rename."""
        try:
            replace_dir(self.open(), self.out)
        finally:
            self._unlock()
        self._open = False
        return self.out

    def abandon(self) -> None:
        """After an error or an interrupt: keep the staging folder when it holds finished
        entries (for ``--resume``), else remove it."""
        if self._open and not self.has_entries():
            shutil.rmtree(self.stage, ignore_errors=True)
        self._unlock()
        self._open = False
