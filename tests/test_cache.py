"""The user cache of what depends only on the model (naflow_onnx/cache.py, issue 17)."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import onnx
import pytest

import naflow_onnx as nf
from naflow_onnx import cache as cache_mod
from naflow_onnx.graph import load_model

UNPICKLED: list[str] = []


class _Trap:
    """Unpickling it records a call: a cache file must never run code."""

    def __reduce__(self):
        return (UNPICKLED.append, ("unpickled",))


def _entries(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def _same_flow(a, b) -> None:
    assert list(a.maps) == list(b.maps)
    for t in a.maps:
        assert np.array_equal(a.maps[t], b.maps[t]), t
    assert [layer.solver for layer in a.layers] == [layer.solver for layer in b.layers]


@pytest.fixture(scope="module")
def chain(small_models):
    """A small net whose solve has both memo kinds: a σ by power iteration and a 1×1 conv's pinv."""
    return small_models["chain"][1]


@pytest.fixture(scope="module")
def chain_reference(chain, small_image):
    return nf.Analyzer(chain, cache=False).analyze(small_image)


def _count_calls(monkeypatch) -> dict[str, int]:
    """Calls of the two point-independent computations the cache saves."""
    from naflow_onnx.rules import affine, solver
    calls = {"pinv": 0, "sigma": 0}
    for mod, attr, name in ((affine, "pointwise_pinv", "pinv"), (solver, "spectral_norm", "sigma")):
        def counted(*a, _fn=getattr(mod, attr), _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(mod, attr, counted)
    return calls


def test_cold_warm_and_no_cache_give_identical_maps(mobilenet_onnx, photos, tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    folder = tmp_path / "cache"
    cold = nf.Analyzer(mobilenet_onnx, cache=folder)
    f_cold = cold.analyze(photos["chelsea"])
    kinds = [k[0] for k in cold.opts.cache]
    assert set(kinds) == {"sigma", "pinv"}
    assert calls["pinv"] == kinds.count("pinv")
    cold_calls = dict(calls)
    sha = cold.graph.sha256
    assert sorted(_entries(folder)) == [f"{sha}.graph.npz", f"{sha}.solver-cpu.npz"]
    warm = nf.Analyzer(mobilenet_onnx, cache=folder)
    assert warm.graph.model.SerializeToString() == cold.graph.model.SerializeToString()
    before = _entries(folder)
    f_warm = warm.analyze(photos["chelsea"])
    # no SVD again, and the power iterations of the memoised σ (the others are of operators
    # linearised at the image) are skipped
    assert calls["pinv"] == cold_calls["pinv"]
    assert calls["sigma"] - cold_calls["sigma"] == cold_calls["sigma"] - kinds.count("sigma")
    assert set(warm.opts.cache) == set(cold.opts.cache)
    assert _entries(folder) == before          # nothing new: nothing rewritten
    f_none = nf.Analyzer(mobilenet_onnx, cache=False).analyze(photos["chelsea"])
    _same_flow(f_cold, f_warm)
    _same_flow(f_cold, f_none)


def test_no_cache_writes_nothing(chain, small_image, tmp_path, monkeypatch, chain_reference):
    monkeypatch.setenv("NAFLOW_CACHE_DIR", str(tmp_path / "default"))
    flow = nf.Analyzer(chain, cache=False).analyze(small_image)
    _same_flow(flow, chain_reference)
    assert not (tmp_path / "default").exists()
    # the default (True) is the environment's folder
    nf.Analyzer(chain).analyze(small_image)
    assert len(_entries(tmp_path / "default")) == 2


def test_cache_folder_order(monkeypatch, tmp_path):
    monkeypatch.delenv("NAFLOW_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_mod.resolve(True) == tmp_path / "xdg" / "naflow-onnx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_mod.resolve(True) == tmp_path / "home" / ".cache" / "naflow-onnx"
    monkeypatch.setenv("NAFLOW_CACHE_DIR", str(tmp_path / "own"))
    assert cache_mod.resolve(True) == tmp_path / "own"
    assert cache_mod.resolve(False) is None
    assert cache_mod.resolve(str(tmp_path / "x")) == tmp_path / "x"


def _rewrite_header(path, **changes) -> None:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = {**json.loads(arrays["header"].tobytes()), **changes}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def _spoil(kind: str, path, other_entry) -> None:
    if kind == "garbage":
        path.write_bytes(b"\x00not a zip at all" * 50)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "another-model":
        shutil.copyfile(other_entry, path)
    elif kind == "another-version":
        _rewrite_header(path, naflow_onnx="0.0.0-other")
    elif kind == "wrong-shape":
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        for k in arrays:
            if k.startswith("pinv_"):
                arrays[k] = arrays[k][:-1]           # one input channel short: not this pinv
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path.write_bytes(buf.getvalue())
    elif kind == "wrong-outputs":
        blob = onnx.GraphProto(output=[onnx.helper.make_tensor_value_info(
            "not-an-output", onnx.TensorProto.FLOAT, [1])]).SerializeToString()
        header = np.load(path, allow_pickle=False)["header"]
        buf = io.BytesIO()
        np.savez(buf, header=header, graph=np.frombuffer(blob, np.uint8))
        path.write_bytes(buf.getvalue())
    elif kind == "wrong-sigma":
        header = json.loads(np.load(path, allow_pickle=False)["header"].tobytes())
        _rewrite_header(path, sigma=[[i, n, s, "NaN"] for i, n, s, _ in header["sigma"]])
    elif kind == "pickle":
        buf = io.BytesIO()
        header = np.load(path, allow_pickle=False)["header"]
        np.savez(buf, header=header, pinv_0=np.array([_Trap()], dtype=object))
        path.write_bytes(buf.getvalue())


def _content(blob: bytes) -> tuple[dict, dict[str, bytes]]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return (json.loads(arrays.pop("header").tobytes()),
            {k: (a.dtype.str, a.shape, a.tobytes()) for k, a in arrays.items()})


def _same_memo(a: dict, b: dict) -> bool:
    def plain(v):
        return [x.cpu().numpy().tobytes() if hasattr(x, "cpu") else x for x in v] \
            if isinstance(v, tuple) else v
    return a.keys() == b.keys() and all(plain(a[k]) == plain(b[k]) for k in a)


BAD = [(what, kind) for what in ("solver-cpu", "graph")
       for kind in ("garbage", "truncated", "another-model", "another-version", "pickle")] + \
      [("solver-cpu", "wrong-shape"), ("solver-cpu", "wrong-sigma"), ("graph", "wrong-outputs")]


@pytest.mark.parametrize("what,kind", BAD)
def test_a_bad_entry_is_ignored_and_rewritten(what, kind, chain, small_models, small_image,
                                              chain_reference, tmp_path):
    folder = tmp_path / "cache"
    first = nf.Analyzer(chain, cache=folder)
    first.analyze(small_image)
    other = nf.Analyzer(small_models["residual"][1], cache=folder)
    other.analyze(small_image)
    path = folder / f"{first.graph.sha256}.{what}.npz"
    good = path.read_bytes()
    _spoil(kind, path, folder / f"{other.graph.sha256}.{what}.npz")
    assert path.read_bytes() != good
    again = nf.Analyzer(chain, cache=folder)
    memo = cache_mod.load_solver_memo(again.cache, again.graph, again.device, again.opts.power_iter)
    if kind == "wrong-shape":                 # the pinv entries are left out, the σ kept
        assert {k[0] for k in memo} == {"sigma"}
    elif kind == "wrong-sigma":
        assert {k[0] for k in memo} == {"pinv"}
    elif what == "solver-cpu":
        assert memo == {}                     # nothing of the bad entry was taken
    assert _same_memo(memo, {k: first.opts.cache[k] for k in memo})
    assert [o.name for o in again.graph.model.graph.output] == \
        [o.name for o in first.graph.model.graph.output]
    flow = again.analyze(small_image)
    assert UNPICKLED == []
    _same_flow(flow, chain_reference)
    assert _content(path.read_bytes()) == _content(good)   # rewritten valid
    assert _same_memo(cache_mod.load_solver_memo(cache_mod.ModelCache(folder, first.graph.sha256),
                                                 first.graph, first.device, 8), first.opts.cache)


@pytest.mark.parametrize("blocked", ["file-in-place", "under-a-file"])
def test_an_unwritable_cache_folder_works_uncached_with_one_warning(blocked, chain, small_image,
                                                                    chain_reference, tmp_path,
                                                                    capsys):
    (tmp_path / "f").write_text("mine")
    folder = tmp_path / "f" if blocked == "file-in-place" else tmp_path / "f" / "sub"
    flows = [nf.Analyzer(chain, cache=folder).analyze(small_image) for _ in range(2)]
    for flow in flows:
        _same_flow(flow, chain_reference)
    err = capsys.readouterr().err
    assert err.count("naflow: warning: the cache folder") == 1, err
    assert str(folder) in err
    assert (tmp_path / "f").read_text() == "mine"


def test_foreign_files_in_the_cache_folder_are_left_alone(chain, small_image, tmp_path):
    folder = tmp_path / "cache"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("not naflow's")
    (folder / "sub" / "x.npz").write_bytes(b"someone else's")
    foreign = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    a = nf.Analyzer(chain, cache=folder)
    a.analyze(small_image)
    for p, data in foreign.items():
        assert p.read_bytes() == data
    names = sorted(p.name for p in folder.iterdir())
    sha = a.graph.sha256
    assert names == sorted(["notes.txt", "sub", f"{sha}.graph.npz", f"{sha}.solver-cpu.npz"])


def test_load_model_from_cache_equals_uncached_and_keeps_the_callers_proto(chain, tmp_path):
    plain = load_model(chain, cache=False)
    first = load_model(chain, cache=tmp_path)
    cached = load_model(chain, cache=tmp_path)
    proto = onnx.load(chain)
    bare = proto.SerializeToString()
    given = load_model(proto, cache=tmp_path)
    assert plain.model.SerializeToString() == first.model.SerializeToString() \
        == cached.model.SerializeToString() == given.model.SerializeToString()
    assert len(cached.model.graph.value_info) > 0      # shape inference's result, from the cache
    assert proto.SerializeToString() == bare           # not changed in place
    assert plain.float_tensors == cached.float_tensors


def test_cli_no_cache(chain, small_image, tmp_path, monkeypatch):
    from PIL import Image

    from naflow_onnx.check import cli as check_cli
    from naflow_onnx.cli import main
    from naflow_onnx.evaluate import cli as evaluate_cli
    image = tmp_path / "x.png"
    Image.fromarray(small_image).save(image)
    folder = tmp_path / "cache"
    monkeypatch.setenv("NAFLOW_CACHE_DIR", str(folder))
    common = ["analyze", str(chain), str(image), "--quiet", "--preprocess", "none"]
    assert main([*common, "--out", str(tmp_path / "a"), "--no-cache"]) == 0
    assert (tmp_path / "a" / "flow.json").is_file() and not folder.exists()
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    assert len(_entries(folder)) == 2
    for parser in (check_cli.build_check_parser(), check_cli.build_baseline_parser()):
        required = ["--config", "c.toml"] + (["-o", "b.npz"] if "baseline" in parser.prog else [])
        for flag, expect in (([], True), (["--no-cache"], False)):
            args = parser.parse_args([str(chain), *required, *flag])
            assert check_cli.options_from(args).cache is expect
    for flag, expect in (([], True), (["--no-cache"], False)):
        args = evaluate_cli.build_parser().parse_args([str(chain), "--out", "e", *flag])
        assert evaluate_cli.options_from(args).cache is expect


def test_a_refused_model_leaves_no_entry(chain, tmp_path):
    from naflow_onnx.errors import ModelError
    with pytest.raises(ModelError, match="output 'nope' is not produced"):
        load_model(chain, output="nope", cache=tmp_path)      # refused after the checker
    broken = onnx.load(chain)
    broken.graph.node[1].input[0] = "nowhere"
    with pytest.raises(ModelError, match="fails onnx.checker"):
        load_model(broken, cache=tmp_path)
    assert _entries(tmp_path) == {}
    load_model(chain, cache=tmp_path)
    assert len(_entries(tmp_path)) == 1


def test_check_workers_follow_the_cache_option(chain, tmp_path, monkeypatch):
    """check/baseline build their analysers (and their workers') from a Spec: it carries the
    option."""
    from naflow_onnx.check.run import Spec
    monkeypatch.setenv("NAFLOW_CACHE_DIR", str(tmp_path / "c"))
    spec = Spec(model=str(chain), preprocess="none", damp=None, provider="cpu", device="cpu",
                method="naflow", layers=None, cache=False)
    assert spec.analyzer().cache is None
    assert not (tmp_path / "c").exists()
    assert Spec(**{**spec.__dict__, "cache": True}).analyzer().cache is not None
    assert len(_entries(tmp_path / "c")) == 1                 # the graph entry
