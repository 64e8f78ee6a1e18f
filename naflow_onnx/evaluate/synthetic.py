"""Synthetic benchmark with a known answer: one target object decides the class.

Every image (default 96x96 RGB, uint8) holds

* a cluttered background: a random colour gradient, 3-8 random lines and, at the end,
  Gaussian pixel noise over the whole image;
* 2-4 *distractor* objects;
* exactly one *target* object, whose shape x texture is the class:

  ======  ========  ========
  label   shape     texture
  ======  ========  ========
  0       circle    striped
  1       circle    dotted
  2       square    striped
  3       square    dotted
  ======  ========  ========

Distractors are never one of these four combinations: they are triangles or crosses with any
texture (striped, dotted or plain), or circles/squares with the neutral *plain* texture. So
every shape and every texture of the classes also appears on distractors, and the class can
only be read off the one object that has both a target shape and a target texture.

Objects never overlap (rejection sampling on bounding circles) and are drawn over the lines,
so the returned mask is exactly the set of target pixels (before the pixel noise, which
touches every pixel). Colours, positions, sizes, stripe angles and periods are random and
independent of the class.

Determinism: image ``i`` of ``make_dataset(n, seed)`` is drawn from
``numpy.random.default_rng([seed, i])`` alone, so it does not depend on ``n`` and the same
``(seed, i)`` always gives byte-identical arrays (numpy + Pillow drawing without
anti-aliasing only).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..io import atomic_write

GENERATOR_VERSION = 1
CLASSES = ("circle_striped", "circle_dotted", "square_striped", "square_dotted")
TARGET_SHAPES = ("circle", "square")
TARGET_TEXTURES = ("striped", "dotted")
ALL_SHAPES = ("circle", "square", "triangle", "cross")
ALL_TEXTURES = ("striped", "dotted", "plain")


def class_of(shape: str, texture: str) -> int | None:
    """Label of a (shape, texture) pair, or None if the pair is not a target class."""
    name = f"{shape}_{texture}"
    return CLASSES.index(name) if name in CLASSES else None


# ---------------------------------------------------------------------------------------
# drawing primitives
# ---------------------------------------------------------------------------------------

def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """Boolean mask of one filled shape of 'radius' r centred at (cx, cy)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = r * 0.85  # same visual area class as a circle of radius r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":
        pts = [(cx + r * np.cos(angle + k * 2 * np.pi / 3), cy + r * np.sin(angle + k * 2 * np.pi / 3))
               for k in range(3)]
        draw.polygon(pts, fill=255)
    elif shape == "cross":
        w = r * 0.38
        c, s = np.cos(angle), np.sin(angle)
        for (ax, ay) in ((c, s), (-s, c)):  # two perpendicular bars
            px, py = -ay, ax
            pts = [(cx + ax * r + px * w, cy + ay * r + py * w), (cx + ax * r - px * w, cy + ay * r - py * w),
                   (cx - ax * r - px * w, cy - ay * r - py * w), (cx - ax * r + px * w, cy - ay * r + py * w)]
            draw.polygon(pts, fill=255)
    else:  # pragma: no cover - internal
        raise ValueError(shape)
    return np.asarray(canvas) > 0


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _contrasting(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """A second colour far enough from `colour` for a texture to be visible."""
    for _ in range(100):
        other = _random_colour(rng)
        if np.abs(other - colour).sum() > 220:
            return other
    return 255.0 - colour


def _texture(texture: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A full-frame float32 [size, size, 3] texture; the shape mask cuts it out."""
    c1 = _random_colour(rng)
    if texture == "plain":
        return np.broadcast_to(c1, (size, size, 3)).astype(np.float32)
    c2 = _contrasting(rng, c1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if texture == "striped":
        period = rng.uniform(4.0, 7.0)
        theta = rng.uniform(0, np.pi)
        phase = rng.uniform(0, period)
        u = (xx * np.cos(theta) + yy * np.sin(theta) + phase) % period
        on = u < period / 2
    elif texture == "dotted":
        period = rng.uniform(5.0, 7.0)
        radius = rng.uniform(1.3, 1.9)
        ox, oy = rng.uniform(0, period, size=2)
        dx = (xx + ox) % period - period / 2
        dy = (yy + oy) % period - period / 2
        on = dx * dx + dy * dy <= radius * radius
    else:  # pragma: no cover - internal
        raise ValueError(texture)
    return np.where(on[..., None], c2, c1).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    a, b = _random_colour(rng), _random_colour(rng)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (xx * np.cos(theta) + yy * np.sin(theta))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = a * (1 - t[..., None]) + b * t[..., None]
    # lines (clutter) drawn with Pillow, under every object
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0, x1, y1 = rng.uniform(-0.1 * size, 1.1 * size, size=4)
        draw.line([(x0, y0), (x1, y1)], fill=tuple(int(v) for v in _random_colour(rng)),
                  width=int(rng.integers(1, 3)))
    return np.asarray(canvas).astype(np.float32)


def _place(rng: np.random.Generator, radii: list[float], size: int, margin: float = 2.0):
    """Non-overlapping centres for the given radii (first = target), or None."""
    centres: list[tuple[float, float]] = []
    for r in radii:
        for _ in range(200):
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + margin) ** 2
                   for (x, y), rr in zip(centres, radii)):
                centres.append((float(cx), float(cy)))
                break
        else:
            return None
    return centres


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------

def make_image(seed: int, index: int = 0, size: int = 96, label: int | None = None):
    """One image: ``(image uint8 [H,W,3], label int, mask bool [H,W], info dict)``.

    ``label`` forces the class (default: drawn uniformly). ``info`` describes every object
    (shape, texture, centre, radius; the target first) for debugging and documentation.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    if label is None:
        label = int(rng.integers(0, len(CLASSES)))
    shape, texture = CLASSES[label].split("_")
    s = size / 96.0
    n_distractors = int(rng.integers(2, 5))
    while True:
        r_target = rng.uniform(12.0, 19.0) * s
        radii = [r_target] + [rng.uniform(8.0, 15.0) * s for _ in range(n_distractors)]
        centres = _place(rng, radii, size)
        if centres is not None:
            break
        n_distractors = max(2, n_distractors - 1)  # crowded: retry (with fewer if possible)

    img = _background(rng, size)
    objects = [dict(shape=shape, texture=texture, target=True)]
    for _ in range(n_distractors):
        while True:
            d_shape = ALL_SHAPES[int(rng.integers(0, len(ALL_SHAPES)))]
            d_tex = ALL_TEXTURES[int(rng.integers(0, len(ALL_TEXTURES)))]
            if class_of(d_shape, d_tex) is None:
                break
        objects.append(dict(shape=d_shape, texture=d_tex, target=False))

    target_mask = None
    for obj, (cx, cy), r in zip(objects, centres, radii):
        angle = rng.uniform(0, 2 * np.pi)
        m = _shape_mask(obj["shape"], cx, cy, r, angle, size)
        tex = _texture(obj["texture"], rng, size)
        img[m] = tex[m]
        obj.update(centre=(cx, cy), radius=float(r))
        if obj["target"]:
            target_mask = m
    noise_sigma = rng.uniform(4.0, 12.0)
    img = img + rng.normal(0.0, noise_sigma, size=img.shape).astype(np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return image, int(label), target_mask.copy(), dict(objects=objects, noise_sigma=float(noise_sigma))


def make_dataset(n: int, seed: int, size: int = 96, balanced: bool = True) -> dict:
    """``dict(images uint8 [n,H,W,3], labels int64 [n], masks bool [n,H,W])``.

    ``balanced``: label of image i is ``i % 4`` (exactly balanced classes); otherwise drawn
    at random. Either way the result is a pure function of ``(n, seed, size, balanced)``.
    """
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n,), np.int64)
    masks = np.empty((n, size, size), bool)
    for i in range(n):
        img, lab, m, _ = make_image(seed, i, size, label=(i % len(CLASSES)) if balanced else None)
        images[i], labels[i], masks[i] = img, lab, m
    return dict(images=images, labels=labels, masks=masks)


def save_dataset(path, data: dict, **meta) -> None:
    """Write ``data`` (as returned by make_dataset) to an .npz file atomically.

    Extra keyword arguments (e.g. seed=..., size=...) are stored as JSON under ``meta``.
    """
    buf = io.BytesIO()
    meta = dict(meta, generator_version=GENERATOR_VERSION, classes=list(CLASSES))
    np.savez_compressed(buf, images=data["images"], labels=data["labels"], masks=data["masks"],
                        meta=np.array(json.dumps(meta, sort_keys=True)))
    atomic_write(Path(path), buf.getvalue())


def load_dataset(path) -> dict:
    """Read an .npz written by save_dataset: images, labels, masks and ``meta`` (a dict)."""
    with np.load(path, allow_pickle=False) as z:
        out = dict(images=z["images"], labels=z["labels"].astype(np.int64), masks=z["masks"].astype(bool))
        out["meta"] = json.loads(str(z["meta"])) if "meta" in z.files else {}
    return out
