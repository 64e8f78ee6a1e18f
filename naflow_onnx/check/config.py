"""The ``naflow check`` configuration file (TOML): parsing, validation, one-line errors with lines.

Every key is declared in ``SCHEMA``; an unknown key or a value of the wrong type is reported as
``FILE:LINE: what is wrong`` (the line is found in the file text, tomllib only reports syntax
errors). Paths in the file are relative to the file's folder. ``docs/check.md`` is the reference.
"""
from __future__ import annotations

import difflib
import glob
import hashlib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NAFlowError
from ..methods import METHODS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
PRESETS = ("imagenet", "caffe-bgr", "none")


class ConfigError(NAFlowError):
    """The check configuration is malformed: names the file, the line and the key."""


# ------------------------------------------------------------------------------------------------
# schema: table -> key -> (kind, description). Kinds are checked by _check_value.

SCHEMA: dict[str, dict[str, str]] = {
    "inputs": {"images": "paths", "preprocess": "preset"},
    "expect": {"image": "path", "class": "class", "box": "box", "mask": "path",
               "final_mass_in_region": "fraction"},
    "checks": {"prediction": "bool", "final_mass_in_region": "fraction",
               "flow_stability": "shift", "baseline_correlation": "correlation",
               "sanity": "bool", "sanity_max_correlation": "correlation", "box_iou": "fraction"},
    "analysis": {"method": "method", "target": "target_mode", "damp": "damp", "layers": "str"},
    "stability": {"stages": "stages"},
    "baseline": {"path": "path", "match": "match", "layers": "layer_thresholds"},
    "sanity": {"layers": "positive_int", "seed": "int", "image": "path"},
}
ARRAY_TABLES = {"expect"}
DEFAULT_BASELINE_CORRELATION = 0.9
DEFAULT_SANITY_MAX_CORRELATION = 0.5
DEFAULT_SANITY_LAYERS = 3
DEFAULT_BOX_IOU = 0.5


@dataclass
class Expect:
    """One ``[[expect]]`` entry (index = its position among the ``[[expect]]`` tables)."""
    index: int
    image: Path
    cls: int | str | None = None
    box: list[float] | None = None
    mask: Path | None = None
    min_mass: float | None = None


@dataclass
class CheckConfig:
    path: Path
    display: str                     # the path as the user wrote it (for messages)
    text: str
    sha256: str
    images: list[Path]               # resolved, in order, no duplicates
    keys: dict[Path, str]            # image -> key (path relative to the config folder, posix)
    preprocess: str | None = None
    expect: dict[Path, Expect] = field(default_factory=dict)
    # checks (None = not enabled)
    prediction: bool = False
    final_mass: float | None = None
    flow_stability: float | None = None
    baseline_correlation: float | None = None
    sanity: float | None = None
    box_iou: float = DEFAULT_BOX_IOU     # detectors: IoU of the explained box with the expected one
    # analysis
    method: str = "naflow"
    target: str = "top1"             # top1 | expected
    damp: float | None = None
    layers: str | None = None
    # details of the checks
    stability_stages: str | int = "resolution"
    baseline_path: Path | None = None
    baseline_match: str = "auto"
    baseline_layers: dict[str, float] = field(default_factory=dict)
    sanity_layers: int = DEFAULT_SANITY_LAYERS
    sanity_seed: int = 0
    sanity_image: Path | None = None

    # -- line numbers for messages ---------------------------------------------------------------
    def line(self, table: str | None, key: str | None = None, index: int | None = None) -> int | None:
        return find_line(self.text, table, key, index)

    def error(self, message: str, table: str | None = None, key: str | None = None,
              index: int | None = None) -> ConfigError:
        return ConfigError(f"{self.where(table, key, index)}: {message}")

    def where(self, table=None, key=None, index=None) -> str:
        line = self.line(table, key, index) if table or key else None
        return f"{self.display}:{line}" if line else self.display

    def key_of(self, image: Path) -> str:
        return self.keys[image]

    def analysis_record(self) -> dict:
        """What makes maps comparable between a baseline and a check (stored in baselines)."""
        return {"method": self.method, "target": self.target, "damp": self.damp,
                "layers": self.layers or "all"}


# ------------------------------------------------------------------------------------------------
# line finder

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]\[]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_.\-]+))\s*=""")


def _unquote_dotted(name: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in name.split("."))


def find_line(text: str, table: str | None, key: str | None = None, index: int | None = None) -> int | None:
    """1-based line of ``key`` in ``[table]`` (the ``index``-th ``[[table]]`` for arrays), or of
    the table header when ``key`` is None; None when it cannot be found. Also finds dotted keys
    (``checks.prediction = true`` at the top level)."""
    current: tuple[str | None, int | None] = (None, None)
    counts: dict[str, int] = {}
    want = (table, index)
    fallback = None
    in_multiline = False
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw
        if in_multiline:
            if '"""' in line or "'''" in line:
                in_multiline = False
            continue
        if line.count('"""') == 1 or line.count("'''") == 1:
            in_multiline = True
        m = _HEADER.match(line)
        if m and not _KEY.match(line):
            name = _unquote_dotted(m.group(2))
            if m.group(1) == "[[":
                counts[name] = counts.get(name, 0) + 1
                current = (name, counts[name] - 1)
            else:
                current = (name, None)
            if key is None and current == want:
                return n
            if key is not None and table and "." not in table and name == f"{table}.{key}" \
                    and (index is None or current[1] == index):
                return n   # [baseline.layers] as a sub-table
            continue
        if key is None:
            continue
        k = _KEY.match(line)
        if not k:
            continue
        name = _unquote_dotted(k.group(1) or k.group(2) or k.group(3))
        if current == want and (name == key or name.split(".")[0] == key):
            return n
        full = ".".join(p for p in (current[0], name) if p)
        if table and full == f"{table}.{key}" and (index is None or current[1] == index):
            return n
        if fallback is None and name.split(".")[-1] == key:
            fallback = n
    return fallback


# ------------------------------------------------------------------------------------------------
# value checks


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v) -> str:
    return repr(v) if not isinstance(v, str) else f"'{v}'"


def _check_value(kind: str, v):
    """Returns an error text (without location) or None."""
    if kind == "bool":
        return None if isinstance(v, bool) else f"must be true or false, got {_fmt(v)}"
    if kind == "fraction":
        if not _is_number(v) or not 0 <= v <= 1:
            return f"must be a number between 0 and 1, got {_fmt(v)}"
        return None
    if kind == "shift":
        if not _is_number(v) or not 0 <= v <= 2:
            return f"must be a distance between 0 and 2 (image sizes), got {_fmt(v)}"
        return None
    if kind == "correlation":
        if not _is_number(v) or not -1 <= v <= 1:
            return f"must be a correlation between -1 and 1, got {_fmt(v)}"
        return None
    if kind in ("path", "str"):
        return None if isinstance(v, str) and v.strip() else f"must be a non-empty string, got {_fmt(v)}"
    if kind == "paths":
        if isinstance(v, str) and v.strip():
            return None
        if isinstance(v, list) and v and all(isinstance(s, str) and s.strip() for s in v):
            return None
        return f"must be a glob or a non-empty list of files, got {_fmt(v)}"
    if kind == "preset":
        return None if v in PRESETS else f"must be one of {', '.join(PRESETS)}, got {_fmt(v)}"
    if kind == "method":
        return None if v in METHODS else f"must be one of {', '.join(METHODS)}, got {_fmt(v)}"
    if kind == "target_mode":
        return None if v in ("top1", "expected") else f"must be 'top1' or 'expected', got {_fmt(v)}"
    if kind == "match":
        return None if v in ("auto", "name", "depth") else \
            f"must be 'auto', 'name' or 'depth', got {_fmt(v)}"
    if kind == "damp":
        if v == "inf" or (_is_number(v) and v >= 0):
            return None
        return f"must be a number >= 0 or \"inf\", got {_fmt(v)}"
    if kind == "stages":
        if v == "resolution" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return None
        return f"must be \"resolution\" or a whole number >= 1, got {_fmt(v)}"
    if kind == "positive_int":
        return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else \
            f"must be a whole number >= 1, got {_fmt(v)}"
    if kind == "int":
        return None if isinstance(v, int) and not isinstance(v, bool) else \
            f"must be a whole number, got {_fmt(v)}"
    if kind == "class":
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return None
        if isinstance(v, str) and v.strip():
            return None
        return f"must be a class index (>= 0) or a label, got {_fmt(v)}"
    if kind == "box":
        if isinstance(v, list) and len(v) == 4 and all(_is_number(x) for x in v):
            x0, y0, x1, y1 = v
            if x1 <= x0 or y1 <= y0:
                return f"must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1, got {v}"
            if min(v) < 0:
                return f"must have non-negative coordinates, got {v}"
            return None
        return f"must be [x0, y0, x1, y1] (4 numbers, network-input pixels), got {_fmt(v)}"
    if kind == "layer_thresholds":
        if isinstance(v, dict) and all(_is_number(x) and -1 <= x <= 1 for x in v.values()):
            for pattern in v:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    return f"key '{pattern}' is not a valid regex: {exc}"
            return None
        return "must be a table of layer name (or regex) = correlation threshold between -1 and 1"
    raise AssertionError(kind)


# ------------------------------------------------------------------------------------------------


def _unknown(name: str, known) -> str:
    close = difflib.get_close_matches(name.split(".")[-1], list(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
    return f"unknown key '{name}'{hint}"


def load_config(path, display: str | None = None) -> CheckConfig:
    """Read, validate and resolve a check configuration. Raises ConfigError (one line)."""
    path = Path(path)
    display = display or str(path)
    if not path.is_file():
        raise ConfigError(f"{display}: configuration file not found")
    try:
        raw_bytes = path.read_bytes()
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{display}: not a UTF-8 text file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        if m:
            msg = msg[: m.start()].strip()
            raise ConfigError(f"{display}:{m.group(1)}: invalid TOML: {msg} (column {m.group(2)})") from None
        raise ConfigError(f"{display}: invalid TOML: {msg}") from None

    where = lambda table, key=None, index=None: (  # noqa: E731
        f"{display}:{find_line(text, table, key, index)}"
        if find_line(text, table, key, index) else display)

    # --- structure: unknown tables/keys and value types -----------------------------------------
    for table, content in data.items():
        if table not in SCHEMA:
            line = (find_line(text, table) or find_line(text, table, None, 0)
                    or find_line(text, None, table))
            close = difflib.get_close_matches(table, list(SCHEMA), n=1)
            hint = f"; did you mean [{close[0]}]?" if close else f" (known: {', '.join(SCHEMA)})"
            what = "table" if isinstance(content, (dict, list)) else "top-level key"
            raise ConfigError(f"{display}:{line}: unknown {what} '{table}'{hint}" if line else
                              f"{display}: unknown {what} '{table}'{hint}")
        if table in ARRAY_TABLES:
            if not isinstance(content, list):
                raise ConfigError(f"{where(None, table)}: '{table}' must be an array of tables "
                                  f"([[{table}]])")
            entries = list(enumerate(content))
        else:
            if not isinstance(content, dict):
                raise ConfigError(f"{where(None, table)}: '{table}' must be a table ([{table}])")
            entries = [(None, content)]
        for index, entry in entries:
            if not isinstance(entry, dict):
                raise ConfigError(f"{where(None, table)}: every '{table}' entry must be a table")
            for key, value in entry.items():
                if key not in SCHEMA[table]:
                    raise ConfigError(f"{where(table, key, index)}: "
                                      f"{_unknown(f'{table}.{key}', SCHEMA[table])}")
                problem = _check_value(SCHEMA[table][key], value)
                if problem:
                    label = f"{table}[{index}].{key}" if index is not None else f"{table}.{key}"
                    raise ConfigError(f"{where(table, key, index)}: {label} {problem}")

    base = path.parent
    cfg = CheckConfig(path=path, display=display, text=text,
                      sha256=hashlib.sha256(raw_bytes).hexdigest(), images=[], keys={})

    def key_of(p: Path) -> str:
        try:
            return p.relative_to(base.resolve()).as_posix()
        except ValueError:
            return p.as_posix()

    def resolve_file(rel: str, table, key, index=None, what="image") -> Path:
        p = (base / rel).resolve()
        if not p.is_file():
            raise ConfigError(f"{where(table, key, index)}: {what} not found: {rel}"
                              + (f" (looked for {p})" if not Path(rel).is_absolute() else ""))
        return p

    # --- inputs ----------------------------------------------------------------------------------
    inputs = data.get("inputs", {})
    cfg.preprocess = inputs.get("preprocess")
    spec = inputs.get("images")
    patterns = [spec] if isinstance(spec, str) else list(spec or [])
    found: list[Path] = []
    for pat in patterns:
        if any(ch in pat for ch in "*?["):
            hits = sorted(Path(h).resolve() for h in glob.glob(str(base / pat), recursive=True))
            hits = [h for h in hits if h.is_file() and h.suffix.lower() in IMAGE_SUFFIXES]
            if not hits:
                raise ConfigError(f"{where('inputs', 'images')}: inputs.images '{pat}' matches no "
                                  f"image file (relative to {base.resolve()})")
            found.extend(hits)
        else:
            found.append(resolve_file(pat, "inputs", "images"))

    # --- expectations ----------------------------------------------------------------------------
    for index, entry in enumerate(data.get("expect", [])):
        if "image" not in entry:
            raise ConfigError(f"{where('expect', None, index)}: expect[{index}] has no 'image' key")
        img = resolve_file(entry["image"], "expect", "image", index)
        if img in cfg.expect:
            raise ConfigError(f"{where('expect', 'image', index)}: expect[{index}].image "
                              f"'{entry['image']}' is already described by an earlier [[expect]]")
        if "box" in entry and "mask" in entry:
            raise ConfigError(f"{where('expect', 'mask', index)}: expect[{index}] has both 'box' and "
                              "'mask': give one region")
        mask = resolve_file(entry["mask"], "expect", "mask", index, what="mask") if "mask" in entry else None
        cfg.expect[img] = Expect(index=index, image=img, cls=entry.get("class"),
                                 box=[float(v) for v in entry["box"]] if "box" in entry else None,
                                 mask=mask, min_mass=entry.get("final_mass_in_region"))
        if img not in found:
            found.append(img)   # an [[expect]] image is an input even when the glob misses it
    if not found:
        raise ConfigError(f"{where('inputs')}: no images: set inputs.images (a glob or a list) or "
                          "add [[expect]] entries")
    seen = set()
    for p in found:
        if p not in seen:
            seen.add(p)
            cfg.images.append(p)
            cfg.keys[p] = key_of(p)

    # --- checks ----------------------------------------------------------------------------------
    checks = data.get("checks", {})
    cfg.prediction = bool(checks.get("prediction", False))
    cfg.final_mass = checks.get("final_mass_in_region")
    cfg.flow_stability = checks.get("flow_stability")
    cfg.baseline_correlation = checks.get("baseline_correlation")
    cfg.box_iou = checks.get("box_iou", DEFAULT_BOX_IOU)
    if "sanity_max_correlation" in checks and checks.get("sanity") is not False:
        cfg.sanity = float(checks["sanity_max_correlation"])
    elif checks.get("sanity"):
        cfg.sanity = DEFAULT_SANITY_MAX_CORRELATION
    if cfg.final_mass is not None and not any(e.box or e.mask for e in cfg.expect.values()):
        raise ConfigError(f"{where('checks', 'final_mass_in_region')}: checks.final_mass_in_region "
                          "needs at least one [[expect]] with a 'box' or a 'mask'")
    if cfg.prediction and not any(e.cls is not None for e in cfg.expect.values()):
        raise ConfigError(f"{where('checks', 'prediction')}: checks.prediction needs at least one "
                          "[[expect]] with a 'class'")

    analysis = data.get("analysis", {})
    cfg.method = analysis.get("method", "naflow")
    cfg.target = analysis.get("target", "top1")
    damp = analysis.get("damp")
    cfg.damp = math.inf if damp == "inf" else (None if damp is None else float(damp))
    cfg.layers = analysis.get("layers")

    cfg.stability_stages = data.get("stability", {}).get("stages", "resolution")
    bl = data.get("baseline", {})
    if "path" in bl:
        cfg.baseline_path = (base / bl["path"]).resolve()
    cfg.baseline_match = bl.get("match", "auto")
    cfg.baseline_layers = {k: float(v) for k, v in bl.get("layers", {}).items()}
    san = data.get("sanity", {})
    cfg.sanity_layers = san.get("layers", DEFAULT_SANITY_LAYERS)
    cfg.sanity_seed = san.get("seed", 0)
    if "image" in san:
        img = resolve_file(san["image"], "sanity", "image")
        if img not in cfg.images:
            raise ConfigError(f"{where('sanity', 'image')}: sanity.image '{san['image']}' is not one "
                              "of the inputs")
        cfg.sanity_image = img
    return cfg
