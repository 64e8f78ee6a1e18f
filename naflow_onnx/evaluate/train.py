"""Train the synthetic-benchmark CNNs on CPU and export them to ONNX.

    python -m naflow_onnx.evaluate.train --arch plain --out models/synth_plain.onnx
    python -m naflow_onnx.evaluate.train --all --out-dir models

Seeded end to end (data seeds, torch.manual_seed, deterministic algorithms, a fixed number
of CPU threads). Training data: ``make_dataset(n_train, seed=train_seed)``; the test set is
a held-out generator seed (``test_seed``), never seen in training. Augmentation: random
horizontal/vertical flips and 90-degree rotations (they preserve the class and the mask).

The ONNX file carries ``metadata_props``:

* ``naflow.preprocess`` = ``{"mean": [0.5,0.5,0.5], "std": [0.25,0.25,0.25], "size": 96,
  "layout": "NCHW", "channel_order": "RGB", "scale": 255}``, meaning
  ``x = (rgb_uint8 / scale - mean) / std`` per channel, laid out N x C x H x W;
* ``naflow.synthetic`` = JSON with the class names, architecture, seeds, generator version
  and the measured accuracies.
"""
from __future__ import annotations

import io
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..io import atomic_write
from . import nets
from .synthetic import CLASSES, GENERATOR_VERSION, make_dataset

PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "size": 96,
              "layout": "NCHW", "channel_order": "RGB", "scale": 255}

# Epochs per architecture: every net sits on a ~50 % plateau (loss near ln 2: one of the two
# class factors learned) before it finds the conjunction of shape and texture; plain left it
# in epoch 5, residual and gated in epochs 6-7, conv4 in epochs 8-11 (12 epochs gave conv4
# only 0.902 test accuracy). See docs/evaluation.md.
EPOCHS = {"plain": 12, "residual": 12, "conv4": 24, "gated": 16, "dense": 16, "inception": 16}

DEFAULTS = dict(n_train=4000, n_test=1000, batch_size=64, lr=3e-3, weight_decay=5e-4,
                seed=0, train_seed=1, test_seed=2, threads=2)


def preprocess(images: np.ndarray, pre: dict = PREPROCESS) -> torch.Tensor:
    """uint8 (or float in 0..255) ``[N,H,W,3]`` RGB -> float32 ``[N,3,H,W]`` network input."""
    x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32) / float(pre["scale"])
    mean = torch.tensor(pre["mean"], dtype=torch.float32)
    std = torch.tensor(pre["std"], dtype=torch.float32)
    return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and quarter turns, one draw per batch (class- and mask-preserving)."""
    flips = torch.randint(0, 2, (2,), generator=gen).tolist()
    k = int(torch.randint(0, 4, (1,), generator=gen))
    if flips[0]:
        x = x.flip(3)
    if flips[1]:
        x = x.flip(2)
    return torch.rot90(x, k, dims=(2, 3)) if k else x


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def onnx_accuracy(onnx_bytes: bytes, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the exported model under onnxruntime (batch 1, as exported)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    xs = x.numpy()
    pred = np.array([sess.run(None, {"image": xs[i:i + 1]})[0].argmax(1)[0] for i in range(len(xs))])
    return float((pred == y.numpy()).mean())


def export_onnx(model: torch.nn.Module, size: int, meta: dict) -> bytes:
    """The model as ONNX bytes (TorchScript exporter, opset 17, batch 1) with metadata_props."""
    import onnx

    buf = io.BytesIO()
    x = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():  # the TorchScript exporter is chosen on purpose (dynamo=False)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model.eval(), x, buf, dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"])
    proto = onnx.load_from_string(buf.getvalue())
    pre = dict(PREPROCESS, size=size)
    for key, value in (("naflow.preprocess", pre), ("naflow.synthetic", meta)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value, sort_keys=True)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _data(n: int, seed: int, size: int, cache_dir: Path | None):
    if cache_dir is not None:
        from .synthetic import load_dataset, save_dataset

        p = cache_dir / f"synth_n{n}_seed{seed}_s{size}_v{GENERATOR_VERSION}.npz"
        if p.exists():
            return load_dataset(p)
        d = make_dataset(n, seed, size)
        save_dataset(p, d, n=n, seed=seed, size=size)
        return d
    return make_dataset(n, seed, size)


def _train(arch: str, out: Path | None, n_train: int, n_test: int, epochs: int, batch_size: int,
          lr: float, weight_decay: float, seed: int, train_seed: int, test_seed: int, threads: int,
          size: int = 96, cache_dir: Path | None = None, log=print, deterministic: bool = True) -> dict:
    torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    # deterministic mode would also fill every new tensor with NaN (a debugging aid; the
    # fills took 29 % of a training step's CPU time in a profile); results do not depend on it.
    torch.utils.deterministic.fill_uninitialized_memory = False
    t0 = time.perf_counter()
    tr = _data(n_train, train_seed, size, cache_dir)
    te = _data(n_test, test_seed, size, cache_dir)
    t_data = time.perf_counter() - t0
    cl = torch.channels_last  # faster oneDNN convolutions on CPU
    xtr, ytr = preprocess(tr["images"]).contiguous(memory_format=cl), torch.as_tensor(tr["labels"])
    xte, yte = preprocess(te["images"]).contiguous(memory_format=cl), torch.as_tensor(te["labels"])

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = nets.build(arch, size).to(memory_format=cl)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (n_train + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.2)
    t1, c1 = time.perf_counter(), time.process_time()
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=gen)
        total, seen = 0.0, 0
        for i in range(0, n_train, batch_size):
            idx = perm[i:i + batch_size]
            xb = _augment(xtr[idx], gen).contiguous(memory_format=cl)
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        acc = accuracy(model, xte, yte)
        history.append(dict(epoch=epoch + 1, loss=total / seen, test_acc=acc))
        log(f"[{arch}] epoch {epoch + 1:2d}/{epochs} loss {total / seen:.4f} test acc {acc:.4f} "
            f"({time.perf_counter() - t1:.0f} s)")
    t_train, c_train = time.perf_counter() - t1, time.process_time() - c1
    model = model.to(memory_format=torch.contiguous_format).eval()
    xtr, xte = xtr.contiguous(), xte.contiguous()
    summary = dict(arch=arch, params=nets.n_params(model), n_train=n_train, n_test=n_test, epochs=epochs,
                   batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                   train_seed=train_seed, test_seed=test_seed, threads=threads, size=size,
                   train_acc=accuracy(model, xtr, ytr), test_acc=accuracy(model, xte, yte),
                   data_seconds=round(t_data, 1), train_seconds=round(t_train, 1),
                   train_cpu_seconds=round(c_train, 1),
                   torch_version=torch.__version__)
    if out is not None:
        meta = dict(classes=list(CLASSES), generator="naflow_onnx.evaluate.synthetic",
                    generator_version=GENERATOR_VERSION,
                    **{k: summary[k] for k in ("arch", "params", "n_train", "n_test", "epochs", "seed",
                                               "train_seed", "test_seed", "train_acc", "test_acc")})
        data = export_onnx(model, size, meta)
        summary["onnx_test_acc"] = onnx_accuracy(data, xte, yte)
        atomic_write(Path(out), data)
        summary["onnx_path"] = str(out)
        summary["onnx_bytes"] = len(data)
    summary["history"] = history
    return summary


def train(arch: str, out: Path | None, n_train: int, n_test: int, epochs: int, batch_size: int,
          lr: float, weight_decay: float, seed: int, train_seed: int, test_seed: int, threads: int,
          size: int = 96, cache_dir: Path | None = None, log=print, deterministic: bool = True) -> dict:
    """Train one architecture; export to ``out`` (if given). Returns a summary dict.

    Sets torch's thread count and deterministic mode for the run and restores them after.
    ``deterministic=False`` skips torch.use_deterministic_algorithms, whose first call
    imports torch._inductor (over 10 s on a busy 2-core machine); for smoke tests only.
    """
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    try:
        return _train(arch, out, n_train, n_test, epochs, batch_size, lr, weight_decay, seed, train_seed,
                      test_seed, threads, size, cache_dir, log, deterministic)
    finally:
        torch.set_num_threads(saved[0])
        if deterministic:
            torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.utils.deterministic.fill_uninitialized_memory = saved[3]


if __name__ == "__main__":   # the command lives in evaluate.cli
    from naflow_onnx.evaluate.cli import train_main
    sys.exit(train_main())
