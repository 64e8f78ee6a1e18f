"""Make the 'corrupted late layer' copy of a model for the worked example (docs/check.md):
the weights of its last convolution are redrawn at random (N(0, their std), seed 0;
naflow_onnx.randomise).

    python examples/check/tamper.py mobilenet_v2.onnx mobilenet_v2_tampered.onnx
"""
import sys

import onnx

from naflow_onnx.check import randomise_weights

if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    # skip=1 keeps the classifier (the top-most weight layer); count=1 changes the next one down
    model, changed = randomise_weights(src, count=1, skip=1, seed=0)
    onnx.save(model, dst)
    print(f"{dst}: randomised {', '.join(changed)}")
