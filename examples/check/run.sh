#!/usr/bin/env bash
# The worked example of docs/check.md, end to end (about 3 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/naflow-check-example}
mkdir -p "$OUT"
naflow export --model mobilenet-v2 -o "$OUT/mobilenet_v2.onnx"
naflow baseline "$OUT/mobilenet_v2.onnx" --config naflow-check.toml -o "$OUT/baseline.npz"
naflow check "$OUT/mobilenet_v2.onnx" --config naflow-check.toml --baseline "$OUT/baseline.npz" \
    --out "$OUT/report-trusted" && echo "exit 0: all checks pass"
python tamper.py "$OUT/mobilenet_v2.onnx" "$OUT/mobilenet_v2_tampered.onnx"
set +e
naflow check "$OUT/mobilenet_v2_tampered.onnx" --config naflow-check.toml \
    --baseline "$OUT/baseline.npz" --out "$OUT/report-tampered"
echo "exit $?: checks failed on purpose; open $OUT/report-tampered/report.html"
