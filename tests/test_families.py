"""Issue 13's acceptance tests: 25 CNN families (plain-torch re-implementations of timm 1.0.29's
topologies, tests/families.py), exported with the legacy exporter at opset 17 and analysed by
naflow_onnx.Analyzer. For each: at least 90% of the spatial Conv outputs on the data path
(counted from the ONNX graph alone) get a map; the final layer is the net's last spatial feature
map (its captured value equals torch's ``features(x)``); torch/onnxruntime parity <= 1e-4;
every solve converged. A few families are also exported with BatchNorm kept (not folded)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import naflow_onnx as nf
import families

KEEP_BN = ("resnet50d", "densenet121", "mobilenetv3", "dpn68")
CASES = [(name, False) for name in families.FAMILIES] + [(name, True) for name in KEEP_BN]
MIN_COVERAGE = 0.9
PARITY = 1e-4

_results: dict = {}


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def analysed(name: str, keep_bn: bool, folder):
    """(net, ONNX path, Analyzer, Flow) for one case, made once per session; an exception while
    exporting or analysing is kept and re-raised by every test of that case."""
    key = (name, keep_bn)
    if key not in _results:
        try:
            model, path = families.export_family(name, folder, keep_bn)
            an = nf.Analyzer(path, parity_tol=PARITY, device="cpu")
            size = families.FAMILIES[name].size
            image = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
            flow = an.analyze(image, keep_tensors=True)
            _results[key] = (model, path, an, flow)
        except Exception as exc:  # noqa: BLE001 - re-raised below, per test
            _results[key] = exc
    res = _results[key]
    if isinstance(res, Exception):
        raise res
    return res


def ids(case):
    return f"{case[0]}{'-bn' if case[1] else ''}"


@pytest.mark.parametrize("case", CASES, ids=[ids(c) for c in CASES])
def test_spatial_convs_are_mapped(case, family_dir):
    _, path, _, flow = analysed(*case, family_dir)
    convs = families.spatial_conv_outputs(path)
    assert len(convs) >= 5, convs
    mapped = [t for t in convs if t in flow.maps]
    missing = sorted(set(convs) - set(mapped))
    assert len(mapped) >= MIN_COVERAGE * len(convs), \
        f"{len(mapped)}/{len(convs)} spatial conv outputs mapped; missing {missing[:8]}"
    for t in mapped:
        assert np.all(np.isfinite(flow.maps[t])), t


@pytest.mark.parametrize("case", CASES, ids=[ids(c) for c in CASES])
def test_final_tensor_is_the_last_feature_map(case, family_dir):
    model, _, an, flow = analysed(*case, family_dir)
    final = flow.final_layer
    assert flow.layers[-1].tensor == final and flow.layers[-1].final
    env = flow.tensors["env"]
    x = env[an.graph.input_name].float()
    with torch.no_grad():
        want = model.features(x)
    got = env[final].float()
    assert tuple(got.shape) == tuple(want.shape), (final, tuple(got.shape), tuple(want.shape))
    err = float((got - want).norm() / want.norm())
    assert err <= 1e-4, (final, err)


@pytest.mark.parametrize("case", CASES, ids=[ids(c) for c in CASES])
def test_parity_and_convergence(case, family_dir):
    _, _, _, flow = analysed(*case, family_dir)
    assert flow.parity["max_relative_error"] <= PARITY
    summary = flow.solver_summary()
    assert summary["solved"] > 0 and summary["all_converged"], summary
    for layer in flow.layers:
        assert layer.final or layer.solver is not None, layer.tensor
        if layer.solver and "converged" in layer.solver:
            assert layer.solver["converged"], (layer.tensor, layer.solver)
