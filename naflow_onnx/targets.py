"""Targets beyond a class logit (issue 16): a detector's box and a segmenter's region.

A target spec (``DetectionTarget``, ``SegmentationTarget``) is bound to one forward pass
(``bind``): it reads the model's outputs, chooses the box or region, and returns the objective,
a scalar of the forward values whose importance Λ the analysis computes (METHOD.md §2-§3):

- detection: the chosen box's class logit (before the Sigmoid), read from the tensor that feeds
  the Sigmoid when the graph has one, else the logit of the output's probability;
- segmentation: the sum of class ``c``'s logits over a region (pytorch-grad-cam's
  SemanticSegmentationTarget), the region a box, a mask image, or the pixels predicted as ``c``.

Both are *dense* targets: the plan takes as final tensors the feature maps their head reads
(``graph.plan(dense=True)``, several for a multi-scale head).
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from . import preprocess as pp_mod
from .errors import NAFlowError, TargetError

TASKS = ("classify", "embed", "detect", "segment")
_ULTRALYTICS_TASKS = {"detect": "detect", "segment": "segment", "classify": "classify",
                      "obb": "detect", "pose": "detect"}


def metadata_names(metadata: dict[str, str]) -> list[str] | None:
    """Ultralytics' ``names`` (a Python dict literal ``{0: 'person', ...}``) as a list."""
    raw = metadata.get("names")
    if not raw:
        return None
    try:
        names = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        try:
            names = json.loads(raw)
        except json.JSONDecodeError:
            return None
    if isinstance(names, dict):
        try:
            return [str(names[k]) for k in sorted(names, key=int)]
        except (ValueError, TypeError):
            return None
    return [str(n) for n in names] if isinstance(names, list) else None


def default_task(metadata: dict[str, str], output_shape) -> str:
    """``task`` from the metadata (Ultralytics writes it), else from the output layout: rank 3
    with a short attribute axis is a detector, rank 4 with H·W > 1 a segmenter, else classify."""
    task = _ULTRALYTICS_TASKS.get(str(metadata.get("task", "")).strip().lower())
    if task:
        return task
    shape = list(output_shape)
    if len(shape) == 3 and min(shape[1:]) >= 5 and max(shape[1:]) >= 4 * min(shape[1:]):
        return "detect"
    if len(shape) == 4 and shape[2] * shape[3] > 1 and shape[1] < shape[2] * shape[3]:
        return "segment"
    return "classify"


def model_task(mg) -> str:
    """``default_task`` of a loaded model (``graph.ModelGraph``): its metadata and its output's
    declared shape, a dynamic dim (batch, anchors, H, W) counting as large."""
    out = next(o for o in mg.model.graph.output if o.name == mg.output_name)
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 4096
            for d in out.type.tensor_type.shape.dim]
    return default_task(mg.metadata, dims)


def parse_box(text, what: str = "--box") -> tuple[float, float, float, float]:
    """``x0,y0,x1,y1`` (image pixels) with x0 < x1 and y0 < y1."""
    try:
        vals = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        vals = []
    if len(vals) != 4 or not (vals[0] < vals[2] and vals[1] < vals[3]):
        raise TargetError(f"{what} '{text}' is not x0,y0,x1,y1 with x0 < x1 and y0 < y1")
    return tuple(vals)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a`` (N×4 xyxy) with one box ``b`` (4)."""
    x0, y0 = np.maximum(a[:, 0], b[0]), np.maximum(a[:, 1], b[1])
    x1, y1 = np.minimum(a[:, 2], b[2]), np.minimum(a[:, 3], b[3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return np.where(area > 0, inter / np.maximum(area, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, threshold: float) -> list[int]:
    """Greedy class-wise non-maximum suppression; indices by decreasing score."""
    keep: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(classes[j] != classes[i] or iou(boxes[j:j + 1], boxes[i])[0] <= threshold
               for j in keep):
            keep.append(int(i))
    return keep


@dataclass
class ImageFrame:
    """Network-input pixels <-> original image pixels (letterbox or resize + centre crop)."""

    original: tuple[int, int]     # (width, height)
    size: tuple[int, int]         # network input (h, w)
    resize: str = "crop"

    @classmethod
    def of(cls, image, view: np.ndarray, resize: str) -> "ImageFrame":
        """The frame of ``view`` (the network-input view ``load_image`` made of ``image``)."""
        return cls(pp_mod.image_size(image) or tuple(view.shape[1::-1]), tuple(view.shape[:2]),
                   resize)

    def _affine(self):
        w0, h0 = self.original
        h, w = self.size
        if self.resize == "letterbox":
            return pp_mod.letterbox_transform(self.original, self.size)
        scale = max(h / h0, w / w0)
        new_w, new_h = max(w, round(w0 * scale)), max(h, round(h0 * scale))
        return scale, -((new_w - w) // 2), -((new_h - h) // 2)

    def to_image(self, box) -> list[float]:
        s, left, top = self._affine()
        x0, y0, x1, y1 = box
        return [(x0 - left) / s, (y0 - top) / s, (x1 - left) / s, (y1 - top) / s]

    def to_input(self, box) -> list[float]:
        s, left, top = self._affine()
        x0, y0, x1, y1 = box
        return [x0 * s + left, y0 * s + top, x1 * s + left, y1 * s + top]

    def as_dict(self) -> dict:
        s, left, top = self._affine()
        return {"original_size": list(self.original), "input_size": list(self.size),
                "resize": self.resize, "scale": s, "offset": [left, top]}


# ---------------------------------------------------------------------------------- detection
@dataclass
class DetectionOptions:
    """``target``: a class (index or name) -> its highest-scoring box; ``box``: the box (image
    pixels) of the detection that best overlaps it; ``detection``: the K-th box by score (1 =
    best); none: the best box. Boxes below ``min_score`` are not candidates."""

    target: object = None
    box: tuple | None = None
    detection: int | None = None
    min_score: float = 0.25
    nms_iou: float = 0.45


def _class_logits(mg, values, output: str, axis: int, offset: int, count: int):
    """The tensor holding the class columns ``[offset, offset+count)`` of ``output`` along
    ``axis`` before a Sigmoid: walks back through Concat along that axis. Returns
    (tensor, offset, probability): probability is False when a Sigmoid was passed."""
    t = output
    while t in mg.producer:
        node = mg.nodes[mg.producer[t]]
        if node.op_type == "Sigmoid":
            return node.inputs[0], offset, False
        if node.op_type != "Concat" or int(node.attr("axis", 0)) % values[t].dim() != axis:
            break
        start = 0
        for inp in node.inputs:
            n = values[inp].shape[axis]
            if start <= offset and offset + count <= start + n:
                t, offset = inp, offset - start
                break
            start += n
        else:
            break
    return t, offset, True


@dataclass
class DetectionObjective:
    """The class logit of one anchor: ``values[score_name][0, column, anchor]`` (attribute axis
    1) or ``[0, anchor, column]``; the logit of it when it is a probability."""

    score_name: str
    column: int
    anchor: int
    attribute_axis: int
    probability: bool
    details: dict = field(default_factory=dict)
    dense = True

    def __call__(self, values) -> torch.Tensor:
        v = values[self.score_name]
        x = v[0, self.column, self.anchor] if self.attribute_axis == 1 else v[0, self.anchor, self.column]
        return torch.logit(x.double()).to(x.dtype) if self.probability else x

    def record(self) -> dict:
        return dict(self.details)


@dataclass
class DetectionTarget:
    options: DetectionOptions = field(default_factory=DetectionOptions)

    def bind(self, mg, values, labels, frame: ImageFrame) -> DetectionObjective:
        out = values[mg.output_name].detach()
        shape = list(out.shape)
        if out.dim() != 3 or shape[0] != 1 or min(shape[1:]) < 5:
            raise TargetError(f"output '{mg.output_name}' of shape {shape} is not a detector's "
                              "raw output [1, 4+C, N] or [1, N, 4+C] (use --task)")
        axis = 1 if shape[1] <= shape[2] else 2
        P = (out[0] if axis == 1 else out[0].T).double().cpu().numpy()   # K × N
        k = P.shape[0]
        ncls = len(labels) if labels and k in (4 + len(labels), 5 + len(labels)) else (
            k - 4 if axis == 1 else k - 5)
        objectness = k == 5 + ncls
        first = 5 if objectness else 4
        tensor, col, prob = _class_logits(mg, values, mg.output_name, axis, first, ncls)
        cls = P[first:first + ncls].T                                      # N × C
        obj = P[4] if objectness else None
        if prob and not (cls.min() >= 0 and cls.max() <= 1):
            # the output holds logits (no Sigmoid in the graph): the scores are their Sigmoid
            cls, prob = 1 / (1 + np.exp(-cls)), False
            obj = None if obj is None else 1 / (1 + np.exp(-obj))
        scores = cls * obj[:, None] if objectness else cls
        cx, cy, w, h = P[:4]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)

        def label(c):
            return labels[c] if labels and c < len(labels) else None

        opts = self.options
        best_class = scores.argmax(1)
        best = scores[np.arange(len(scores)), best_class]
        cand = np.nonzero(best >= opts.min_score)[0]
        kept = cand[nms(boxes[cand], best[cand], best_class[cand], opts.nms_iou)]
        if opts.target is not None:
            from .importance import resolve_class
            c = resolve_class(opts.target, torch.zeros(1, ncls), labels)
            anchor = int(scores[:, c].argmax())
            if scores[anchor, c] < opts.min_score:
                raise TargetError(f"no box of class {c} ({label(c)}) scores above --min-score "
                                  f"{opts.min_score:g}: the best scores {scores[anchor, c]:.3f}")
        else:
            if len(kept) == 0:
                raise TargetError(f"no box scores above --min-score {opts.min_score:g} (the best "
                                  f"scores {best.max():.3f})")
            if opts.box is not None:
                region = np.asarray(frame.to_input(opts.box))
                overlap = iou(boxes[kept], region)
                if overlap.max() <= 0:
                    raise TargetError(f"--box {','.join(f'{v:g}' for v in opts.box)} overlaps no "
                                      f"box scoring above --min-score {opts.min_score:g}")
                anchor = int(kept[overlap.argmax()])
            elif opts.detection is not None:
                if not 1 <= opts.detection <= len(kept):
                    raise TargetError(f"--detection {opts.detection}: {len(kept)} boxes score "
                                      f"above --min-score {opts.min_score:g} (1..{len(kept)})")
                anchor = int(kept[opts.detection - 1])
            else:
                anchor = int(kept[0])
            c = int(best_class[anchor])

        def image_box(i):
            return [round(v, 1) for v in frame.to_image(boxes[i].tolist())]

        others = [i for i in kept if i != anchor][:5]
        details = {"kind": "detection", "index": c, "class": c, "label": label(c),
                   "score": float(scores[anchor, c]), "box": image_box(anchor),
                   "box_input": [round(v, 1) for v in boxes[anchor].tolist()], "anchor": anchor,
                   "anchors": int(P.shape[1]), "objectness": objectness,
                   "scalar": "class logit" + (" (logit of the output's probability)" if prob else ""),
                   "score_tensor": tensor, "frame": frame.as_dict(),
                   "next": [{"class": int(best_class[i]), "label": label(int(best_class[i])),
                             "score": float(best[i]), "box": image_box(i), "anchor": int(i)}
                            for i in others]}
        obj = DetectionObjective(tensor, col + c, anchor, axis, prob, details)
        obj.details["logit"] = float(obj(values).detach())
        return obj


# ------------------------------------------------------------------------------- segmentation
@dataclass
class SegmentationOptions:
    """``target``: the class (default: the one predicted on most pixels; a one-channel output is
    class 0); ``region``: a box ``x0,y0,x1,y1`` in image pixels or a mask image (same size as
    the image, white = inside); default: the pixels predicted as the class."""

    target: object = None
    region: object = None


@dataclass
class RegionObjective:
    """The sum of class ``channel``'s logits over ``mask`` (at the output's resolution)."""

    score_name: str
    channel: int
    mask: torch.Tensor
    details: dict = field(default_factory=dict)
    dense = True

    def __call__(self, values) -> torch.Tensor:
        v = values[self.score_name][0, self.channel]
        return (v * self.mask.to(v.dtype)).sum()

    def record(self) -> dict:
        return dict(self.details)


@dataclass
class SegmentationTarget:
    options: SegmentationOptions = field(default_factory=SegmentationOptions)

    def bind(self, mg, values, labels, frame: ImageFrame, max_pixels=None) -> RegionObjective:
        score = values[mg.score_name].detach()
        shape = list(score.shape)
        if score.dim() != 4 or shape[0] != 1 or shape[2] * shape[3] <= 1:
            raise TargetError(f"output '{mg.output_name}' of shape {shape} is not a segmenter's "
                              "[1, C, H, W] (use --task)")
        logits = score[0].double().cpu()
        C, H, W = logits.shape
        passed = mg.score_name != mg.output_name          # a Sigmoid/Softmax was passed
        predicted = (logits > (0 if passed else 0.5)) if C == 1 else (
            logits.argmax(0)[None] == torch.arange(C)[:, None, None])
        opts = self.options
        if opts.target is not None:
            from .importance import resolve_class
            c = resolve_class(opts.target, torch.zeros(1, C), labels)
        else:
            c = 0 if C == 1 else int(predicted.reshape(C, -1).sum(1).argmax())
        h, w = frame.size
        if opts.region is None:
            mask, how = predicted[c], "pixels predicted as the class"
        elif isinstance(opts.region, (tuple, list)) or (isinstance(opts.region, str)
                                                        and opts.region.count(",") == 3):
            box = parse_box(opts.region, "--region")
            W0, H0 = frame.original
            if box[2] <= 0 or box[3] <= 0 or box[0] >= W0 or box[1] >= H0:
                raise TargetError(f"--region {','.join(f'{v:g}' for v in box)} lies outside the "
                                  f"image ({W0}x{H0})")
            x0, y0, x1, y1 = frame.to_input(box)
            ys = (torch.arange(H, dtype=torch.float64) + 0.5) * h / H
            xs = (torch.arange(W, dtype=torch.float64) + 0.5) * w / W
            mask = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
            how = f"box {list(box)}"
        else:
            view, _ = pp_mod.load_image(opts.region, frame.size, max_pixels, frame.resize)
            from PIL import Image
            small = np.asarray(Image.fromarray(view.mean(2).astype(np.uint8)).resize(
                (W, H), Image.NEAREST))
            mask, how = torch.from_numpy(small > 127), f"mask {opts.region}"
        if not bool(mask.any()):
            raise TargetError(f"the region ({how}) holds no pixel of the {H}x{W} output"
                              + ("; give --region" if opts.region is None else ""))
        label = labels[c] if labels and c < len(labels) else None
        details = {"kind": "segmentation", "index": c, "class": c, "label": label,
                   "region": how, "pixels": int(mask.sum()), "output_size": [H, W],
                   "score": float((logits[c] * mask).sum()),
                   "scalar": "sum of the class logits over the region",
                   "score_tensor": mg.score_name, "frame": frame.as_dict()}
        return RegionObjective(mg.score_name, c, mask.to(score.device), details)


def make_target(task: str, options) -> object:
    if task == "detect":
        return DetectionTarget(options if isinstance(options, DetectionOptions) else DetectionOptions())
    if task == "segment":
        return SegmentationTarget(options if isinstance(options, SegmentationOptions)
                                  else SegmentationOptions())
    raise NAFlowError(f"task '{task}' has no dense target (choose from detect, segment)")
