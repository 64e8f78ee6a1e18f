"""Metrics of naflow_onnx.evaluate.metrics on hand-made maps and toy models."""
from __future__ import annotations

import numpy as np
import pytest

from naflow_onnx.evaluate import metrics as M


def _disc_mask(h=48, w=48, cx=30, cy=20, r=8):
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


# ----------------------------------------------------------------------------- localisation

def test_map_equal_to_mask_scores_one():
    mask = _disc_mask()
    m = mask.astype(float)
    assert M.energy_in_mask(m, mask) == 1.0
    assert M.pointing_game(m, mask) == 1.0
    assert M.energy_in_mask(1.0 - m, mask) == 0.0
    assert M.pointing_game(1.0 - m, mask) == 0.0


def test_uniform_random_map_scores_area_fraction():
    mask = _disc_mask()
    frac = mask.mean()
    rng = np.random.default_rng(0)
    maps = rng.random((400,) + mask.shape)
    energy = np.mean([M.energy_in_mask(m, mask) for m in maps])
    pointing = np.mean([M.pointing_game(m, mask) for m in maps])
    assert abs(energy - frac) < 0.01
    # 400 Bernoulli(frac ~ 0.087) draws: sd ~ 0.014
    assert abs(pointing - frac) < 0.05


def test_energy_edge_cases():
    mask = _disc_mask()
    assert np.isnan(M.energy_in_mask(np.zeros(mask.shape), mask))
    assert np.isnan(M.energy_in_mask(-np.ones(mask.shape), mask))
    # negative values are clipped: they neither add nor remove mass
    m = np.where(mask, 1.0, -5.0)
    assert M.energy_in_mask(m, mask) == 1.0
    with pytest.raises(ValueError):
        M.energy_in_mask(np.full(mask.shape, np.nan), mask)


def test_pointing_ties_and_tolerance():
    mask = _disc_mask()
    # constant map: every pixel ties, score = area fraction (no free hit)
    assert M.pointing_game(np.ones(mask.shape), mask) == pytest.approx(mask.mean())
    # two tied maxima, one inside and one outside
    m = np.zeros(mask.shape)
    m[20, 30] = 1.0
    m[0, 0] = 1.0
    assert M.pointing_game(m, mask) == 0.5
    # a maximum just outside the disc counts with a tolerance
    m = np.zeros(mask.shape)
    m[20, 40] = 1.0  # 10 px right of the centre, radius 8
    assert M.pointing_game(m, mask) == 0.0
    assert M.pointing_game(m, mask, tolerance=3) == 1.0


def test_low_resolution_map_is_resized():
    mask = np.zeros((96, 96), bool)
    mask[48:, 48:] = True
    small = np.zeros((6, 6))
    small[3:, 3:] = 1.0
    assert M.energy_in_mask(small, mask) > 0.9
    assert M.pointing_game(small, mask) == 1.0


def test_resize_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    a = rng.random((6, 7))
    ours = M.resize_map(a, (96, 80))
    ref = torch.nn.functional.interpolate(torch.tensor(a)[None, None], size=(96, 80), mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
    assert np.allclose(ours, ref, atol=1e-12)


def test_box_to_mask():
    m = M.box_to_mask([2, 3, 5, 7], (10, 10))
    assert m.sum() == 3 * 4 and m[3, 2] and not m[7, 5]


# ----------------------------------------------------------------------------- deletion / insertion

def _toy(h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 255, (h, w, 3))          # float: no accidental equality with a baseline
    mask = np.zeros((h, w), bool)
    mask[8:20, 10:22] = True

    def prob_fn(batch):
        """'Sees' only the object: the fraction of its original pixels still intact."""
        same = np.all(batch == img[None], axis=-1)  # [B, h, w]
        return same[:, mask].mean(1)

    return img, mask, prob_fn


def test_deletion_perfect_map_beats_reversed():
    img, mask, prob_fn = _toy()
    good = mask.astype(float)
    d_good = M.deletion_auc(prob_fn, img, good, steps=64)
    d_bad = M.deletion_auc(prob_fn, img, -good, steps=64)
    assert 0.0 <= d_good < d_bad <= 1.0
    # the object is 144 of 1024 pixels: the perfect map deletes it within the first 14 %
    assert d_good < 0.1 and d_bad > 0.9


def test_insertion_perfect_map_beats_reversed():
    img, mask, prob_fn = _toy()
    good = mask.astype(float)
    i_good = M.insertion_auc(prob_fn, img, good, steps=64)
    i_bad = M.insertion_auc(prob_fn, img, -good, steps=64)
    assert 0.0 <= i_bad < i_good <= 1.0
    assert i_good > 0.9 and i_bad < 0.1


@pytest.mark.parametrize("baseline", ["mean", "zero", "blur", (128, 128, 128)])
def test_curve_shape_and_endpoints(baseline):
    img, mask, prob_fn = _toy()
    auc, f, p = M.deletion_auc(prob_fn, img, mask.astype(float), steps=10, baseline=baseline,
                               batch_size=4, return_curve=True)
    assert f[0] == 0.0 and f[-1] == 1.0 and len(f) == len(p) == 11
    assert p[0] == 1.0 and p[-1] == 0.0
    assert np.all(np.diff(p) <= 0)  # the toy probability only falls as pixels are deleted
    auc_i, _, q = M.insertion_auc(prob_fn, img, mask.astype(float), steps=10, baseline=baseline,
                                  return_curve=True)
    assert q[0] == 0.0 and q[-1] == 1.0


def test_uint8_images_stay_uint8_and_batches_are_bounded():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    seen = []

    def prob_fn(batch):
        seen.append((batch.dtype, batch.shape))
        return np.full(len(batch), 0.5)

    auc = M.deletion_auc(prob_fn, img, rng.random((6, 6)), steps=20, batch_size=8)
    assert auc == pytest.approx(0.5)
    assert all(dt == np.uint8 and s[0] <= 8 and s[1:] == (24, 24, 3) for dt, s in seen)
    assert sum(s[0] for _, s in seen) == 21


def test_constant_map_is_order_neutral():
    """A constant map gets a seeded random order: its AUC lies between perfect and reversed."""
    img, mask, prob_fn = _toy()
    auc = M.deletion_auc(prob_fn, img, np.ones(mask.shape), steps=64)
    assert 0.3 < auc < 0.7


# ----------------------------------------------------------------------------- sanity checks

def test_spearman_self_and_reversed():
    rng = np.random.default_rng(3)
    a = rng.random((12, 12))
    assert M.spearman(a, a) == pytest.approx(1.0)
    assert M.spearman(a, -a) == pytest.approx(-1.0)
    assert M.spearman(a, 2 * a + 5) == pytest.approx(1.0)
    assert np.isnan(M.spearman(a, np.ones_like(a)))
    assert M.spearman(a, -a, absolute=True) == pytest.approx(1.0)
    assert M.randomisation_test(a, [a, -a]) == pytest.approx([1.0, -1.0])
    # different resolutions are brought to the larger one
    assert M.spearman(a, M.resize_map(a, (48, 48))) > 0.9


def _tiny_onnx():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.2, (8, 4, 3, 3)).astype(np.float32), "w2")
    wf = numpy_helper.from_array(rng.normal(0, 0.3, (2, 8)).astype(np.float32), "wf")
    bf = numpy_helper.from_array(np.zeros(2, np.float32), "bf")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w1, b1, w2, wf, bf])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _params(model):
    """{node name: {slot: value}} of the constant inputs of the weight-bearing nodes."""
    return {node.name: {j: M.constant_value(model, node.input[j]) for j in range(1, len(node.input))}
            for node in model.graph.node if node.op_type in ("Conv", "Gemm")}


def test_randomise_onnx_cascade():
    model = _tiny_onnx()
    order = [name for _, name, _ in M.weight_bearing_nodes(model)]
    assert order == ["fc", "conv2", "conv1"]
    orig = _params(model)
    casc = M.cascading_randomisation_onnx(model, seed=1)
    assert [k for k, _, _ in casc] == [1, 2, 3] and [n for _, n, _ in casc] == order
    for k, _, m in casc:
        new = _params(m)
        changed = {(n, j) for n in new for j in new[n] if not np.array_equal(new[n][j], orig[n][j])}
        # bf is all zero: it stays zero; conv2 has no bias
        expect = [{("fc", 1)}, {("fc", 1), ("conv2", 1)}, {("fc", 1), ("conv2", 1), ("conv1", 1), ("conv1", 2)}]
        assert changed == expect[k - 1]
        for n, j in changed:
            a, b = new[n][j], orig[n][j]
            assert a.shape == b.shape and a.dtype == b.dtype
            assert 0.5 < a.std() / b.std() < 2.0 or b.size < 10
        assert not any(n.op_type == "Identity" for n in m.graph.node)
        used = {i for n in m.graph.node for i in n.input}
        assert all(t.name in used for t in m.graph.initializer)
    # cumulative: the k=2 model keeps the k=1 model's randomised head
    assert np.array_equal(_params(casc[0][2])["fc"][1], _params(casc[1][2])["fc"][1])
    # reproducible, and the original is left alone
    again, _ = M.randomise_onnx(model, 2, seed=1)
    assert again.SerializeToString() == casc[1][2].SerializeToString()
    assert all(np.array_equal(orig[n][j], v) for n, d in _params(model).items() for j, v in d.items())


def test_randomise_onnx_shared_constant_via_identity():
    """A de-duplicated constant (Identity of an initializer, as the TorchScript exporter
    writes it) is randomised for the chosen node only."""
    from onnx import helper

    model = _tiny_onnx()
    g = model.graph
    # make conv1's bias an Identity of a constant also used elsewhere
    g.node.insert(0, helper.make_node("Identity", ["b1"], ["b1_copy"], name="dup"))
    g.node[1].input[2] = "b1_copy"
    assert [n for _, n, _ in M.weight_bearing_nodes(model)] == ["fc", "conv2", "conv1"]
    m, _ = M.randomise_onnx(model, 3, seed=0)
    assert not np.array_equal(_params(m)["conv1"][2], _params(model)["conv1"][2])
    assert "b1" not in {t.name for t in m.graph.initializer}  # nothing reads it any more


def test_randomise_onnx_runs_and_changes_output():
    ort = pytest.importorskip("onnxruntime")
    model = _tiny_onnx()
    x = np.random.default_rng(5).normal(size=(1, 3, 8, 8)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    y0 = run(model)
    y1 = run(M.randomise_onnx(model, 1, seed=0)[0])
    assert y0.shape == y1.shape and not np.allclose(y0, y1)


def test_randomise_torch_top_down():
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(1, 3, 8, 8)
    net(x)
    m1, names1 = M.randomise_torch(net, 1, seed=0, example_input=x)
    m2, names2 = M.randomise_torch(net, 2, seed=0)
    assert names1 == ["4"] and names2 == ["4", "2"]
    assert torch.equal(m1[0].weight, net[0].weight) and torch.equal(m1[2].weight, net[2].weight)
    assert not torch.equal(m1[4].weight, net[4].weight)
    assert torch.equal(m1[4].weight, m2[4].weight)   # cascading: same draw for the same layer
    assert not torch.equal(m2[2].weight, net[2].weight) and torch.equal(m2[0].weight, net[0].weight)


def test_onnx_prob_fn_static_batch():
    pytest.importorskip("onnxruntime")
    model = _tiny_onnx()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 8
    fn = M.onnx_prob_fn(model, target=1, preprocess={"mean": [0.5] * 3, "std": [0.25] * 3, "scale": 255,
                                                     "size": 8})
    imgs = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    p = fn(imgs)
    assert p.shape == (3,) and np.all((p > 0) & (p < 1))
    q = M.onnx_prob_fn(model, target=0, preprocess={"mean": [0.5] * 3, "std": [0.25] * 3, "scale": 255,
                                                    "size": 8})(imgs)
    assert np.allclose(p + q, 1.0)
