"""Similarity-metric targets (METHOD.md §6, §8.8): omega, scale invariance, the held-constant
denominator, the final-layer identity, and every target kind through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import naflow_onnx as nf
from exporters.torch_export import export
from naflow_onnx.cli import main
from naflow_onnx.similarity import SimilarityObjective, omega


class Embedder(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.final = nn.Identity()
        self.head = nn.Linear(16, 12)
        self.scale = scale

    def forward(self, x):
        a = self.final(self.features(x))
        return self.head(a.mean((2, 3))) * self.scale


@pytest.fixture(scope="module")
def embedders(workdir):
    paths = {}
    for scale in (1.0, 3.0):
        path = workdir / f"embedder_{scale:g}.onnx"
        export(Embedder(scale), path, (1, 3, 32, 32), preprocess="none", output_names=["embedding"],
               embedding_output="embedding")
        paths[scale] = path
    return paths


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    return [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(3)]


def test_omega_sums_to_plus_or_minus_one():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.standard_normal(50), rng.standard_normal(50)
        assert abs(abs(omega(a, b).sum()) - 1) < 1e-12


def test_denominator_held_constant_gives_nonzero_gradient():
    """sum(omega) is the constant ±1: only a denominator held constant leaves a gradient."""
    v_s = np.array([1.0, -2.0, 0.5])
    x = torch.tensor([0.3, -0.1, 2.0], requires_grad=True)
    obj = SimilarityObjective("e", v_s)
    obj({"e": x[None]}).backward()
    expected = torch.tensor(v_s, dtype=torch.float32) / abs(float(x.detach() @ torch.tensor(v_s, dtype=torch.float32)))
    torch.testing.assert_close(x.grad, expected)
    assert float(x.grad.abs().sum()) > 0
    y = x.detach().clone().requires_grad_(True)          # the wrong way: nothing detached
    vs = torch.tensor(v_s, dtype=torch.float32)
    ((y * vs) / (y @ vs).abs()).sum().backward()
    assert float(y.grad.abs().max()) < 1e-6


def test_maps_unchanged_when_embeddings_scaled(embedders, images):
    query, ref = images[0], images[1]
    base = nf.Analyzer(embedders[1.0])
    a = base.analyze(query, objective=base.similarity_objective(ref))
    # V_S scaled
    b = base.analyze(query, objective=base.similarity_objective(base.embed(ref) * 7.0))
    # V_Q and V_S both scaled (the model's embedding is 3x)
    scaled = nf.Analyzer(embedders[3.0])
    c = scaled.analyze(query, objective=scaled.similarity_objective(ref))
    assert abs(a.target["omega_sum"]) == pytest.approx(1, abs=1e-5)
    for t in a.maps:
        np.testing.assert_allclose(a.maps[t], b.maps[t], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(a.maps[t], c.maps[t], rtol=1e-3, atol=1e-6)


def test_final_map_equals_dot_product_gradient_times_activation(embedders, images):
    query, ref = images[0], images[2]
    analyzer = nf.Analyzer(embedders[1.0])
    flow = analyzer.analyze(query, objective=analyzer.similarity_objective(ref))
    # independently in torch: grad of the plain dot product V_Q . V_S times A at the final tensor
    model = Embedder(1.0).eval()
    store = {}
    def keep(_module, _inputs, out):
        out.retain_grad()
        store["a"] = out
    model.final.register_forward_hook(keep)
    x = torch.from_numpy(query.astype(np.float32) / 255).permute(2, 0, 1)[None]
    v_s = torch.from_numpy(analyzer.embed(ref)).float()
    dot = (model(x)[0] * v_s).sum()
    dot.backward()
    a = store["a"]
    expected = torch.relu((a.grad * a).sum(1))[0] / abs(float(dot))
    np.testing.assert_allclose(flow.maps[flow.final_layer], expected.detach().numpy(), rtol=1e-3,
                               atol=1e-6 * float(expected.max()))


@pytest.fixture(scope="module")
def embedding_folders(tmp_path_factory, images, embedders):
    root = tmp_path_factory.mktemp("sim")
    support = root / "support"
    support.mkdir()
    for name, img in zip(("cat", "cup", "face"), images):
        Image.fromarray(img).save(support / f"{name}.png")
    analyzer = nf.Analyzer(embedders[1.0])
    np.savez(root / "protos.npz", **{n: analyzer.embed(support / f"{n}.png") for n in ("cat", "cup", "face")})
    query = root / "query.png"
    Image.fromarray(np.clip(images[1].astype(int) + 10, 0, 255).astype(np.uint8)).save(query)
    return root, support, query


def test_single_output_without_metadata_is_the_embedding(embedders, embedding_folders, workdir, tmp_path):
    """An embedding model with one output and no naflow.embedding_output: that output is the
    embedding (it used to be refused); the same target and maps as with the metadata. A model
    with two outputs and no metadata is still refused with one line."""
    root, support, query = embedding_folders
    bare = workdir / "embedder_bare.onnx"
    export(Embedder(1.0), bare, (1, 3, 32, 32), preprocess="none", output_names=["embedding"])
    assert nf.Analyzer(bare).graph.metadata.get("naflow.embedding_output") is None
    flows = {}
    for name, path in (("bare", bare), ("declared", embedders[1.0])):
        out = tmp_path / name
        assert main(["analyze", str(path), str(query), "--out", str(out), "--reference",
                     str(support / "cup.png"), "--quiet"]) == 0
        flows[name] = (json.loads((out / "flow.json").read_text()), dict(np.load(out / "maps.npz")))
    (bj, bm), (dj, dm) = flows["bare"], flows["declared"]
    assert bj["target"]["kind"] == "similarity" and bj["target"]["omega"] == dj["target"]["omega"]
    assert bm.keys() == dm.keys()
    for k in bm:
        np.testing.assert_array_equal(bm[k], dm[k])
    two = workdir / "embedder_two_outputs.onnx"

    class TwoOutputs(Embedder):
        def forward(self, x):
            e = super().forward(x)
            return e, e * 2
    export(TwoOutputs(1.0), two, (1, 3, 32, 32), preprocess="none", output_names=["a", "b"])
    with pytest.raises(nf.NAFlowError, match="declares no embedding output and has 2 outputs"):
        nf.Analyzer(two).embed(query)


@pytest.mark.parametrize("kind", ["reference", "support", "gallery", "prototypes"])
def test_every_target_kind_through_the_cli(embedders, embedding_folders, tmp_path, kind):
    root, support, query = embedding_folders
    arg = {"reference": support / "cup.png", "support": support, "gallery": support,
           "prototypes": root / "protos.npz"}[kind]
    out = tmp_path / kind
    assert main(["analyze", str(embedders[1.0]), str(query), "--out", str(out), f"--{kind}", str(arg),
                 "--quiet"]) == 0
    data = json.loads((out / "flow.json").read_text())
    t = data["target"]
    assert t["kind"] == "similarity" and abs(abs(t["omega_sum"]) - 1) < 1e-5
    assert len(t["omega"]) == 12
    if kind != "reference":
        ranking = t["ranking"]
        assert [r["name"] for r in ranking][0] == t["prediction"]
        assert ranking[0]["cosine"] >= ranking[-1]["cosine"]
        assert t["reference"].startswith("cup")        # the query is a brightened cup image
    has_reference_side = kind != "prototypes"
    assert (out / "reference" / "flow.json").is_file() == has_reference_side


def test_support_with_named_target_and_unknown_class(embedders, embedding_folders, tmp_path):
    root, support, query = embedding_folders
    out = tmp_path / "named"
    assert main(["analyze", str(embedders[1.0]), str(query), "--out", str(out), "--support",
                 str(support), "--target", "face", "--quiet"]) == 0
    assert json.loads((out / "flow.json").read_text())["target"]["reference"] == "face"
    assert main(["analyze", str(embedders[1.0]), str(query), "--out", str(tmp_path / "x"),
                 "--support", str(support), "--target", "dog", "--quiet"]) == 2


def test_mobilenet_embedding_real_photos(workdir, photos, tmp_path):
    """MobileNetV2's pooled 1280-d features: chelsea against a crop and a flip of itself, and
    against coffee."""
    from models.registry import get_model
    model, spec = get_model("mobilenet-v2", embedding=True)
    path = workdir / "mobilenet_embedding.onnx"
    export(model, path, (1, 3, 224, 224), preprocess="imagenet", labels="imagenet",
           output_names=["logits", "embedding"], embedding_output="embedding")
    analyzer = nf.Analyzer(path)
    from naflow_onnx.similarity import cosine
    cat = Image.open(photos["chelsea"]).convert("RGB")
    w, h = cat.size
    crop, flip = tmp_path / "crop.png", tmp_path / "flip.png"
    cat.crop((20, 10, w - 40, h - 10)).save(crop)
    cat.transpose(Image.FLIP_LEFT_RIGHT).save(flip)
    q = analyzer.embed(photos["chelsea"])
    assert 0.97 <= cosine(q, analyzer.embed(crop)) <= 0.995
    assert 0.96 <= cosine(q, analyzer.embed(flip)) <= 0.995
    assert 0.3 <= cosine(q, analyzer.embed(photos["coffee"])) <= 0.55
    flow = analyzer.analyze(photos["chelsea"], objective=analyzer.similarity_objective(flip),
                            layers="op:Add")   # the residual joins: a quick slice of the flow
    assert flow.target["kind"] == "similarity" and flow.target["cosine"] > 0.96
    assert len(flow.layers) == 11 and flow.layers[-1].final and flow.layers[-1].op_type == "Clip"


@pytest.mark.parametrize("name,size,layers", [("conv4net", 84, None), ("resnet50-ms", 64, "layer4")])
def test_registry_embedding_models_through_every_target_kind(name, size, layers, workdir, photos, tmp_path):
    """Conv4Net (every layer) and ResNet50-MS (its last stage, layer4, to keep CI short) run
    through --reference, --support, --gallery and --prototypes."""
    from models.registry import get_model
    model, spec = get_model(name)
    path = workdir / f"{name}_{size}.onnx"
    export(model, path, (1, 3, size, size), preprocess=spec.preprocess, output_names=["embedding"],
           embedding_output="embedding")
    support = tmp_path / "support"
    support.mkdir()
    for key in ("chelsea", "coffee", "astronaut"):
        Image.open(photos[key]).convert("RGB").resize((size * 2, size * 2)).save(support / f"{key}.png")
    analyzer = nf.Analyzer(path)
    np.savez(tmp_path / "protos.npz", **{k: analyzer.embed(support / f"{k}.png") for k in ("chelsea", "coffee")})
    extra = ["--layers", layers] if layers else []
    for kind, arg in (("reference", support / "coffee.png"), ("support", support), ("gallery", support),
                      ("prototypes", tmp_path / "protos.npz")):
        out = tmp_path / f"out_{kind}"
        assert main(["analyze", str(path), str(photos["chelsea"]), "--out", str(out), f"--{kind}", str(arg),
                     "--quiet", *extra]) == 0, kind
        data = json.loads((out / "flow.json").read_text())
        assert data["target"]["kind"] == "similarity" and abs(abs(data["target"]["omega_sum"]) - 1) < 1e-4
        assert data["solver_summary"]["all_converged"]
        if kind in ("support", "gallery"):
            assert data["target"]["prediction"].startswith("chelsea")   # the query itself is in the set
