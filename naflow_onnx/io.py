"""Result files (schema in README "Output contract") and atomic writes.

A result folder is written under a temporary sibling name and renamed into place at the end, so
an error or Ctrl-C never leaves a half-written folder behind.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import OutputError


@contextlib.contextmanager
def atomic_dir(target):
    """Yield a temporary folder; on success it replaces ``target`` in one rename."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot write to output folder '{target}': {exc.strerror or exc}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
        os.rename(target, old / "previous")
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    with atomic_dir(directory) as tmp:
        write_flow_files(flow, tmp)
    return Path(directory)
