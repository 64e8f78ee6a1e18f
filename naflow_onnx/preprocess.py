"""Image loading and preprocessing: presets, explicit overrides, and the model's metadata_props.

A preprocessing maps an image file to the network input: resize the shorter side to the input
size and centre-crop, scale pixels (``x = (pixel / divisor - mean) / std`` per channel, in the
model's channel order), and lay out as NCHW or NHWC. The cropped RGB view is what overlays use.
"""
from __future__ import annotations

import json
import warnings
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError, PreprocessError

METADATA_KEY = "naflow.preprocess"
# an image file over this many pixels is refused before it is decoded (PIL's own limit, above
# which it warns; a 110 kB PNG can declare 30000 x 30000 pixels): --max-image-pixels changes it
DEFAULT_MAX_IMAGE_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)

PRESETS = {
    "imagenet": dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], divisor=255.0,
                     channel_order="RGB"),
    "caffe-bgr": dict(mean=[104.0, 117.0, 123.0], std=[1.0, 1.0, 1.0], divisor=1.0,
                      channel_order="BGR"),
    "none": dict(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], divisor=255.0, channel_order="RGB"),
    # Ultralytics exports (YOLOv5/v8 ...): RGB / 255, the whole image letterboxed to imgsz
    "yolo": dict(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], divisor=255.0, channel_order="RGB",
                 resize="letterbox"),
}


@dataclass
class Preprocess:
    name: str = "imagenet"
    mean: list = field(default_factory=lambda: list(PRESETS["imagenet"]["mean"]))
    std: list = field(default_factory=lambda: list(PRESETS["imagenet"]["std"]))
    divisor: float = 255.0
    channel_order: str = "RGB"
    layout: str = "NCHW"
    size: tuple | None = None     # (height, width)
    channels: int = 3
    source: str = "default"       # default | preset | metadata | options
    resize: str = "crop"          # crop (shorter side, centre crop) | letterbox (YOLO: pad 114)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        return d

    def to_input(self, view: np.ndarray) -> np.ndarray:
        """uint8 H×W×3 RGB view -> float32 network input with batch dim 1."""
        return self.to_batch(view[None])

    def to_batch(self, views: np.ndarray) -> np.ndarray:
        """uint8 B×H×W×3 RGB views -> float32 network input with batch dim B."""
        x = views.astype(np.float32)
        if self.channel_order == "BGR":
            x = x[..., ::-1]
        if self.channels == 1:
            x = x.mean(axis=-1, keepdims=True)
        channels = x.shape[-1]
        mean = np.asarray(self.mean[:channels], np.float64)
        std = np.asarray(self.std[:channels], np.float64)
        # (x / divisor - mean) / std as one multiply-add in place
        x *= (1.0 / (self.divisor * std)).astype(np.float32)
        x -= (mean / std).astype(np.float32)
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=np.float32)


def _from_options(base: Preprocess, mean=None, std=None, size=None, layout=None,
                  divisor=None, channel_order=None) -> Preprocess:
    changes = {k: v for k, v in dict(mean=mean, std=std, layout=layout, divisor=divisor,
                                     channel_order=channel_order).items() if v is not None}
    if size is not None:
        changes["size"] = (size, size) if isinstance(size, int) else tuple(size)
    if changes:
        changes["source"] = "options" if base.source == "default" else base.source + "+options"
    return replace(base, **changes)


def preset(name: str) -> Preprocess:
    if name not in PRESETS:
        raise PreprocessError(f"unknown preprocessing preset '{name}' "
                              f"(choose from {', '.join(PRESETS)})")
    return Preprocess(name=name, source="preset", **{k: (list(v) if isinstance(v, list) else v)
                                                     for k, v in PRESETS[name].items()})


def _divisor(d: dict, default: float) -> float:
    """The canonical key is ``divisor`` (x = pixel / divisor); a ``scale`` key is accepted as a
    multiplier when <= 1 (1/255) and as a divisor when > 1 (255)."""
    if "divisor" in d:
        return float(d["divisor"])
    if "scale" in d:
        scale = float(d["scale"])
        return scale if scale > 1 else 1.0 / scale
    return default


def _ultralytics(metadata: dict[str, str]) -> Preprocess | None:
    """Ultralytics' metadata (``task``, ``imgsz``): the ``yolo`` preset at imgsz."""
    if "task" not in metadata or "imgsz" not in metadata:
        return None
    try:
        size = json.loads(metadata["imgsz"])
    except json.JSONDecodeError:
        return None
    size = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
    return replace(preset("yolo"), size=size, source="metadata")


def from_metadata(metadata: dict[str, str]) -> Preprocess | None:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return _ultralytics(metadata)
    try:
        d = json.loads(raw)
    except json.JSONDecodeError:
        d = {"name": raw}
    if isinstance(d, str):
        d = {"name": d}
    base = preset(d["name"]) if d.get("name") in PRESETS else Preprocess(name=d.get("name", "custom"))
    size = d.get("size")
    if isinstance(size, int):
        size = (size, size)
    return replace(base, mean=d.get("mean", base.mean), std=d.get("std", base.std),
                   divisor=_divisor(d, base.divisor),
                   channel_order=d.get("channel_order", base.channel_order),
                   layout=d.get("layout", base.layout), size=tuple(size) if size else None,
                   source="metadata")


def resolve(input_shape: list, metadata: dict[str, str], name: str | None = None,
            **overrides) -> Preprocess:
    """Choose the preprocessing: a preset or the model's metadata, then explicit overrides, then
    layout and size read from the input shape. Raises when the result does not fit the input."""
    base = preset(name) if name else (from_metadata(metadata) or Preprocess())
    pp = _from_options(base, **overrides)
    dims = list(input_shape)
    if overrides.get("layout") is None:
        if dims[1] in (1, 3) and dims[3] not in (1, 3):
            pp = replace(pp, layout="NCHW")
        elif dims[3] in (1, 3) and dims[1] not in (1, 3):
            pp = replace(pp, layout="NHWC")
    h, w, c = (dims[2], dims[3], dims[1]) if pp.layout == "NCHW" else (dims[1], dims[2], dims[3])
    if c not in (None, 1, 3):
        raise PreprocessError(f"preprocessing layout {pp.layout} reads {c} channels from the model "
                              f"input {dims}: images have 1 or 3 (use --layout)")
    pp = replace(pp, channels=c or 3)
    if h is not None and w is not None:
        if pp.size is not None and tuple(pp.size) != (h, w):
            raise PreprocessError(f"preprocessing size {pp.size[0]}x{pp.size[1]} does not fit the "
                                  f"model input {dims} ({pp.layout}: {h}x{w})")
        pp = replace(pp, size=(h, w))
    elif pp.size is None:
        raise PreprocessError(f"the model input {dims} has dynamic spatial dims: give --size")
    if dims[0] not in (None, 1):
        raise PreprocessError(f"the model input {dims} has a fixed batch of {dims[0]}; "
                              "a dynamic batch or 1 is needed")
    return pp


def _to_rgb_uint8(img: Image.Image, where: str) -> tuple[np.ndarray, str | None]:
    note = None
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{where}: the image is empty (0 pixels)")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0, 0, 255).astype(np.uint8)
        note = f"converted from {img.mode} (high bit depth) to 8-bit"
        img = Image.fromarray(a, mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
        note = "alpha channel composited on white"
    if img.mode != "RGB":
        note = note or f"converted from mode {img.mode} to RGB"
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8), note


def open_image(path, max_pixels: int | None = None) -> Image.Image:
    """A decoded image file; a folder, an empty, unreadable or truncated file, or one over
    ``max_pixels`` (default ``DEFAULT_MAX_IMAGE_PIXELS``; checked on the header, before
    decoding) is an ImageError naming the path."""
    path = Path(path)
    limit = DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    if path.is_dir():
        raise ImageError(f"{path}: a folder, not an image file")
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: cannot read the image (empty file, 0 bytes)")
    if limit > 2 * (Image.MAX_IMAGE_PIXELS or limit):
        Image.MAX_IMAGE_PIXELS = limit      # PIL's own check must not refuse first
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)          # reads the header only
            if img.width * img.height > limit:
                raise ImageError(f"{path}: {img.width}x{img.height} = {img.width * img.height} "
                                 f"pixels exceeds the limit of {limit} pixels (--max-image-pixels)")
            img.load()
    except Image.DecompressionBombError:    # PIL's own check (at twice its limit) came first
        raise ImageError(f"{path}: the image exceeds the limit of {limit} pixels "
                         "(--max-image-pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, zlib.error) as exc:
        raise ImageError(f"{path}: cannot read the image ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from None
    return img


def load_image(source, size: tuple[int, int], max_pixels: int | None = None,
               resize: str = "crop") -> tuple[np.ndarray, str | None]:
    """An image path, PIL image or H×W×3 uint8 array -> (uint8 view at ``size``, note).

    ``crop``: the shorter side is resized to cover ``size``, then the centre is cropped.
    ``letterbox``: the longer side is resized to fit, the rest padded with grey 114 on both
    sides (``letterbox_transform`` maps between the two). A path is read with ``open_image``
    (``max_pixels``: its pixel limit).
    """
    if isinstance(source, np.ndarray):
        if source.ndim == 2:
            source = np.repeat(source[..., None], 3, axis=2)
        if source.ndim != 3 or source.shape[2] not in (3, 4) or 0 in source.shape:
            raise ImageError(f"an image array must be H×W×3, got shape {source.shape}")
        img = Image.fromarray(np.asarray(source[..., :3], dtype=np.uint8))
        where = "array"
    elif isinstance(source, Image.Image):
        img, where = source, "image"
    else:
        img, where = open_image(source, max_pixels), str(source)
    view, note = _to_rgb_uint8(img, where)
    h, w = size
    img = Image.fromarray(view)
    if resize == "letterbox":
        scale, left, top = letterbox_transform((img.width, img.height), size)
        new = (round(img.width * scale), round(img.height * scale))
        out = np.full((h, w, 3), 114, np.uint8)
        out[top:top + new[1], left:left + new[0]] = np.asarray(img.resize(new, Image.BILINEAR))
        return out, note
    scale = max(h / img.height, w / img.width)
    new = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    img = img.resize(new, Image.BILINEAR)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.uint8), note


def letterbox_transform(original_size: tuple[int, int], size: tuple[int, int]):
    """(scale, left, top): network-input pixel = original pixel * scale + (left, top) after a
    letterbox of an image of ``original_size`` = (width, height) into ``size`` = (h, w)."""
    w0, h0 = original_size
    h, w = size
    scale = min(h / h0, w / w0)
    new_w, new_h = round(w0 * scale), round(h0 * scale)
    return scale, (w - new_w) // 2, (h - new_h) // 2


def image_size(source) -> tuple[int, int] | None:
    """(width, height) of an image path, PIL image or array (None when unknown)."""
    if isinstance(source, np.ndarray):
        return int(source.shape[1]), int(source.shape[0])
    if isinstance(source, Image.Image):
        return source.width, source.height
    try:
        with Image.open(source) as img:
            return img.width, img.height
    except Exception:
        return None


def map_box(box, original_size: tuple[int, int], size: tuple[int, int]) -> list[int]:
    """A box [x0, y0, x1, y1] in original image pixels (``original_size`` = (width, height)) ->
    the same box in the network input after ``load_image``'s resize and centre crop."""
    w0, h0 = original_size
    h, w = size
    scale = max(h / h0, w / w0)
    new_w, new_h = max(w, round(w0 * scale)), max(h, round(h0 * scale))
    left, top = (new_w - w) // 2, (new_h - h) // 2
    x0, y0, x1, y1 = box
    clip = lambda v, hi: int(min(max(round(v), 0), hi))  # noqa: E731
    return [clip(x0 * new_w / w0 - left, w), clip(y0 * new_h / h0 - top, h),
            clip(x1 * new_w / w0 - left, w), clip(y1 * new_h / h0 - top, h)]
