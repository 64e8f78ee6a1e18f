#!/usr/bin/env bash
# Set up, export the bundled real model (ImageNet MobileNetV2) and write the attention flow of
# skimage's chelsea photo to out/chelsea/ (flow.png, flow.json, maps.npz).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
. .venv/bin/activate
model=models/mobilenet_v2.onnx
if [ ! -f "$model" ]; then
  naflow export --model mobilenet-v2 -o "$model"
fi
photo=$(python -c "import importlib.util, os; print(os.path.join(importlib.util.find_spec('skimage').submodule_search_locations[0], 'data', 'chelsea.png'))")
naflow analyze "$model" "$photo" --out out/chelsea --compare gradcam "$@"
