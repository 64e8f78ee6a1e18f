#!/usr/bin/env bash
# One-shot GPU check for the device machine (see bench/README.md): installs the carried wheels,
# runs the engine's real-model and property tests with torch on CUDA (onnxruntime on its CPU
# provider: onnxruntime-gpu is too large to carry), then the perf bench on CUDA.
set -uo pipefail
OUT=${OUT:-/tmp/naflow-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, onnxruntime as o; print(torch.__version__, torch.cuda.get_device_name(0), o.__version__, o.get_available_providers())" | tee -a "$OUT/gpu.txt"
NAFLOW_TEST_THREADS=8 timeout 220 python3 -m pytest -q -p no:cacheprovider tests/test_small_models.py \
  tests/test_real_models.py tests/test_similarity.py tests/test_rules.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
timeout 300 python3 bench/perf.py --device cuda --threads 8 --models mobilenet-v2,opennsfw,resnet50 \
  --sizes 224 --repeats 3 --batch 8 --timeout 120 --out "$OUT/perf_gpu.json" 2>&1 | tail -40 | tee "$OUT/perf_gpu.txt"
