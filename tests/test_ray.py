"""The Ray backend (naflow_onnx.backends, docs/ray.md).

A local Ray cluster on 127.0.0.1 (a head node and one extra worker node, each a `ray start
--block` process of its own, one CPU each) is shared by the module. ``run_tasks`` is tested on
both backends (order, a raising item becomes a Failure, an actor killed mid-item is replaced and
its item retried, retries exhausted, a failing set-up, Ray missing), then ``naflow check`` runs
over 200 generated images with ``--backend ray`` while the worker node is killed mid-run, and
reports exactly what the local backend reports; ``--resume`` reuses the cached flows; ``naflow
analyze`` on Ray writes the same files as locally and reports a broken image without stopping.

No skips: without Ray installed this module fails (pip install -e .[test] installs it).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from compare import assert_close

# Ray's nodes talk over loopback only (Ray's switch for single-machine clusters, read at import:
# this process then finds itself at 127.0.0.1, where the nodes below are)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray   # noqa: E402 - no skip: a missing Ray fails here
from ray.cluster_utils import Cluster  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from exporters.torch_export import export
from smallnets import RedDetector
from naflow_onnx import testhooks
from naflow_onnx.backends import Failure, Task, run_tasks
from naflow_onnx.check import main_check
from naflow_onnx.cli import main as cli_main
from naflow_onnx.errors import NAFlowError

torch.set_num_threads(1)
# the tasks below are defined in this test module, which Ray's workers cannot import
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_IMAGES = 200


# ------------------------------------------------------------------------------------------------
# the cluster


class LocalCluster:
    """A head node and one extra worker node on 127.0.0.1 (ray.cluster_utils: each node its own
    raylet process with its own worker processes, one CPU each)."""

    def __init__(self):
        self.temp = Path(tempfile.mkdtemp(prefix="nfray", dir="/tmp"))   # short: unix socket paths
        node = dict(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=100 * 2**20)
        self.cluster = Cluster(initialize_head=True, connect=False,
                               head_node_args={**node, "temp_dir": str(self.temp),
                                               "include_dashboard": False})
        try:
            self.worker = self.cluster.add_node(**node)
            self.cluster.wait_for_nodes()
        except BaseException:
            self.shutdown()
            raise
        self.address = self.cluster.address

    def worker_pids(self) -> list[int]:
        """The pids of every process below the worker node's raylet (our actor among them)."""
        from ray._private import ray_constants
        return descendants(self.worker.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)

    def kill_worker(self) -> list[int]:
        """SIGKILL the worker node: its worker processes (our actor among them), then its raylet
        and the rest. The workers first and explicitly: a worker outlives its raylet for a while
        and can go on answering the driver. Returns the worker pids killed."""
        from ray._private import ray_constants
        raylet = self.worker.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        workers = descendants(raylet)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.cluster.remove_node(self.worker, allow_graceful=False)
        return workers

    def shutdown(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.temp, ignore_errors=True)


def descendants(pid: int) -> list[int]:
    """The pids of every process below ``pid`` (read from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue                        # ended meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        yield c
    finally:
        c.shutdown()


# ------------------------------------------------------------------------------------------------
# run_tasks


class Square(Task):
    """x -> x*x; raises on negative items; records its set-ups in a folder."""

    def __init__(self, folder: str):
        self.folder = folder

    def setup(self):
        Path(self.folder, f"setup-{os.getpid()}-{time.monotonic_ns()}").touch()

    def __call__(self, x):
        if x < 0:
            raise ValueError(f"negative item {x}\nsecond line")
        time.sleep(0.02)
        return x * x, os.getpid()


def setups(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("setup-*"))


class DieOnce(Task):
    """Kills its own worker process the first time it sees item 'die' (a file marks it)."""

    def __init__(self, folder: str, always: bool = False):
        self.folder, self.always = folder, always

    def __call__(self, x):
        if x == "die":
            mark = Path(self.folder, "died")
            if self.always or not mark.exists():
                mark.touch()
                os._exit(1)
            return "survived"
        time.sleep(0.05)
        return x


class BadSetup(Task):
    def setup(self):
        raise NAFlowError("model not found: /nowhere.onnx")

    def __call__(self, x):
        return x


def test_local_backend_in_order_with_failures(tmp_path):
    items = [3, -1, 4, 5]
    run = run_tasks(Square(str(tmp_path)), items, backend="local", progress=False)
    out = list(run)
    assert [i for i, _ in out] == [0, 1, 2, 3]                          # in order
    assert [r for _, (r, pid) in [o for o in out if not isinstance(o[1], Failure)]] == [9, 16, 25]
    fail = out[1][1]
    assert isinstance(fail, Failure) and fail.index == 1 and fail.item == -1
    assert fail.message == "ValueError: negative item -1"               # one line
    assert setups(tmp_path) == [os.getpid()]                             # set up once, here
    assert run.stats["failures"] == 1 and run.stats["backend"] == "local"


def test_backend_arguments_are_checked(tmp_path, monkeypatch):
    with pytest.raises(NAFlowError, match="unknown backend"):
        run_tasks(Square(str(tmp_path)), [1], backend="dask")
    with pytest.raises(NAFlowError, match="--address needs --backend ray"):
        run_tasks(Square(str(tmp_path)), [1], address="127.0.0.1:1")
    with pytest.raises(NAFlowError, match="--workers must be >= 1"):
        run_tasks(Square(str(tmp_path)), [1], backend="ray", workers=0)
    with socket.socket() as sock:                                       # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(NAFlowError, match=f"cannot reach Ray at 127.0.0.1:{port}"):
        list(run_tasks(Square(str(tmp_path)), [1], backend="ray", address=f"127.0.0.1:{port}"))
    monkeypatch.setitem(sys.modules, "ray", None)                       # as if not installed
    with pytest.raises(NAFlowError, match=r"pip install naflow-onnx\[ray\]"):
        run_tasks(Square(str(tmp_path)), [1], backend="ray")


def test_ray_backend_results_failures_and_one_setup_per_actor(cluster, tmp_path):
    items = list(range(-2, 30))
    run = run_tasks(Square(str(tmp_path)), items, backend="ray", address=cluster.address,
                    workers=2, progress=False)
    out = dict(run)
    assert sorted(out) == list(range(len(items)))
    for i, x in enumerate(items):
        if x < 0:
            assert isinstance(out[i], Failure) and out[i].message == f"ValueError: negative item {x}"
        else:
            assert out[i][0] == x * x
    pids = {out[i][1] for i, x in enumerate(items) if x >= 0}
    assert os.getpid() not in pids and len(pids) <= 2
    assert pids <= set(setups(tmp_path)) and len(setups(tmp_path)) == len(set(setups(tmp_path)))
    assert run.stats["workers"] == 2 and run.stats["failures"] == 2
    assert run.stats["worker_deaths"] == 0


def test_ray_actor_death_is_retried_on_a_replacement(cluster, tmp_path):
    items = ["a", "b", "die", "c", "d", "e"]
    run = run_tasks(DieOnce(str(tmp_path)), items, backend="ray", address=cluster.address,
                    workers=2, retries=2, progress=False)
    out = dict(run)
    assert out == {0: "a", 1: "b", 2: "survived", 3: "c", 4: "d", 5: "e"}
    assert run.stats["worker_deaths"] >= 1 and run.stats["resubmitted"] >= 1


def test_ray_item_that_always_kills_its_worker_fails_after_retries(cluster, tmp_path):
    items = ["a", "die", "b", "c"]
    run = run_tasks(DieOnce(str(tmp_path), always=True), items, backend="ray",
                    address=cluster.address, workers=2, retries=1, progress=False)
    out = dict(run)
    assert out[0] == "a" and out[2] == "b" and out[3] == "c"
    assert isinstance(out[1], Failure) and "died 2 times" in out[1].message
    # 'die' kills its actor, which also held another item: both become suspects, free of charge;
    # run alone, 'die' kills two more actors and fails; 'a' (even when its reply died with the
    # process) is analysed again alone and succeeds
    assert run.stats["worker_deaths"] in (2, 3) and run.stats["resubmitted"] >= 1, run.stats


def test_ray_batches_isolate_failures_and_rerun_a_dead_chunk_item_by_item(cluster, tmp_path):
    """batch=4: a raising item fails alone inside its chunk; an actor killed by an item of a
    chunk of 3 gets the chunk's items resubmitted one by one, and they all succeed."""
    items = list(range(-2, 10))
    run = run_tasks(Square(str(tmp_path)), items, backend="ray", address=cluster.address,
                    workers=2, progress=False, batch=4)
    out = dict(run)
    assert sorted(out) == list(range(len(items)))
    assert [out[i].message for i in (0, 1)] == ["ValueError: negative item -2",
                                                "ValueError: negative item -1"]
    assert all(out[i][0] == x * x for i, x in enumerate(items) if x >= 0)
    assert run.stats["failures"] == 2 and run.stats["worker_deaths"] == 0
    dies = tmp_path / "dies"
    dies.mkdir()
    run = run_tasks(DieOnce(str(dies)), ["a", "b", "die", "c", "d", "e"], backend="ray",
                    address=cluster.address, workers=2, retries=1, progress=False, batch=3)
    assert dict(run) == {0: "a", 1: "b", 2: "survived", 3: "c", 4: "d", 5: "e"}
    assert run.stats["worker_deaths"] >= 1 and run.stats["resubmitted"] >= 3, run.stats


def test_ray_setup_error_stops_the_run(cluster):
    with pytest.raises(NAFlowError, match="worker set-up failed on .*: model not found"):
        list(run_tasks(BadSetup(), [1, 2], backend="ray", address=cluster.address, workers=1,
                       progress=False))


# ------------------------------------------------------------------------------------------------
# naflow check over 200 images, a worker node killed mid-run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """200 images 24x24 with a red square somewhere, a model, a config with boxes for half of
    them, and a baseline-free check of prediction, mass in region and flow stability."""
    root = tmp_path_factory.mktemp("raycheck")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    expects = []
    for i in range(N_IMAGES):
        img = (rng.random((24, 24, 3)) * 150).astype(np.uint8)
        img[..., 0] = np.minimum(img[..., 0], img[..., 1])
        x0, y0 = (int(v) for v in rng.integers(0, 16, 2))
        img[y0:y0 + 8, x0:x0 + 8] = [230, 40, 40]
        Image.fromarray(img).save(root / "imgs" / f"{i:03d}.png")
        if i % 2 == 0:
            expects.append(f'[[expect]]\nimage = "imgs/{i:03d}.png"\nclass = 0\n'
                           f'box = [{x0}, {y0}, {x0 + 8}, {y0 + 8}]\n')
    model = root / "red.onnx"
    export(RedDetector(width=6, stages=2), model, (1, 3, 24, 24), preprocess="none")
    cfg = root / "naflow-check.toml"
    cfg.write_text('[inputs]\nimages = "imgs/*.png"\npreprocess = "none"\n' + "\n".join(expects) +
                   "[checks]\nprediction = true\nfinal_mass_in_region = 0.5\nflow_stability = 0.3\n")
    return {"root": root, "model": model, "config": cfg}


def run_check(d, out, *extra):
    code = main_check([str(d["model"]), "--config", str(d["config"]), "--out", str(out), "--quiet",
                       *map(str, extra)])
    return code, json.loads((out / "report.json").read_text())


def comparable(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("timings", "jobs", "backend")}


@pytest.fixture(scope="module")
def local_report(dataset, tmp_path_factory):
    """The same check in this process, computed afresh (the library call, memo off)."""
    from naflow_onnx.check import CheckOptions, run
    out = tmp_path_factory.mktemp("local") / "report"
    result = run(dataset["model"], dataset["config"], options=CheckOptions(memo=False))
    result.write(out)
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["images"] == N_IMAGES and report["summary"]["errors"] == 0
    return result.code, report


def test_check_on_ray_survives_a_killed_worker_node(cluster, dataset, local_report, tmp_path):
    """The worker node is killed at the moment the driver hands an item to that node's actor,
    after results have come in, while the driver waits there (naflow_onnx.testhooks): the kill
    happens mid-run whatever the machine's speed, with that item still unreported."""
    out = tmp_path / "report"
    killed = []

    results = []

    def count_results(count):
        results.append(count)

    def kill_on_dispatch_to_worker_node(count, pid):
        # an item handed to the actor on the worker node after results have come in: kill
        # that node now, with the item unreported (whatever the machine's speed: no race)
        if not killed and results and pid in cluster.worker_pids():
            killed.append(cluster.kill_worker())
    t0 = time.perf_counter()
    with testhooks.pause("check.result", count_results), \
            testhooks.pause("ray.dispatch", kill_on_dispatch_to_worker_node):
        code, report = run_check(dataset, out, "--backend", "ray", "--address", cluster.address,
                                 "--workers", "2")
    seconds = time.perf_counter() - t0
    assert len(killed) == 1 and killed[0], "the worker node was not killed during the run"
    lcode, lreport = local_report
    assert code == lcode
    assert report["summary"]["errors"] == 0, [e for e in report["images"] if e["status"] == "error"]
    # every value of every image; the killed actor's items were rerun alone, not in their
    # batch, so their numbers may differ from the local run's in the last bits
    assert_close(comparable(report), comparable(lreport))
    b = report["backend"]
    assert b["name"] == "ray" and b["address"] == cluster.address
    assert b["worker_deaths"] >= 1 and b["resubmitted"] >= 1, b
    assert report["jobs"] == 2
    print(f"ray check of {N_IMAGES} images with a killed node: {seconds:.1f} s; {b}")

    # --resume: every flow is reused from the report folder's cache; then 20 are analysed again
    code2, again = run_check(dataset, out, "--resume")
    assert again["backend"]["resumed"] == N_IMAGES
    assert_close(comparable(again), comparable(lreport))
    entries = sorted((out / ".naflow-cache").iterdir())
    assert len(entries) == N_IMAGES
    for e in entries[:20]:
        shutil.rmtree(e)
    code3, third = run_check(dataset, out, "--resume", "--backend", "ray", "--address",
                             cluster.address)
    # the 20 images analysed again form other batches than the local run's: last bits may move
    assert third["backend"]["resumed"] == N_IMAGES - 20
    assert_close(comparable(third), comparable(lreport))


# ------------------------------------------------------------------------------------------------
# naflow analyze on Ray


def test_analyze_on_ray_matches_local_and_reports_a_broken_image(cluster, dataset, tmp_path, capsys):
    imgs = [str(dataset["root"] / "imgs" / f"{i:03d}.png") for i in range(4)]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    images = imgs[:2] + [str(bad)] + imgs[2:]
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert cli_main(["analyze", str(dataset["model"]), *images, "--out", str(local), "--quiet"]) == 2
    assert cli_main(["analyze", str(dataset["model"]), *images, "--out", str(remote), "--quiet",
                     "--backend", "ray", "--address", cluster.address, "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "cannot read the image" in err
    names = ["000_000", "001_001", "003_002", "004_003"]
    for out in (local, remote):
        assert sorted(p.name for p in out.iterdir()) == [".naflow-output"] + names + ["failures.json"]
        fails = json.loads((out / "failures.json").read_text())["failed"]
        assert [(f["index"], Path(f["image"]).name) for f in fails] == [(2, "broken.png")]
    for name in names:
        for f in ("maps.npz", "flow.png"):
            assert (local / name / f).read_bytes() == (remote / name / f).read_bytes(), (name, f)
        jl, jr = (json.loads((d / name / "flow.json").read_text()) for d in (local, remote))
        jl.pop("timings"), jr.pop("timings")
        assert jl == jr
    # --resume: the four finished images are skipped, the fixed one is analysed
    Image.open(imgs[0]).save(bad)
    before = (remote / "000_000" / "flow.json").stat().st_mtime_ns
    assert cli_main(["analyze", str(dataset["model"]), *images, "--out", str(remote), "--json",
                     "--resume", "--backend", "ray", "--address", cluster.address]) == 0
    captured = capsys.readouterr()
    assert "4 of 5 images already done" in captured.err
    assert len(json.loads(captured.out)) == 5
    assert sorted(p.name for p in remote.iterdir()) == sorted([".naflow-output", *names, "002_broken"])
    assert (remote / "000_000" / "flow.json").stat().st_mtime_ns == before   # not rewritten
