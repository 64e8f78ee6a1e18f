"""Result files (schema in README "Output contract"), owned output folders and atomic writes.

The one home of how naflow writes to disk:

* An output folder is *owned*: every folder naflow writes holds a marker file ``.naflow-output``
  (JSON: command, version, time). ``--out DIR`` may name a new path, an empty folder, or a
  folder holding the marker (naflow's own earlier output, which is replaced); anything else (a
  file, a folder with foreign content, the current folder or one of its parents, a symbolic
  link) is refused with one line (``OutputError``) before anything is touched. Nothing naflow
  did not write is ever deleted.
* A folder is written under a temporary sibling (``.NAME.tmp-*``) and renamed into place at the
  end (``atomic_dir``, ``replace_dir``), so an error or Ctrl-C never leaves a half-written
  folder, and two runs racing for one folder end with one whole result.
* A single file (``-o``) is written to a temporary sibling and renamed (``atomic_file``,
  ``atomic_write``); an existing file is only overwritten when a check says it is one of ours
  (``check_output_file``: an ONNX model for export, a baseline for ``naflow baseline``).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import testhooks
from .errors import OutputError

MARKER = ".naflow-output"
MARKER_SCHEMA = "naflow-onnx/output"
_RULE = "give a new path, an empty folder or an earlier naflow output folder"


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_owned(folder) -> bool:
    """``folder`` holds naflow's marker (it is naflow's own output)."""
    try:
        rec = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and rec.get("schema") == MARKER_SCHEMA


def write_marker(folder, command: str) -> None:
    from . import __version__
    rec = {"schema": MARKER_SCHEMA, "command": command, "version": __version__,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (Path(folder) / MARKER).write_text(json.dumps(rec, indent=1) + "\n")


def _refuse_special(p: Path, what: str, advice: str = _RULE) -> None:
    if p.is_symlink():
        raise OutputError(f"{what} '{p}' is a symbolic link; {advice}")
    resolved, cwd = p.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(f"{what} '{p}' is the current folder or one of its parents; {advice}")


def check_output_dir(target) -> str:
    """May naflow write the folder ``target``? ``"absent"``, ``"empty"`` or ``"owned"``
    (replaced when the run ends); else an OutputError naming the path, nothing touched."""
    p = Path(target)
    _refuse_special(p, "output folder")
    if not p.exists():
        return "absent"
    if not p.is_dir():
        raise OutputError(f"output folder '{p}' is an existing file; {_RULE}")
    try:
        empty = next(p.iterdir(), None) is None
    except OSError as exc:
        raise OutputError(f"cannot read output folder '{p}': {exc.strerror or exc}") from None
    if empty:
        return "empty"
    if is_owned(p):
        return "owned"
    raise OutputError(f"output folder '{p}' holds files naflow did not write (no {MARKER} "
                      f"marker); {_RULE}")


def make_staging_dir(target, command: str) -> Path:
    """A new marked folder with a fresh temporary name next to ``target``, to build its
    content in."""
    target = Path(target)
    parent = _parent(target)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        os.chmod(tmp, 0o777 & ~current_umask())        # as a plain mkdir would create it
        write_marker(tmp, command)
    except OSError as exc:
        raise OutputError(f"cannot write to output folder '{target}': {exc.strerror or exc}") from None
    return tmp


def replace_dir(src, target) -> Path:
    """The finished folder ``src`` (naflow's, next to ``target``) becomes ``target`` in one
    rename; an owned ``target`` is moved aside first and removed after. Another run that renames
    its own result into place meanwhile is replaced in turn (the last to finish wins, each
    result whole); a ``target`` that became foreign meanwhile is refused (OutputError)."""
    src, target = Path(src), Path(target)
    for _ in range(5):
        kind = check_output_dir(target)
        testhooks.reached("output.replace")
        if kind != "owned":
            try:
                os.rename(src, target)      # onto an absent path or an empty folder
                return target
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise OutputError(f"cannot write output folder '{target}': "
                                      f"{exc.strerror or exc}") from None
                continue                    # someone wrote it meanwhile: look again
        try:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=_parent(target)))
        except OSError as exc:
            raise OutputError(f"cannot write output folder '{target}': {exc.strerror or exc}") from None
        try:
            try:
                os.rename(target, old / "previous")
            except FileNotFoundError:
                continue                    # another run moved it away first: look again
            except OSError as exc:
                raise OutputError(f"cannot replace output folder '{target}': "
                                  f"{exc.strerror or exc}") from None
            testhooks.reached("output.moved-aside")
            try:
                os.rename(src, target)
                return target
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise OutputError(f"cannot write output folder '{target}': "
                                      f"{exc.strerror or exc}") from None
        finally:
            shutil.rmtree(old, ignore_errors=True)
    raise OutputError(f"output folder '{target}' keeps being rewritten by other runs; this run's "
                      "result was not kept")


@contextlib.contextmanager
def atomic_dir(target, command: str = "naflow"):
    """Yield a temporary marked folder; on success it replaces ``target`` in one rename. Refuses
    (OutputError, nothing touched) a ``target`` naflow may not write (``check_output_dir``)."""
    target = Path(target)
    check_output_dir(target)
    tmp = make_staging_dir(target, command)
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_file(path, what: str, is_ours) -> None:
    """May naflow write the file ``path``? Absent, or an existing regular file for which
    ``is_ours(path)`` is true (e.g. it parses as an ONNX model); else an OutputError."""
    p = Path(path)
    _refuse_special(p, what, "give a new path")
    if not p.exists():
        return
    if not p.is_file():
        raise OutputError(f"{what} '{p}' exists and is not a file; give a new path")
    if not is_ours(p):
        raise OutputError(f"{what} '{p}' exists and is not {is_ours.__doc__ or 'a naflow file'}; "
                          "naflow overwrites only its own kind of file: give a new path")


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename
    (with the permissions a plain open() would give)."""
    path = Path(path)
    try:
        _parent(path).mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=_parent(path))
    except OSError as exc:
        raise OutputError(f"cannot write '{path}': {exc.strerror or exc}") from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path, data: bytes) -> None:
    """``data`` into ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz that ``np.load`` reads, byte-identical for identical arrays (fixed zip times)."""
    import zipfile
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr, dtype=np.float32),
                                          allow_pickle=False)


def json_safe(x):
    """Strict JSON: a non-finite float becomes the string "inf" / "-inf" (a damping t = inf,
    recorded in options and solver records) or null (NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_flow_files(flow, folder: Path, dpi: int = 110, partner=None) -> None:
    """flow.json, maps.npz (and compare_maps.npz), flow.png into an existing folder. With a
    ``partner`` (the reference side of a similarity pair) its files go to ``folder/reference/``
    and flow.png shows both sides."""
    import matplotlib.pyplot as plt
    if partner is not None:
        (folder / "reference").mkdir(exist_ok=True)
        write_flow_files(partner, folder / "reference", dpi)
    write_json(folder / "flow.json", flow.to_json())
    write_npz(folder / "maps.npz", flow.maps)
    if flow.compare_maps:
        write_npz(folder / "compare_maps.npz", flow.compare_maps)
    fig = flow.plot(partner=partner)
    fig.savefig(folder / "flow.png", dpi=dpi)
    plt.close(fig)


def save_flow(flow, directory) -> Path:
    with atomic_dir(directory, "Flow.save") as tmp:
        write_flow_files(flow, tmp)
    return Path(directory)
