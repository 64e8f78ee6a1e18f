"""The model gallery: every registry model exported to ONNX and analysed on one photo.

``build_gallery(out_dir)`` exports each model of ``models.registry`` with the legacy exporter to
``out_dir/onnx/NAME.onnx``, runs NAFlow on skimage's chelsea photo and writes

* ``out_dir/NAME.png``: the attention flow (``Flow.plot``), captioned with the model, the target
  and, for models without real weights, "untrained weights" in red;
* ``out_dir/index.html``: one self-contained page, a table with a row per model and its picture
  (relative ``<img src>``);
* ``out_dir/gallery.json``: the same rows (schema ``naflow-onnx/gallery``, version 1).

Targets: classifiers use their top-1 class. Embedding models have no class scores; until
similarity targets (METHOD.md §6) are used here, their target is a **placeholder**: the embedding
dimension with the largest value (``target=None`` on the embedding output picks exactly that).
Such a map explains one coordinate of the embedding, not a similarity decision.

The folder is written atomically (``io.atomic_dir``): built under a temporary sibling and renamed
at the end. A model that fails to export or analyse does not stop the gallery: its row records
the error and the command exits with 2 after writing everything else.

Command line: ``python -m naflow_onnx.gallery --out DIR [--models a,b] [--size 112]``.
"""
from __future__ import annotations

import gc
import html
import json
import os
import time
import traceback
from pathlib import Path

from .errors import NAFlowError
from .io import atomic_dir, check_output_dir, current_umask, write_json

SCHEMA = "naflow-onnx/gallery"
SCHEMA_VERSION = 1

# AlexNet / VGG16 end in an adaptive average pool that the legacy exporter supports only when the
# map size divides the pool size: 224 is the input they are exported at, whatever --size says.
FIXED_SIZE = {"alexnet": 224, "vgg16": 224}

PLACEHOLDER_NOTE = ("placeholder target: the embedding dimension with the largest value "
                    "(similarity targets not used yet)")


def default_image() -> Path:
    """skimage's chelsea photo (installed with scikit-image; nothing is downloaded)."""
    from models.registry import package_file
    path = package_file("skimage", "data", "chelsea.png")
    if path is None:
        raise NAFlowError("skimage's chelsea.png is not installed (pip install scikit-image), "
                          "give --image PATH")
    return Path(path)


def model_size(name: str, spec, size_override: int | None) -> int:
    """The input size a model is exported and analysed at: the registry's, or ``size_override``
    when that is smaller (never larger: --size is for a quicker gallery); AlexNet/VGG keep 224."""
    if name in FIXED_SIZE:
        return FIXED_SIZE[name]
    if size_override is None:
        return spec.input_size
    return min(int(size_override), spec.input_size)


def build_model(name: str, size: int):
    """``get_model(name)``; EfficientNet-Lite0 at another size than 224 is rebuilt with the TF
    SAME pads of that size and the same offline weights."""
    from models import registry
    model, spec = registry.get_model(name)
    if name == "efficientnet-lite0" and size != spec.input_size:
        import torch

        from models.efficientnet_lite import EfficientNetLite0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # as get_model: seed 0 when no weights are installed
            resized = EfficientNetLite0(image_size=size)
        path = spec.extra.get("weights_path")
        if path:
            registry.load_weights(resized, path, spec.convert_state_dict)
        resized.naflow_untrained = spec.untrained
        model = resized.eval()
    return model, spec


def describe_target(target: dict, kind: str) -> str:
    """One line for the caption and the table."""
    if kind == "embedding":
        return (f"PLACEHOLDER: embedding dim {target['index']} (largest value, "
                f"{target['score']:.3g})")
    if target.get("kind") == "class":
        label = f" '{target['label']}'" if target.get("label") else ""
        return f"class {target['index']}{label} (p={target['probability']:.2f})"
    return str(target.get("description", target.get("kind", "target")))


def _caption_figure(fig, title: str, notes: list[tuple[str, str]] = ()) -> None:
    """Replace the figure's suptitle by ``title`` and add one line per ``(text, colour)`` note
    under it (the untrained-weights warning in red), growing the figure to make room."""
    line = 0.22  # inches per caption line
    height = fig.get_figheight()
    total = height + line * len(notes)
    fig.set_figheight(total)
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / total, va="top")
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.3 + line * len(notes)) / total))
    for i, (text, colour) in enumerate(notes):
        fig.text(0.5, 1 - (0.08 + line * (i + 1)) / total, text, ha="center", va="top",
                 fontsize=9.5, color=colour, fontweight="bold" if colour == "red" else "normal")


def _row_base(name: str, spec, size: int) -> dict:
    return {"model": name, "kind": spec.kind, "description": spec.description,
            "weights": None, "input_size": size,  # real / untrained once the model is built
            "status": "failed", "error": None, "image": None, "onnx": None}


def analyse_model(name: str, out: Path, image: Path, size_override: int | None = None,
                  damp: float | None = None, tol: float = 1e-4) -> dict:
    """Export, analyse and draw one registry model into ``out``; returns its gallery row."""
    import matplotlib.pyplot as plt

    from exporters.torch_export import export
    from models.registry import MODELS

    from .flow import DEFAULT_DAMP, Analyzer

    spec = MODELS[name]
    size = model_size(name, spec, size_override)
    row = _row_base(name, spec, size)
    try:
        model, spec = build_model(name, size)
        row["weights"] = "untrained" if spec.untrained else "real"
        onnx_path = out / "onnx" / f"{name}.onnx"
        t0 = time.perf_counter()
        rep = export(model, onnx_path, (1, 3, size, size), exporter="legacy",
                     preprocess=spec.preprocess, labels=spec.labels, output_names=list(spec.outputs),
                     embedding_output=spec.outputs[0] if spec.kind == "embedding" else None)
        row.update(onnx=f"onnx/{name}.onnx", export_s=round(time.perf_counter() - t0, 3),
                   export_parity=rep["parity_relative_error"], onnx_nodes=rep["nodes"])
        del model
        gc.collect()
        t0 = time.perf_counter()
        analyzer = Analyzer(onnx_path, damp=DEFAULT_DAMP if damp is None else damp, tol=tol)
        row["load_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        flow = analyzer.analyze(image, target=None, method="naflow")
        row["analyze_s"] = round(time.perf_counter() - t0, 3)
        summary = flow.solver_summary()
        target = dict(flow.target)
        if spec.kind == "embedding":
            # no class scores: target=None picked the largest coordinate of the embedding output
            target = {"kind": "embedding-dimension", "placeholder": True, "note": PLACEHOLDER_NOTE,
                      "index": target["index"], "score": target["score"],
                      "top5": [{"index": e["index"], "score": e["score"]} for e in target.get("top5", [])]}
        text = describe_target(target, spec.kind)
        row.update(target=target, target_text=text, layers=len(flow.layers),
                   feature_layers=flow.model.get("feature_layers"), final_layer=flow.final_layer,
                   parity=flow.parity["max_relative_error"], max_residual=summary["max_convergence"],
                   all_converged=summary["all_converged"], solves=summary["solved"],
                   iterations=summary["iterations"], timings=flow.timings)
        fig = flow.plot()
        title = (f"{name} ({spec.kind}, {size}×{size})  ·  NAFlow, damp {flow.options['damp']:g}  ·  "
                 f"target: {text}")
        notes = []
        if spec.untrained:
            notes.append(("untrained weights (random initialisation, seed 0): the maps show the "
                          "architecture, not learned evidence", "red"))
        if spec.kind == "embedding":
            notes.append(("embedding model: " + PLACEHOLDER_NOTE, "#b35900"))
        _caption_figure(fig, title, notes)
        row["caption"] = {"title": title, "notes": [{"text": t, "colour": c} for t, c in notes]}
        fig.savefig(out / f"{name}.png", dpi=90)
        plt.close(fig)
        row.update(image=f"{name}.png", status="ok")
        del analyzer, flow
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - one failing model must not stop the gallery
        plt.close("all")
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:1000]
        row["traceback"] = traceback.format_exc(limit=8)
    gc.collect()
    return row


def _fmt(value, spec: str = "", missing: str = "–") -> str:
    if value is None:
        return missing
    return format(value, spec) if spec else str(value)


INDEX_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; font-size: 13px; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.untrained { color: #c00; font-weight: bold; }
.failed { color: #c00; }
.placeholder { color: #a60; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
"""


def render_index(doc: dict) -> str:
    """The self-contained index page (inline CSS, relative image links)."""
    e = html.escape
    rows, figures = [], []
    for r in doc["rows"]:
        weights = ('<span class="untrained">untrained</span>' if r["weights"] == "untrained"
                   else e(r["weights"] or "–"))
        if r["status"] == "ok":
            target = e(r["target_text"])
            if r["kind"] == "embedding":
                target = f'<span class="placeholder">{target}</span>'
            cells = [target, _fmt(r["layers"]), _fmt(r["parity"], ".1e"),
                     _fmt(r["analyze_s"], ".1f"), _fmt(r["max_residual"], ".1e")
                     + ("" if r["all_converged"] else ' <span class="failed">(not converged)</span>')]
            img = f'<a href="#{e(r["model"])}"><img src="{e(r["image"])}" alt="{e(r["model"])}" height="60"></a>'
            figures.append(f'<figure id="{e(r["model"])}"><img src="{e(r["image"])}" '
                           f'alt="{e(r["model"])} attention flow"><figcaption>{e(r["model"])}: '
                           f'{target}</figcaption></figure>')
        else:
            cells = [f'<span class="failed">failed: {e(r["error"] or "")}</span>', "–", "–", "–", "–"]
            img = ""
        rows.append("<tr>" + "".join([
            f'<td>{e(r["model"])}</td>', f'<td>{e(r["kind"])}</td>', f"<td>{weights}</td>",
            f'<td class="num">{r["input_size"]}</td>', f"<td>{cells[0]}</td>",
            *[f'<td class="num">{c}</td>' for c in cells[1:]], f"<td>{img}</td>"]) + "</tr>")
    opts = doc["options"]
    head = ("<tr><th>model</th><th>kind</th><th>weights</th><th>input</th><th>target</th>"
            "<th>layers mapped</th><th>parity (max rel. error)</th><th>analyze s</th>"
            "<th>max solver residual</th><th>flow</th></tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>naflow-onnx model gallery</title>
<style>{INDEX_CSS}</style></head>
<body>
<h1>naflow-onnx model gallery</h1>
<p>Every model of the registry exported to ONNX (legacy exporter, BatchNorm folded) and analysed
with NAFlow (damp {opts['damp']:g}, solver tolerance {opts['tol']:g}) on <code>{e(doc['image_name'])}</code>.
Classifiers: top-1 class. <span class="placeholder">Embedding models: a <b>placeholder</b> target,
the embedding dimension with the largest value</span> (similarity targets are not used here yet), so
their maps explain one embedding coordinate, not a similarity decision.
Models marked <span class="untrained">untrained</span> use a random initialisation (seed 0):
their maps show the architecture, not learned evidence.
Parity: torch rebuild against onnxruntime. Residual: largest normal-equation residual
‖Jᵀ(JΔ−δ)+λ²Δ‖/‖Jᵀδ‖ over the solved layers.</p>
<table>
{head}
{chr(10).join(rows)}
</table>
{chr(10).join(figures)}
</body></html>
"""


def _usual_permissions(path: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries; a gallery is meant to be shared: apply the umask."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())


def build_gallery(out_dir, models=None, image=None, size_override: int | None = None,
                  progress: bool = True, damp: float | None = None, tol: float = 1e-4) -> dict:
    """Export and analyse ``models`` (default: every registry model) into ``out_dir``.

    Returns the gallery document (also written to ``out_dir/gallery.json``): ``rows`` holds one
    dict per model with ``model``, ``kind``, ``weights`` (real/untrained), ``input_size``,
    ``target`` / ``target_text``, ``layers`` (mapped), ``parity``, ``analyze_s``, ``max_residual``,
    ``all_converged``, ``image`` (relative path), ``onnx``, ``status`` (ok/failed) and ``error``.
    """
    from tqdm import tqdm

    from models.registry import MODELS

    from .flow import DEFAULT_DAMP

    names = list(MODELS) if models is None else list(models)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise NAFlowError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    if size_override is not None and int(size_override) < 32:
        raise NAFlowError(f"--size {size_override} is too small (at least 32)")
    image = Path(image) if image is not None else default_image()
    if not image.is_file():
        raise NAFlowError(f"image not found: {image}")
    out_dir = Path(out_dir)
    check_output_dir(out_dir)           # refused before any export, nothing touched
    started = time.perf_counter()
    rows = []
    with atomic_dir(out_dir, "gallery") as tmp:
        _usual_permissions(tmp)
        (tmp / "onnx").mkdir()
        bar = tqdm(names, desc="gallery", unit="model", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            rows.append(analyse_model(name, tmp, image, size_override, damp, tol))
        bar.close()
        doc = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
               "image": str(image), "image_name": image.name, "size_override": size_override,
               "options": {"damp": DEFAULT_DAMP if damp is None else damp, "tol": tol,
                           "exporter": "legacy"},
               "placeholder_target": PLACEHOLDER_NOTE,
               "total_s": round(time.perf_counter() - started, 3),
               "rows": rows}
        write_json(tmp / "gallery.json", json.loads(json.dumps(doc, default=float)))
        (tmp / "index.html").write_text(render_index(doc), encoding="utf-8")
        for f in (tmp / "onnx").iterdir():
            _usual_permissions(f)
    doc["out_dir"] = str(out_dir)
    return doc
