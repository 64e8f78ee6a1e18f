"""Reports of ``naflow check``: JSON, JUnit XML (for CI test views), and a self-contained HTML
page (every picture an inline base64 PNG, charts inline SVG; a Content-Security-Policy forbids
any fetch, so the page shows the same offline, from a CI artifact, or attached to an e-mail)."""
from __future__ import annotations

import base64
import html
import io
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

THUMB = 112          # longest side of a layer thumbnail, CSS pixels (= image pixels)


# ------------------------------------------------------------------------------------------------
# JSON


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else str(v)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def json_text(report: dict) -> str:
    """The report as strict JSON text (report.json, and `naflow check --json`)."""
    return json.dumps(_clean(report), indent=2, allow_nan=False)


def write_json(path: Path, report: dict) -> None:
    path.write_text(json_text(report) + "\n")


# ------------------------------------------------------------------------------------------------
# JUnit XML: one <testcase> per (image, check), classname = the image key; the sanity gate under
# classname "model"; an image that could not be analysed is one <testcase name="analysis"> with
# an <error>.


def write_junit(path: Path, report: dict) -> None:
    s = report["summary"]
    total_s = f"{report['timings']['total_s']:.3f}"
    suites = ET.Element("testsuites", name="naflow check", tests=str(s["checks"] + s["errors"]),
                        failures=str(s["failed"]), errors=str(s["errors"]),
                        skipped=str(s["skipped"]), time=total_s)
    suite = ET.SubElement(suites, "testsuite", name=f"naflow check {Path(report['model']['path']).name}",
                          tests=str(s["checks"] + s["errors"]), failures=str(s["failed"]),
                          errors=str(s["errors"]), skipped=str(s["skipped"]), time=total_s)
    props = ET.SubElement(suite, "properties")
    for name, value in (("model", report["model"]["path"]), ("model.sha256", report["model"]["sha256"]),
                        ("config", report["config"]["path"]), ("method", report["analysis"]["method"]),
                        ("baseline", (report.get("baseline") or {}).get("path") or "")):
        ET.SubElement(props, "property", name=name, value=str(value))

    def case(classname, rec):
        tc = ET.SubElement(suite, "testcase", classname=classname, name=rec["check"], time="0")
        thr = rec.get("threshold")
        text = rec["message"] + (f" (value {rec.get('value')}, threshold {thr})" if thr is not None else "")
        if rec["status"] == "fail":
            f = ET.SubElement(tc, "failure", message=rec["message"], type=rec["check"])
            f.text = text
        elif rec["status"] == "error":
            e = ET.SubElement(tc, "error", message=rec["message"], type=rec["check"])
            e.text = rec.get("traceback") or text
        elif rec["status"] == "skip":
            ET.SubElement(tc, "skipped", message=rec["message"])
        else:
            out = ET.SubElement(tc, "system-out")
            out.text = text
    for e in report["images"]:
        if e["status"] == "error":
            tc = ET.SubElement(suite, "testcase", classname=e["key"], name="analysis", time="0")
            err = ET.SubElement(tc, "error", message=e["error"], type="analysis")
            err.text = e.get("traceback") or e["error"]
            continue
        for rec in e["checks"]:
            case(e["key"], rec)
    for rec in report["model_checks"]:
        case("model", rec)
    ET.indent(suites)
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


# ------------------------------------------------------------------------------------------------
# HTML


def _png(arr: np.ndarray) -> str:
    """A data: URI of an 8-bit palette PNG (an overlay thumbnail is ~4x smaller than as RGB)."""
    from PIL import Image
    buf = io.BytesIO()
    img = Image.fromarray(arr).quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumb_size(h: int, w: int) -> tuple[int, int]:
    s = THUMB / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _overlay_thumb(view: np.ndarray, heat: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    """uint8 thumbnail: the [0, 1] map in jet over the view (``Flow.picture``), region outlined white."""
    from PIL import Image

    from ..render import overlay
    rgb = (overlay(view, heat) * 255).round().astype(np.uint8)
    if region is not None:
        inner = region.copy()
        inner[1:, :] &= region[:-1, :]
        inner[:-1, :] &= region[1:, :]
        inner[:, 1:] &= region[:, :-1]
        inner[:, :-1] &= region[:, 1:]
        edge = region & ~inner
        rgb[edge] = 255
    th, tw = _thumb_size(*rgb.shape[:2])
    img = Image.fromarray(rgb)
    method = Image.NEAREST if th >= rgb.shape[0] else Image.LANCZOS
    return np.asarray(img.resize((tw, th), method))


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return _e(v)


def _svg_chart(n: int, series: list[tuple[str, str, list[float | None]]], thresholds: list[tuple[str, float]],
               mark: int | None, width: int = 900, height: int = 220) -> str:
    """A line chart of per-layer correlations (x = layer index in forward order, y in [-1, 1])."""
    left, right, top, bottom = 44, 12, 30, 28
    pw, ph = width - left - right, height - top - bottom
    lo = min([-0.2] + [v for _, _, vals in series for v in vals if v is not None])
    lo = max(-1.0, math.floor(lo * 5) / 5)
    hi = max([1.0] + [v for _, _, vals in series for v in vals if v is not None])
    hi = math.ceil(hi * 5) / 5
    xs = lambda i: left + (pw * i / max(n - 1, 1))  # noqa: E731
    ys = lambda v: top + ph * (1 - (v - lo) / (hi - lo))  # noqa: E731
    parts = [f'<svg class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    tick = lo
    while tick <= hi + 1e-4:
        y = ys(tick)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{tick:.1f}</text>')
        tick = round(tick + 0.2, 6)
    step = max(1, round(n / 12))
    for i in range(0, n, step):
        parts.append(f'<text x="{xs(i):.1f}" y="{height - 10}" text-anchor="middle" font-size="11">{i}</text>')
    for name, value in thresholds:
        y = ys(value)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c00" '
                     f'stroke-dasharray="5,4"/><text x="{left + pw - 4}" y="{y - 4:.1f}" '
                     f'text-anchor="end" font-size="11" fill="#c00">{_e(name)} {value}</text>')
    if mark is not None:
        x = xs(mark)
        anchor = "start" if mark < n / 2 else "end"
        dx = 4 if anchor == "start" else -4
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" stroke="#c00" '
                     f'stroke-width="2"/><text x="{x + dx:.1f}" y="{top + ph - 6}" font-size="11" '
                     f'text-anchor="{anchor}" fill="#c00">diverges at layer {mark}</text>')
    for k, (name, colour, vals) in enumerate(series):
        pts = " ".join(f"{xs(i):.1f},{ys(v):.1f}" for i, v in enumerate(vals) if v is not None)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{pts}"/>')
        lx = left + k * (pw // 2)
        parts.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{top - 14}" y2="{top - 14}" stroke="{colour}" '
                     f'stroke-width="2"/><text x="{lx + 24}" y="{top - 10}" font-size="11" '
                     f'fill="{colour}">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fff}
header{padding:14px 22px;color:#fff}
header.h-pass{background:#1a7f37} header.h-fail{background:#c62828} header.h-error{background:#6d4c41}
header h1{margin:0;font-size:20px} header p{margin:4px 0 0}
main{padding:10px 22px 40px}
table{border-collapse:collapse;margin:8px 0 16px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
.pass{color:#1a7f37;font-weight:600} .fail{color:#c62828;font-weight:700}
.error{color:#6d4c41;font-weight:700} .skip{color:#777}
section.image{border-top:2px solid #ddd;margin-top:18px;padding-top:6px}
.banner{background:#fdecea;border-left:5px solid #c62828;padding:6px 10px;margin:6px 0}
.grid{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}
figure.layer{margin:0;padding:3px;border:2px solid transparent;text-align:center;font-size:11px;width:max-content}
figure.layer.final{border-color:#444}
figure.layer.below{border-color:#c62828;background:#fdecea}
figure.layer.first-divergence{border-color:#c62828;box-shadow:0 0 0 3px #ffb3ad}
figure.layer img{display:block;margin:0 auto 2px;image-rendering:auto}
figcaption{max-width:118px;overflow-wrap:anywhere}
.rowlabel{font-size:11px;color:#555}
code{font-size:12px}
"""

JS = """
var blocked = [];
document.addEventListener('securitypolicyviolation', function (e) { blocked.push(e.blockedURI); });
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img'));
  var shown = 0, items = [];
  imgs.forEach(function (im) {
    var r = im.getBoundingClientRect();
    var ok = im.complete && im.naturalWidth > 0 && r.width > 0 && r.height > 0;
    if (ok) { shown += 1; }
    items.push({id: im.id, x: Math.round(r.left + window.scrollX), y: Math.round(r.top + window.scrollY),
                w: Math.round(r.width), h: Math.round(r.height), nw: im.naturalWidth,
                nh: im.naturalHeight, ok: ok});
  });
  var el = document.getElementById('render-check');
  var fetched = performance.getEntriesByType('resource').map(function (e) { return e.name; });
  el.textContent = JSON.stringify({images: imgs.length, shown: shown, fetched: fetched, blocked: blocked,
                                   height: document.documentElement.scrollHeight, items: items});
  document.body.setAttribute('data-images-shown', shown + '/' + imgs.length);
});
"""

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "connect-src 'none'; font-src 'none'; frame-src 'none'; form-action 'none'; base-uri 'none'")


def _checks_table(recs: list[dict]) -> str:
    rows = ["<table><tr><th>check</th><th>status</th><th>value</th><th>threshold</th><th>detail</th></tr>"]
    for r in recs:
        rows.append(f'<tr><td>{_e(r["check"])}</td><td class="{_e(r["status"])}">{_e(r["status"])}</td>'
                    f'<td>{_fmt(r.get("value"))}</td><td>{_fmt(r.get("threshold"))}</td>'
                    f'<td>{_e(r.get("message", ""))}</td></tr>')
    rows.append("</table>")
    return "".join(rows)


def _flow_section(k: int, entry: dict, flow, region, baseline, matching) -> str:
    """Every layer of one image: this model's map (and the baseline's under it), captions with
    the correlations, layers below the baseline threshold framed red."""
    recs = {r["check"]: r for r in entry["checks"]}
    base = recs.get("baseline_correlation")
    stab = recs.get("flow_stability")
    per_base = {p["index"]: p for p in (base or {}).get("per_layer") or []}
    stab_r = (stab or {}).get("per_layer")
    diverge = (base or {}).get("diverges_at")
    bimg = baseline.image_index(entry["key"]) if baseline is not None and per_base else None
    view = flow.picture
    region = flow.mask_to_picture(region) if region is not None else None
    parts = []
    if diverge is not None:
        d = per_base[diverge]
        low = min(per_base.values(), key=lambda p: p["r"])
        parts.append(f'<p class="banner" id="diverge-{k}"><b>The flow diverges from the baseline at layer '
                     f'{diverge}</b> ({_e(d["op_type"])} <code>{_e(d["tensor"])}</code>): r = {d["r"]:.3f} '
                     f'&lt; {d["threshold"]}; {base["layers_below"]} of {len(per_base)} layers below '
                     f'threshold; the largest change is at layer {low["index"]} ({_e(low["op_type"])}, '
                     f'r = {low["r"]:.3f}). <a href="#img{k}-layer{diverge}">first divergent layer</a> · '
                     f'<a href="#img{k}-layer{low["index"]}">largest change</a></p>')
    n = len(flow.layers)
    series, thresholds = [], []
    if per_base:
        series.append(("correlation to the baseline (same layer)", "#1f5fbf",
                       [per_base[layer.index]["r"] if layer.index in per_base else None
                        for layer in flow.layers]))
        thresholds.append(("baseline threshold", base["threshold"]))
    if stab_r:
        series.append(("attention shift to the final map (stability; lower is stabler)", "#888",
                       list(stab_r)))
        if stab.get("threshold") is not None:
            thresholds.append(("stability threshold", stab["threshold"]))
    if series:
        parts.append(_svg_chart(n, series, thresholds, diverge))
    rows = "current model" + (" (top) / baseline (bottom)" if bimg is not None else "")
    parts.append(f'<p class="rowlabel">{n} layers in forward order; {rows}; red frame: below the baseline '
                 'threshold; dark frame: the final layer; white outline: the expected region.</p>')
    parts.append('<div class="grid">')
    for layer in flow.layers:
        i = layer.index
        cls = ["layer"]
        p = per_base.get(i)
        if layer.final:
            cls.append("final")
        if p is not None and not p["ok"]:
            cls.append("below")
        if diverge == i:
            cls.append("first-divergence")
        cur = _png(_overlay_thumb(view, flow.resized(layer.tensor), region))
        th, tw = _thumb_size(*view.shape[:2])
        cell = [f'<figure class="{" ".join(cls)}" id="img{k}-layer{i}">',
                f'<img id="img{k}-l{i}-cur" class="flow current" src="{cur}" width="{tw}" height="{th}" '
                f'alt="layer {i} map">']
        if bimg is not None and p is not None:
            bmap = baseline.map(bimg, p["baseline_index"])
            b = _png(_overlay_thumb(view, flow.to_picture(bmap), region))
            cell.append(f'<img id="img{k}-l{i}-base" class="flow baseline" src="{b}" width="{tw}" '
                        f'height="{th}" alt="layer {i} baseline map">')
        h, w = layer.shape[2], layer.shape[3]
        cap = f"{i} · {_e(layer.op_type)} {h}×{w}"
        if p is not None:
            cap += f"<br>r<sub>base</sub> = {p['r']:.3f}"
        if stab_r is not None and stab_r[i] is not None:
            cap += f"<br>shift = {stab_r[i]:.3f}"
        cell.append(f'<figcaption title="{_e(layer.tensor)}">{cap}</figcaption></figure>')
        parts.append("".join(cell))
    parts.append("</div>")
    return "".join(parts)


def write_html(path: Path, report: dict, extras: dict, include_passing: bool = False) -> None:
    flows = extras.get("flows", {})
    by_key = {}
    for image, flow in flows.items():
        by_key[str(image)] = flow
    status = report["status"]
    s = report["summary"]
    model = report["model"]
    title = {"pass": "all checks passed", "fail": "checks failed",
             "error": "the run failed"}[status]
    out = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
           f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>naflow check: {_e(title)} – {_e(Path(model['path']).name)}</title>",
           f"<style>{CSS}</style></head><body>",
           f'<header class="h-{status}"><h1>naflow check: {_e(title)}</h1>'
           f"<p>{s['images']} images, {s['checks']} checks: {s['passed']} passed, {s['failed']} failed, "
           f"{s['skipped']} skipped, {s['errors']} errors</p></header><main>"]
    bl = report.get("baseline")
    out.append("<table>")
    info = [("model", f"{model['path']} (sha256 {model['sha256'][:16]}…, {model['layers']} layers)"),
            ("config", f"{report['config']['path']} (sha256 {report['config']['sha256'][:16]}…)"),
            ("method", f"{report['analysis']['method']}, target {report['analysis']['target']}, "
                       f"damp {report['analysis']['damp']}, preprocessing "
                       f"{report['analysis']['preprocess'].get('name')}"),
            ("checks", ", ".join(f"{k} = {json.dumps(v)}" for k, v in report["checks"].items()))]
    if bl:
        info.append(("baseline", f"{bl['path']} (model sha256 {bl['model_sha256'][:16]}…"
                                 f"{', the same model file' if bl.get('same_model') else ''}; "
                                 f"layers matched by {bl.get('matched_by')}; threshold {bl['threshold']})"))
    for k, v in info:
        out.append(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>")
    out.append("</table>")

    # overview
    names = list(report["checks"])
    out.append('<h2>Overview</h2><table id="overview"><tr><th>image</th><th>predicted</th>'
               + "".join(f"<th>{_e(n)}</th>" for n in names if n != "sanity") + "</tr>")
    per_image = [n for n in names if n != "sanity"]
    for k, e in enumerate(report["images"]):
        if e["status"] == "error":
            out.append(f'<tr><td>{_e(e["key"])}</td><td colspan="{len(per_image) + 1}" class="error">'
                       f'error: {_e(e["error"])}</td></tr>')
            continue
        t = e.get("target") or {}
        pred = str(e["prediction"])
        if t.get("label") and t.get("index") == e["prediction"]:
            pred += f" {t['label']}"
        recs = {r["check"]: r for r in e["checks"]}
        cells = []
        for n in per_image:
            r = recs.get(n)
            if r is None:
                cells.append("<td>–</td>")
                continue
            value = _fmt(r.get("value")) if r["status"] != "skip" else ""
            cells.append(f'<td class="{_e(r["status"])}">{_e(r["status"])} {value}</td>')
        link = f'<a href="#image-{k}">{_e(e["key"])}</a>' if (e["status"] == "fail" or include_passing) \
            else _e(e["key"])
        out.append(f"<tr><td>{link}</td><td>{_e(pred)}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    if report["model_checks"]:
        out.append("<h2>Model checks</h2>" + _checks_table(report["model_checks"]))
        sf = extras.get("sanity_flows")
        san = report["model_checks"][0]
        if sf and san["status"] == "fail":
            a, b = sf
            final = a.final_layer
            ia = _png(_overlay_thumb(a.picture, a.resized(final), None))
            ib = _png(_overlay_thumb(b.picture, b.resized(final), None))
            th, tw = _thumb_size(*a.picture.shape[:2])
            out.append('<div class="grid"><figure class="layer"><img id="sanity-trained" class="flow" '
                       f'src="{ia}" width="{tw}" height="{th}" alt="trained"><figcaption>trained model, final '
                       'layer</figcaption></figure><figure class="layer"><img id="sanity-random" class="flow" '
                       f'src="{ib}" width="{tw}" height="{th}" alt="randomised"><figcaption>randomised top '
                       'layers, final layer</figcaption></figure></div>')

    # per image
    for k, e in enumerate(report["images"]):
        if e["status"] == "error" or (e["status"] == "pass" and not include_passing):
            continue
        flow = by_key.get(e["path"])
        out.append(f'<section class="image" id="image-{k}"><h2>{_e(e["key"])} — '
                   f'<span class="{e["status"]}">{_e(e["status"])}</span></h2>')
        out.append(_checks_table(e["checks"]))
        if flow is not None:
            region = extras.get("regions", {}).get(e["key"])
            out.append(_flow_section(k, e, flow, region, extras.get("baseline"), extras.get("matching")))
        out.append("</section>")
    out.append('<pre id="render-check" hidden></pre>')
    out.append(f"<script>{JS}</script></main></body></html>")
    path.write_text("\n".join(out), encoding="utf-8")
