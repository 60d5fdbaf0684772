"""The proposal stage and detection on a real Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster:
a head and a worker node, one CPU each, started here and stopped by its own handle). Ray binds the node's own
address (it maps loopback addresses to it on Linux): no traffic leaves the machine.

Without Ray the tests skip; in CI (CRACKIO_REQUIRE_SERVERS=1) they fail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crackio.writing.proposal_stage import ProposeSettings, propose_to_shards
from crackio.writing.regions import ProposalSettings
from tests.conftest import ROOT
from tests.test_pack import shard_files
from tools.make_demo_data import write_photos

pytestmark = pytest.mark.slow
REQUIRED = os.environ.get("CRACKIO_REQUIRE_SERVERS") == "1"
PROPOSE = [sys.executable, str(ROOT / "tools" / "propose.py")]
FLAGS = ["--max-proposals", "40", "--samples-per-shard", "100", "--quiet"]
SETTINGS = (ProposalSettings(max_proposals=40), ProposeSettings(workers=2, samples_per_shard=100))


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine; yields the head's address (what --ray takes)."""
    try:
        from ray.cluster_utils import Cluster
    except ImportError:
        if REQUIRED:
            pytest.fail("Ray is not installed (pip install 'crackio[ray]'; CRACKIO_REQUIRE_SERVERS=1)")
        pytest.skip("Ray is not installed: pip install 'crackio[ray]'")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        yield nodes.address
    finally:
        nodes.shutdown()


def reference(src: Path, fmt: str, out: Path) -> Path:
    propose_to_shards(src, fmt, out, *SETTINGS, progress=False)
    return out


def test_propose_on_two_ray_nodes_gives_the_same_bytes(cluster, demo_photos, tmp_path):
    ref = reference(demo_photos / "coco", "coco", tmp_path / "here")
    out = tmp_path / "ray"
    done = subprocess.run(
        [*PROPOSE, str(demo_photos / "coco"), "--format", "coco", "--out", str(out), *FLAGS, "--ray", cluster],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert shard_files(out) == shard_files(ref)
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()


@pytest.fixture(scope="module")
def larger(tmp_path_factory) -> tuple[Path, Path]:
    """36 photos of 360 x 240 (a chunk of 16 photos takes seconds) and their pack made without Ray."""
    root = tmp_path_factory.mktemp("larger")
    write_photos(root, images=36, seed=5, size=(360, 240), formats=("coco",))
    return root / "coco", reference(root / "coco", "coco", root / "here")


def _tasks_running(title: str) -> list[int]:
    """PIDs of Ray workers running a task named `title` (Ray titles them ray::<name>)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().split(b"\0")[0].startswith(f"ray::{title}".encode()):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_task_killed_mid_run_is_retried_and_the_bytes_are_the_same(cluster, larger, tmp_path):
    src, ref = larger
    out = tmp_path / "ray"
    proc = subprocess.Popen(
        [*PROPOSE, str(src), "--format", "coco", "--out", str(out), *FLAGS, "--ray", cluster],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (running := _tasks_running("propose_chunk")):
        assert proc.poll() is None and time.monotonic() < deadline, "no propose_chunk task was seen running"
        time.sleep(0.05)
    time.sleep(0.5)  # mid-task: selective search under way
    os.kill(running[0], signal.SIGKILL)  # the worker process dies with its task, as on a lost node
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert shard_files(out) == shard_files(ref)
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()


def test_a_run_on_ray_killed_with_sigkill_resumes_to_the_same_bytes(cluster, larger, tmp_path):
    """The driver killed outright (as the OOM killer does); without Ray: tests/test_propose.py."""
    src, ref = larger
    out = tmp_path / "out"
    cmd = [*PROPOSE, str(src), "--format", "coco", "--out", str(out), *FLAGS, "--ray", cluster]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / ".spool").glob("chunk-*.npz")):  # a chunk of photos is finished and recorded
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before a chunk was recorded"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its own processes, as the OOM killer or a lost node
    proc.wait()
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reused = int(rerun.stdout.split("reused from an interrupted run: ")[1].split(" of ")[0])
    assert reused > 0  # at least the chunk seen recorded: its photos were not proposed again
    assert shard_files(out) == shard_files(ref)
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()


def test_detect_on_ray_gives_the_same_detections_and_ap(cluster, proposal_run, tmp_path):
    run = proposal_run
    outputs = {}
    for name, extra in (("here", []), ("ray", ["--ray", cluster])):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "train", "detect", "--checkpoint", str(run / "best.pt"), "--split", "test"]
        done = subprocess.run([*cmd, "--threads", "1", "--out", str(out), *extra], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[name] = out
    here, ray = outputs["here"], outputs["ray"]
    assert (ray / "detections.json").read_bytes() == (here / "detections.json").read_bytes()
    too_many = [sys.executable, "-m", "train", "detect", "--checkpoint", str(run / "best.pt"), "--split", "test"]
    done = subprocess.run([*too_many, "--threads", "2", "--ray", cluster], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "the largest node has 1: give --threads 1 or fewer" in done.stderr
    timing = ("seconds_per_photo", "photos_per_sec", "crops_per_sec")
    a, b = (
        {k: v for k, v in json.loads((o / "summary.json").read_text()).items() if k not in timing} for o in (here, ray)
    )
    assert a == b and a["ap50_voc"] is not None


def test_ray_refusals_are_one_line(demo_photos, tmp_path):
    done = subprocess.run(
        [*PROPOSE, str(demo_photos / "coco"), "--format", "coco", "--out", str(tmp_path / "o"), "--ray", "nowhere"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "--ray: give auto" in done.stderr.replace("argument --ray: ", "--ray: ")
    done = subprocess.run(
        [*PROPOSE, str(demo_photos / "coco"), "--format", "coco", "--out", str(tmp_path / "o"), "--ray", "h:99999"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "give auto" in done.stderr
    done = subprocess.run(
        [*PROPOSE, str(demo_photos / "coco"), "--format", "coco", "--out", "s3://bucket/p", "--ray", "local"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "every node reaches" in done.stderr.splitlines()[-1]


def test_without_ray_installed_ray_says_how_to_install_it(demo_photos, tmp_path, monkeypatch, capsys):
    from tools import propose

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is not installed
    code = propose.main([str(demo_photos / "coco"), "--format", "coco", "--out", str(tmp_path / "o"), "--ray", "local"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --ray needs ray, which is not installed here: pip install 'crackio[ray]'"]
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_an_address_where_no_cluster_listens_fails_at_once(demo_photos, tmp_path):
    done = subprocess.run(
        [*PROPOSE, str(demo_photos / "coco"), "--format", "coco", "--out", str(tmp_path / "o"), "--ray", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "--ray 127.0.0.1:1: nothing answers there" in done.stderr.splitlines()[-1]
    assert not (tmp_path / "o" / "manifest.json").exists()
