"""Pictures: the attention flow as a grid of overlays, one per layer in forward order."""
from __future__ import annotations

import math

import matplotlib
import matplotlib.patches

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 image blended with a jet-coloured [0, 1] map of the same H×W."""
    colours = plt.get_cmap("jet")(heat)[..., :3]
    return np.clip((1 - alpha) * image / 255.0 + alpha * colours, 0, 1)


def _title(flow) -> str:
    t = flow.target
    if t.get("kind") == "class":
        what = f"class {t['index']}" + (f" '{t['label']}'" if t.get("label") else "")
        what += f" (p={t['probability']:.2f})"
    elif t.get("kind") == "detection":
        what = f"box of class {t['index']}" + (f" '{t['label']}'" if t.get("label") else "")
        what += f" (score {t['score']:.2f}, logit {t.get('logit', float('nan')):.2f})"
    elif t.get("kind") == "segmentation":
        what = f"class {t['index']}" + (f" '{t['label']}'" if t.get("label") else "")
        what += f" over {t.get('region')} ({t.get('pixels')} output pixels)"
    else:
        what = f"similarity to {t.get('description', 'reference')}"
        if t.get("cosine") is not None:
            what += f" (cosine {t['cosine']:.3f})"
    model = flow.model.get("path") or "model"
    return f"{flow.method} attention flow  ·  {model.split('/')[-1]}  ·  {what}"


def _draw_box(ax, flow) -> None:
    """The explained box of a detection target in the overlay's frame (``Flow.picture``): the
    original image's pixels for a letterboxed input, else network-input pixels."""
    t = flow.target
    if t.get("kind") != "detection":
        return
    box = t.get("box") if flow.letterbox is not None else t.get("box_input")
    if box:
        x0, y0, x1, y1 = box
        ax.add_patch(matplotlib.patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                                  edgecolor="white", linewidth=0.8))


def flow_figure(flow, max_columns: int = 12, thumb: float = 1.25, caption: str | None = None,
                partner=None):
    """The flow strip: rows of overlays in forward order. With a comparison method, each row of
    the first method is followed by the same layers under the second (as the paper's Fig. 4);
    with a ``partner`` flow (the reference of a similarity pair), by the partner's row (Fig. 10-12)."""
    layers = flow.layers
    sources = [(flow.method, flow, False)]
    if flow.compare:
        sources.append((flow.compare, flow, True))
    if partner is not None:
        sources[0] = ("query", flow, False)
        sources.append(("reference", partner, False))
    n = len(layers)
    cols = min(max_columns, n)
    blocks = math.ceil(n / cols)
    per_block = len(sources)
    rows = blocks * per_block
    fig, axes = plt.subplots(rows, cols, figsize=(cols * thumb, rows * (thumb + 0.35) + 0.6),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    pictures = [src.picture for _, src, _ in sources]
    for i, layer in enumerate(layers):
        block, col = divmod(i, cols)
        for k, (name, src, use_compare) in enumerate(sources):
            ax = axes[block * per_block + k][col]
            ax.imshow(overlay(pictures[k], src.resized(layer.tensor, compare=use_compare)))
            _draw_box(ax, src)
            h, w = layer.shape[2], layer.shape[3]
            label = f"{i}: {layer.op_type} {h}×{w}"
            if per_block > 1 and col == 0:
                label = f"[{name}] {label}"
            ax.set_title(label, fontsize=6, color="red" if layer.final else "black")
            if layer.final:
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
                for side in ax.spines.values():
                    side.set_edgecolor("red")
                    side.set_linewidth(2.5)
    fig.suptitle(caption or _title(flow), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig
