"""Evaluation items: an image with its ground-truth object mask and the class to explain.

Three sources, chosen by ``naflow evaluate --dataset``:

* ``synthetic`` - the generated benchmark (``synthetic.make_dataset``; seed 3 by default, so it
  is disjoint from the training seed 1 and the test seed 2); mask = the target's pixels,
  target = the true class.
* ``PATH.npz`` - a data set written by ``synthetic.save_dataset`` (images, labels, masks).
* ``photos`` - the skimage photos with hand-drawn boxes in ``data/photo_boxes.json`` (or
  ``--boxes FILE``); mask = the box, target = the model's top-1 class (ImageNet has no label
  for some of them, e.g. the astronaut).

Images are given to the analysis as they are; the mask must be in the coordinates of the
network-input view (``preprocess.load_image``), which ``Item.mask_for`` provides.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NAFlowError

DEFAULT_SEED = 3
BOXES = Path(__file__).resolve().parents[2] / "data" / "photo_boxes.json"


@dataclass
class Item:
    index: int
    name: str
    image: object                 # uint8 H×W×3 array or a file path
    target: int | None            # class to explain; None = top-1
    label: int | None = None      # true class when known
    mask: np.ndarray | None = None          # bool mask at the image's own size
    box: list | None = None                 # [x0, y0, x1, y1] in original pixels (photos)
    original_size: tuple | None = None      # (width, height) of the original photo
    info: dict = field(default_factory=dict)

    def mask_for(self, view_shape: tuple[int, int]) -> np.ndarray:
        """The ground-truth mask in the network-input view of shape (H, W)."""
        h, w = view_shape
        if self.box is not None:
            from ..preprocess import map_box
            x0, y0, x1, y1 = map_box(self.box, self.original_size, (h, w))
            m = np.zeros((h, w), bool)
            m[y0:y1, x0:x1] = True
            return m
        if self.mask.shape != (h, w):
            raise NAFlowError(f"item {self.name}: mask {self.mask.shape} does not fit the network "
                              f"input {h}×{w}; give images at the model's input size")
        return self.mask


def synthetic_items(n: int, seed: int = DEFAULT_SEED, size: int = 96) -> list[Item]:
    from .synthetic import make_dataset
    data = make_dataset(n, seed, size)
    return _from_arrays(data, f"synthetic seed {seed}")


def npz_items(path, n: int | None = None) -> list[Item]:
    from .synthetic import load_dataset
    p = Path(path)
    if not p.is_file():
        raise NAFlowError(f"data set not found: {p}")
    try:
        data = load_dataset(p)
    except Exception as exc:
        raise NAFlowError(f"{p}: not a data set written by save_dataset ({type(exc).__name__}: {exc})") from None
    if n is not None:
        data = {k: (v[:n] if isinstance(v, np.ndarray) else v) for k, v in data.items()}
    return _from_arrays(data, p.name)


def _from_arrays(data: dict, source: str) -> list[Item]:
    return [Item(index=i, name=f"{source}#{i}", image=data["images"][i], target=int(data["labels"][i]),
                 label=int(data["labels"][i]), mask=data["masks"][i]) for i in range(len(data["labels"]))]


def photo_items(boxes: Path | None = None, names: list[str] | None = None) -> list[Item]:
    path = Path(boxes) if boxes else BOXES
    if not path.is_file():
        raise NAFlowError(f"photo boxes not found: {path} (give --boxes FILE)")
    spec = json.loads(path.read_text())
    spec = {k: v for k, v in spec.items() if isinstance(v, dict) and "box" in v}
    unknown = sorted(set(names or []) - set(spec))
    if unknown:
        raise NAFlowError(f"--photos: unknown photo(s) {', '.join(unknown)}; {path.name} has "
                          f"{', '.join(spec)}")
    found = importlib.util.find_spec("skimage")
    if found is None:
        raise NAFlowError("--dataset photos needs scikit-image (its photos): pip install scikit-image")
    root = Path(found.submodule_search_locations[0]) / "data"
    items = []
    for i, name in enumerate(names or list(spec)):
        s = spec[name]
        f = root / s["file"]
        if not f.is_file():
            raise NAFlowError(f"photo {name}: {f} not found in scikit-image's data")
        items.append(Item(index=i, name=name, image=str(f), target=None, box=list(s["box"]),
                          original_size=tuple(s["size"]), info={"expected": s.get("imagenet_classes", [])}))
    return items


def load_items(dataset: str, n: int | None, seed: int = DEFAULT_SEED, size: int = 96,
               boxes: str | None = None, photos: str | None = None) -> tuple[list[Item], dict]:
    """Items and a description of the data set for the report."""
    if dataset == "synthetic":
        n = 200 if n is None else n
        return synthetic_items(n, seed, size), {"kind": "synthetic", "n": n, "seed": seed, "size": size}
    if dataset == "photos":
        names = [p.strip() for p in photos.split(",")] if photos else None
        items = photo_items(Path(boxes) if boxes else None, names)
        if n is not None:
            items = items[:n]
        return items, {"kind": "photos", "n": len(items), "boxes": str(Path(boxes) if boxes else BOXES),
                       "photos": [it.name for it in items]}
    if dataset.endswith(".npz"):
        items = npz_items(dataset, n)
        return items, {"kind": "npz", "path": dataset, "n": len(items)}
    raise NAFlowError(f"--dataset must be 'synthetic', 'photos' or a .npz file, not '{dataset}'")
