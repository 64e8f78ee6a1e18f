"""Real timm models, as a new user would try them: every CNN family of issue 13 built with timm
(random weights), exported with naflow's exporter (legacy TorchScript exporter, opset 17, BN
folded) and analysed with naflow, one subprocess per model.

Per model it records whether the analysis succeeded (else the one-line error), the share of the
spatial (H·W > 1) Conv outputs on the data path that got a map, the final tensor and whether it
is the input of the head (the last spatial 4-D tensor the score depends on), parity, solver
convergence, and NAFlow time / (F+B) time of the same torch model, measured side by side.

timm imports torchvision, whose PyPI build does not load beside this CPU torch: the bench puts
a stand-in module (``bench/stubs/torchvision.py``) first on the path; timm's model code does
not use it. Install timm without its dependencies:

    pip install --no-deps timm==1.0.29 huggingface_hub safetensors
    python bench/timm_families.py --size 128 --out bench/results/timm_families.json

Where torchvision loads (a CUDA machine), the stand-in is not used (``--no-stub``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FAMILIES = {
    "DenseNet-121": "densenet121", "Inception-v3": "inception_v3", "GhostNet": "ghostnet_100",
    "DLA-34": "dla34", "HRNet-W18-small": "hrnet_w18_small", "CSPDarknet-53": "cspdarknet53",
    "Res2Net-50": "res2net50_26w_4s", "ReXNet-100": "rexnet_100", "SelecSLS-42b": "selecsls42b",
    "ConvNeXt": "convnext_atto", "DPN-68": "dpn68", "ResNet-50-D": "resnet50d",
    "SE-ResNeXt-26d": "seresnext26d_32x4d", "EfficientNet-B0": "efficientnet_b0",
    "MobileNetV3": "mobilenetv3_large_100", "RegNetY": "regnety_002", "VGG-11-BN": "vgg11_bn",
    "RepVGG": "repvgg_a0", "Xception": "xception41", "tf-EfficientNet-Lite0": "tf_efficientnet_lite0",
    "MixNet": "mixnet_s", "LCNet": "lcnet_050", "NF-ResNet": "nf_resnet50", "ResNetV2": "resnetv2_50",
    "GERNet": "gernet_s",
}


def _median_ms(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def worker(name: str, size: int, threads: int, repeats: int, device: str = "cpu") -> dict:
    """One model, in this process: export, analyse, time."""
    import numpy as np
    import onnx
    import timm
    import torch

    import naflow_onnx as nf
    from exporters.torch_export import export
    from naflow_onnx.errors import NAFlowError

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    rec: dict = {"model": name, "size": size}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        export(model, path, (1, 3, size, size), preprocess="imagenet")
        rng = np.random.default_rng(0)
        image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        try:
            analyzer = nf.Analyzer(path, device=device, provider="cpu")
            flow = analyzer.analyze(image, keep_tensors=True)
        except NAFlowError as exc:
            rec.update(status="refused", error=str(exc).splitlines()[0][:400])
            return rec
        except Exception as exc:  # a crash is a finding too
            rec.update(status="crashed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            return rec
        # spatial Conv outputs on the data path, from the ONNX file and the captured shapes
        onnx_model = onnx.load(str(path))
        shapes = {t: tuple(v.shape) for t, v in _tensors(flow)["A"].items()}
        convs = [n.output[0] for n in onnx_model.graph.node if n.op_type == "Conv"
                 and n.output[0] in shapes and len(shapes[n.output[0]]) == 4
                 and shapes[n.output[0]][2] * shapes[n.output[0]][3] > 1]
        mapped = [t for t in convs if t in flow.maps]
        # the head's input: timm's forward_features output must equal the final tensor
        with torch.no_grad():
            x = torch.from_numpy(analyzer.preprocess.to_input(
                np.asarray(flow.image))).float()
            feats = model.forward_features(x)
        model = model.to(device)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        final = flow.final_layer
        fa = _tensors(flow)["A"][final].detach().cpu()
        final_ok = tuple(fa.shape) == tuple(feats.shape) and bool(
            torch.allclose(fa, feats, rtol=1e-3, atol=1e-4 * float(feats.abs().max())))
        summary = flow.solver_summary() if callable(flow.solver_summary) else flow.solver_summary
        # F+B of the torch model and a warm NAFlow, side by side
        xg = x.clone().to(device).requires_grad_(True)

        def fb():
            model.zero_grad(set_to_none=True)
            model(xg)[0, 0].backward()

        fb_ms = _median_ms(fb, repeats, sync)
        naflow_ms = _median_ms(lambda: analyzer.analyze(image), repeats, sync)
        rec.update(status="ok", layers=len(flow.layers), spatial_convs=len(convs),
                   convs_mapped=len(mapped), coverage=round(len(mapped) / max(len(convs), 1), 3),
                   final_tensor=final, final_is_features=final_ok,
                   parity=flow.parity.get("max_relative_error"),
                   all_converged=summary.get("all_converged"),
                   max_convergence=summary.get("max_convergence"),
                   fb_ms=round(fb_ms, 1), naflow_ms=round(naflow_ms, 1),
                   ratio=round(naflow_ms / fb_ms, 1))
    return rec


def _tensors(flow) -> dict:
    """The kept tensors as a dict (``flow.tensors`` is a dict or a typed object)."""
    t = flow.tensors
    if isinstance(t, dict):
        return t
    return {"A": t.A if hasattr(t, "A") else t.activations}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="torch device of the rebuild and the F+B (cpu, cuda)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--families", default="all", help="comma list of family names or timm names")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--no-stub", action="store_true", help="use the installed torchvision")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "timm_families.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.size, a.threads, a.repeats, a.device)))
        return 0
    wanted = FAMILIES if a.families == "all" else {
        k: v for k, v in FAMILIES.items() if k in a.families.split(",") or v in a.families.split(",")}
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    paths = [str(ROOT)] + ([] if a.no_stub else [str(ROOT / "bench" / "stubs")])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    results = []
    for family, name in wanted.items():
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", name, "--size", str(a.size),
                                   "--threads", str(a.threads), "--repeats", str(a.repeats),
                                   "--device", a.device],
                                  capture_output=True, text=True, timeout=a.timeout, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            rec = json.loads(lines[-1]) if lines else {
                "model": name, "status": "crashed",
                "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        except subprocess.TimeoutExpired:
            rec = {"model": name, "status": "timeout", "error": f"over {a.timeout} s"}
        rec["family"], rec["wall_s"] = family, round(time.perf_counter() - t0, 1)
        results.append(rec)
        print(f"{family:22s} {rec['status']:8s} " + (
            f"coverage {rec['coverage']:.2f} final_ok {rec['final_is_features']} parity "
            f"{rec['parity']:.1e} converged {rec['all_converged']} ratio {rec['ratio']}"
            if rec["status"] == "ok" else rec.get("error", "")), flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"size": a.size, "threads": a.threads, "device": a.device,
                                           "results": results}, indent=1))
    ok = sum(r["status"] == "ok" and r.get("coverage", 0) >= 0.9 and r.get("final_is_features")
             and r.get("all_converged") for r in results)
    print(f"{ok} of {len(results)} families: analysed, >= 90% of spatial convs mapped, the right "
          "final tensor, every solve converged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
