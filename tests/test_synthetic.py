"""The synthetic benchmark generator: determinism, labels, masks, file round trip."""
from __future__ import annotations

import numpy as np
import pytest

from naflow_onnx.evaluate import synthetic
from naflow_onnx.evaluate.synthetic import CLASSES, class_of, load_dataset, make_dataset, make_image, save_dataset


def test_same_seed_is_byte_identical():
    a = make_dataset(12, seed=5)
    b = make_dataset(12, seed=5)
    for k in ("images", "labels", "masks"):
        assert a[k].tobytes() == b[k].tobytes()
    c = make_dataset(12, seed=6)
    assert a["images"].tobytes() != c["images"].tobytes()


def test_image_does_not_depend_on_n():
    a = make_dataset(4, seed=3)
    b = make_dataset(9, seed=3)
    assert np.array_equal(a["images"], b["images"][:4])
    assert np.array_equal(a["masks"], b["masks"][:4])


def test_shapes_dtypes_labels():
    d = make_dataset(16, seed=0)
    assert d["images"].shape == (16, 96, 96, 3) and d["images"].dtype == np.uint8
    assert d["labels"].shape == (16,) and d["labels"].dtype == np.int64
    assert d["masks"].shape == (16, 96, 96) and d["masks"].dtype == bool
    assert set(d["labels"].tolist()) == set(range(len(CLASSES)))  # balanced: i % 4
    assert np.array_equal(d["labels"], np.arange(16) % 4)
    r = make_dataset(40, seed=0, balanced=False)
    assert r["labels"].min() >= 0 and r["labels"].max() < len(CLASSES)


def test_other_size():
    d = make_dataset(3, seed=1, size=64)
    assert d["images"].shape == (3, 64, 64, 3) and d["masks"].shape == (3, 64, 64)
    assert d["masks"].reshape(3, -1).any(1).all()


@pytest.mark.parametrize("index", range(8))
def test_mask_matches_the_drawn_target(index):
    img, label, mask, info = make_image(seed=11, index=index)
    target = info["objects"][0]
    assert target["target"] and class_of(target["shape"], target["texture"]) == label
    # the mask is one solid object of plausible area, inside the image
    area = mask.sum()
    r = target["radius"]
    assert 0.5 * (1.7 * r) ** 2 < area < 1.1 * np.pi * r * r + 4 * r
    ys, xs = np.nonzero(mask)
    cx, cy = target["centre"]
    assert abs(xs.mean() - cx) < 1.5 and abs(ys.mean() - cy) < 1.5
    # the target is drawn with two colours (striped or dotted): inside the mask the image has
    # two clusters of colour, far apart compared with the pixel noise
    pix = img[mask].astype(float)
    spread = pix.std(0).sum()
    assert spread > 30
    # distractors are never a target class and never overlap the target
    for obj in info["objects"][1:]:
        assert class_of(obj["shape"], obj["texture"]) is None
        d = np.hypot(obj["centre"][0] - cx, obj["centre"][1] - cy)
        assert d > obj["radius"] + r
    assert 2 <= len(info["objects"]) - 1 <= 4


def test_forced_label():
    for lab in range(4):
        _, got, _, info = make_image(seed=2, index=0, label=lab)
        assert got == lab
        assert f"{info['objects'][0]['shape']}_{info['objects'][0]['texture']}" == CLASSES[lab]


def test_distractors_cover_target_shapes_and_textures():
    """Every target shape and texture also occurs on distractors, so neither alone decides."""
    shapes, textures = set(), set()
    for i in range(60):
        _, _, _, info = make_image(seed=4, index=i)
        for o in info["objects"][1:]:
            shapes.add(o["shape"])
            textures.add(o["texture"])
    assert set(synthetic.TARGET_SHAPES) <= shapes
    assert set(synthetic.TARGET_TEXTURES) <= textures


def test_save_load_round_trip(tmp_path):
    d = make_dataset(5, seed=9)
    p = tmp_path / "sub" / "d.npz"
    save_dataset(p, d, seed=9)
    e = load_dataset(p)
    for k in ("images", "labels", "masks"):
        assert np.array_equal(d[k], e[k]) and d[k].dtype == e[k].dtype
    assert e["meta"]["seed"] == 9 and e["meta"]["classes"] == list(CLASSES)
    assert not list(p.parent.glob("*.tmp"))


# ----------------------------------------------------------------------------- nets, export, training

@pytest.mark.parametrize("arch", ["plain", "residual", "gated", "conv4", "dense", "inception"])
def test_nets_export_with_preprocess_metadata(arch):
    torch = pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import json

    from naflow_onnx.evaluate import nets, train

    torch.manual_seed(0)
    model = nets.build(arch).eval()
    assert nets.n_params(model) < 300_000
    data = train.export_onnx(model, 96, {"arch": arch})
    proto = onnx.load_from_string(data)
    meta = {p.key: p.value for p in proto.metadata_props}
    pre = json.loads(meta["naflow.preprocess"])
    assert pre == train.PREPROCESS
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["logits"]
    imgs = make_dataset(2, seed=0)["images"]
    x = train.preprocess(imgs)
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {"image": x[i:i + 1].numpy()})[0] for i in range(2)])
    assert np.allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_train_smoke_and_atomic_export(tmp_path):
    pytest.importorskip("torch")
    from naflow_onnx.evaluate import train

    out = tmp_path / "m" / "synth_conv4.onnx"
    s = train.train("conv4", out, n_train=16, n_test=8, epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0,
                    seed=0, train_seed=1, test_seed=2, threads=1, log=lambda m: None,
                    deterministic=False)
    assert out.exists() and s["onnx_bytes"] == out.stat().st_size
    assert 0.0 <= s["test_acc"] <= 1.0 and s["onnx_test_acc"] == pytest.approx(s["test_acc"], abs=1 / 8 + 1e-9)
    assert not list(out.parent.glob("*.tmp"))
