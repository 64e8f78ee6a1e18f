#!/usr/bin/env bash
# One-shot GPU check for the device machine (see bench/README.md): installs the carried wheels,
# runs the engine's tests with torch on CUDA (onnxruntime on its CPU provider: onnxruntime-gpu is
# too large to carry), the perf bench on CUDA, and the 25 real timm families (timm and
# torchvision are on that machine's image) with the rebuild on CUDA. Results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/naflow-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, onnxruntime as o, timm; print(torch.__version__, torch.cuda.get_device_name(0), o.__version__, o.get_available_providers(), timm.__version__)" | tee -a "$OUT/gpu.txt"
NAFLOW_TEST_THREADS=8 timeout ${GPU_TEST_S:-170} python3 -m pytest -q -p no:cacheprovider -W ignore \
  tests/test_small_models.py tests/test_real_models.py tests/test_norm_gates.py tests/test_branches.py \
  tests/test_families.py tests/test_rapidocr.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
timeout ${GPU_PERF_S:-150} python3 bench/perf.py --device cuda --threads 8 --models mobilenet-v2,resnet50 \
  --sizes 224 --repeats 3 --batch 8 --timeout 120 --out "$OUT/perf_gpu.json" 2>&1 | tail -30 | tee "$OUT/perf_gpu.txt"
timeout ${GPU_TIMM_S:-180} python3 bench/timm_families.py --no-stub --device cuda --threads 8 --size 224 \
  --repeats 3 --timeout 60 --out "$OUT/timm_families_gpu.json" 2>&1 | tail -30 | tee "$OUT/timm_families_gpu.txt"
# issue 17: batched images/s on CUDA (goals: MobileNetV2 >= 200, ResNet-50 >= 50 images/s, every
# solve converged); onnxruntime stays on its CPU provider here
timeout ${GPU_THROUGHPUT_S:-200} python3 bench/throughput.py --device cuda --threads 8 --images 64 \
  --batch 32 --repeats 3 --out "$OUT/throughput_gpu.json" 2>&1 | tail -8 | tee "$OUT/throughput_gpu.txt"
