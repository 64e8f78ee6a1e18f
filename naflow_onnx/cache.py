"""The user cache: what depends only on the model, kept across processes (issue 17, cold start).

Folder: ``cache=`` a path, else ``$NAFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/naflow-onnx``, else
``~/.cache/naflow-onnx``. One file per (model sha256, what): ``<sha256>.<what>.npz``, written
atomically (``io.atomic_file``). A file is an ``.npz`` of plain arrays read with
``allow_pickle=False`` (nothing in the cache can run code) whose ``header`` array holds JSON:
schema, the versions of naflow_onnx, torch and onnxruntime, the model's sha256 and the key
(``what``). Anything that does not validate (unreadable, truncated, another model's, another
version's, wrong shapes or dtypes) is ignored and later rewritten, never trusted. A folder that
cannot be written makes the run work uncached, with one warning on stderr per folder.

Kept today (measured to pay, bench/README.md "Cold start"): the graph check (``graph``: the
model passed ``onnx.checker``, and what ``onnx.shape_inference`` added: value_info and the typed
outputs), and the solver memo entries that do not depend on the image (``SolverOptions.cache``):
the σ of an affine node (a convolution, a pool, a pad) by power iteration
(``("sigma", (node, input, shape without the batch))``) and the damped pseudo-inverse of a 1×1 convolution by float64 SVD
(``("pinv", node, damp)`` -> (P, W, s_max); W is the node's weight, rebuilt from the model, not
stored).
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

SCHEMA = "naflow-onnx/cache"
SCHEMA_VERSION = 2
_WARNED: set[str] = set()     # folders already warned about (once per process)


def default_dir() -> Path:
    """``$NAFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/naflow-onnx``, else ``~/.cache/naflow-onnx``."""
    if os.environ.get("NAFLOW_CACHE_DIR"):
        return Path(os.environ["NAFLOW_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "naflow-onnx"
    return Path.home() / ".cache" / "naflow-onnx"


def resolve(setting) -> Path | None:
    """The cache folder of an ``Analyzer(cache=...)`` setting: False/None -> no cache, True -> the
    default folder, a str or Path -> that folder."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return default_dir()
    return Path(setting).expanduser()


def versions() -> dict:
    import onnx
    import onnxruntime
    from . import __version__
    return {"naflow_onnx": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _warn_once(folder: Path, why: str) -> None:
    if str(folder) not in _WARNED:
        _WARNED.add(str(folder))
        print(f"naflow: warning: the cache folder '{folder}' cannot be written ({why}); "
              "working without a cache (--no-cache silences this)", file=sys.stderr)


class ModelCache:
    """The cache entries of one model (by its sha256) in one folder."""

    def __init__(self, folder: Path, sha256: str):
        self.folder, self.sha256 = Path(folder), sha256
        self.writable = True

    @classmethod
    def open(cls, setting, sha256: str) -> "ModelCache | None":
        folder = resolve(setting)
        return None if folder is None else cls(folder, sha256)

    def path(self, what: str) -> Path:
        return self.folder / f"{self.sha256}.{what}.npz"

    def _header(self, what: str, **extra) -> dict:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **versions(),
                "sha256": self.sha256, "key": what, **extra}

    def read(self, what: str, **expect) -> tuple[dict, dict[str, np.ndarray]] | None:
        """The header and arrays of entry ``what``, or None when absent or not valid (wrong
        schema, versions, sha256, key or any ``expect`` field; not an npz of plain arrays)."""
        path = self.path(what)
        try:
            if not path.is_file():
                return None
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            header = json.loads(arrays.pop("header").tobytes().decode("utf-8"))
        except Exception:    # corrupt, truncated, pickled, not a zip: ignored, rewritten later
            return None
        want = self._header(what, **expect)
        if not isinstance(header, dict) or any(header.get(k) != v for k, v in want.items()):
            return None
        return header, arrays

    def write(self, what: str, arrays: dict[str, np.ndarray], **fields) -> bool:
        """Entry ``what`` (header + ``fields``, and ``arrays``) written atomically; False (and one
        warning per folder) when the folder cannot be written."""
        from .errors import NAFlowError
        from .io import atomic_write
        if not self.writable:
            return False
        header = json.dumps(self._header(what, **fields)).encode("utf-8")
        buf = io.BytesIO()
        np.savez(buf, header=np.frombuffer(header, np.uint8), **arrays)
        try:
            if self.folder.exists() and not self.folder.is_dir():
                raise NotADirectoryError("a file is in its place")
            atomic_write(self.path(what), buf.getvalue())
        except (OSError, NAFlowError) as exc:
            self.writable = False
            _warn_once(self.folder, getattr(exc, "strerror", None) or str(exc))
            return False
        return True


# ---------------------------------------------------------------- the solver memo (point-free part)
def solver_key(device: torch.device) -> str:
    """Power iteration and SVDs give slightly different floats per device type: one entry each."""
    return f"solver-{device.type}"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pointwise_weight(mg, index: int) -> torch.Tensor | None:
    """The C_out × C_in × 1 × 1 weight initializer of Conv node ``index``, else None."""
    if not (isinstance(index, int) and 0 <= index < len(mg.nodes)):
        return None
    node = mg.nodes[index]
    w = mg.constants.get(node.inputs[1]) if node.op_type == "Conv" and len(node.inputs) > 1 else None
    return w if w is not None and w.dim() == 4 and tuple(w.shape[2:]) == (1, 1) else None


def load_solver_memo(cache: ModelCache, mg, device: torch.device, power_iter: int) -> dict:
    """The memo entries of the cache that validate against the model ``mg``: each σ of a node
    whose input it names, with a positive shape; each pinv of a 1×1 Conv initializer with P of shape
    (C_in, C_out), float64 below damping 0.01, finite. Anything else is left out."""
    entry = cache.read(solver_key(device), power_iter=power_iter)
    if entry is None:
        return {}
    header, arrays = entry
    memo: dict = {}
    try:
        for index, name, shape, sigma in header.get("sigma", []):
            if (isinstance(index, int) and 0 <= index < len(mg.nodes)
                    and isinstance(name, str) and name in mg.nodes[index].inputs
                    and isinstance(shape, list) and 1 <= len(shape) <= 5
                    and all(isinstance(s, int) and s > 0 for s in shape)
                    and _finite(sigma) and sigma >= 0):
                memo[("sigma", (index, name, tuple(shape)))] = float(sigma)
        for rec in header.get("pinv", []):
            index, damp, s_max, name = rec["node"], rec["damp"], rec["s_max"], rec["array"]
            w = _pointwise_weight(mg, index)
            P = arrays.get(name) if isinstance(name, str) else None
            if (w is None or P is None or not _finite(damp) or damp < 0 or not _finite(s_max)
                    or P.dtype not in (np.float32, np.float64)
                    or (damp < 0.01 and P.dtype != np.float64)
                    or P.shape != (w.shape[1], w.shape[0]) or not np.isfinite(P).all()):
                continue
            P = torch.from_numpy(P).to(device)
            W = w.reshape(w.shape[0], w.shape[1]).double().to(device).to(P.dtype)
            memo[("pinv", index, float(damp))] = (P, W, float(s_max))
    except (TypeError, ValueError, KeyError, AttributeError):
        return {}          # a malformed header: the whole entry is ignored
    return memo


def save_solver_memo(cache: ModelCache, mg, memo: dict, device: torch.device,
                     power_iter: int) -> bool:
    """The point-independent memo entries as one cache entry (σ in the header, exact as JSON
    floats; each pinv's P as an array of its own dtype)."""
    sigma, pinv, arrays = [], [], {}
    for key, value in memo.items():
        if key[0] == "sigma":
            index, name, shape = key[1]
            sigma.append([int(index), str(name), [int(s) for s in shape], float(value)])
        elif key[0] == "pinv" and _pointwise_weight(mg, key[1]) is not None:
            name = f"pinv_{len(pinv)}"
            arrays[name] = value[0].detach().cpu().numpy()
            pinv.append({"node": int(key[1]), "damp": float(key[2]), "s_max": float(value[2]),
                         "array": name})
    return cache.write(solver_key(device), arrays, power_iter=power_iter, sigma=sigma, pinv=pinv)


# ---------------------------------------------------------------- the graph check (graph.load_model)
def load_checked(cache: ModelCache, model, in_place: bool):
    """Entry ``graph`` applied to ``model`` (in place, else to a copy): its value_info and outputs
    become those that shape inference gave, and the model passed onnx.checker. None (model
    untouched) when there is no valid entry: the outputs must be the model's, by name and order,
    and every value_info a node output of the model."""
    import onnx
    entry = cache.read("graph")
    if entry is None or "graph" not in entry[1]:
        return None
    try:
        inferred = onnx.GraphProto.FromString(entry[1]["graph"].tobytes())
    except Exception:
        return None
    g = model.graph
    produced = {t for n in g.node for t in n.output}
    if ([o.name for o in inferred.output] != [o.name for o in g.output] or inferred.node
            or inferred.initializer or any(v.name not in produced for v in inferred.value_info)):
        return None
    if not in_place:
        original, model = model, onnx.ModelProto()
        model.CopyFrom(original)
    g = model.graph
    del g.value_info[:]
    g.value_info.extend(inferred.value_info)
    del g.output[:]
    g.output.extend(inferred.output)
    return model


def save_checked(cache: ModelCache, model) -> bool:
    """Entry ``graph`` of a model that passed onnx.checker, after shape inference."""
    import onnx
    blob = onnx.GraphProto(value_info=model.graph.value_info,
                           output=model.graph.output).SerializeToString()
    return cache.write("graph", {"graph": np.frombuffer(blob, np.uint8)})
