"""The peers tools/bench.py measures crackio against (tools/bench_peers.py), in this process: each hands over
batches of the original's augmentation, float32 normalized or uint8, with the labels of the files it read."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tools import bench_peers as peers

pytestmark = pytest.mark.slow  # converts data with the peers' own tools (worker processes)

FILES = 48  # a few batches' worth of the demo split
BATCH = 8


@pytest.fixture(scope="module")
def folder(demo_src):
    return demo_src / "train"


@pytest.fixture(scope="module")
def files(folder):
    return sorted(os.listdir(folder))[:FILES]


def installed(peer: str):
    why = peers.missing(peer)
    if why is not None:
        pytest.skip(why)


def check(batch, files: list[str], output: str) -> None:
    images, labels = batch
    assert images.shape == (BATCH, 3, 224, 224)
    assert images.dtype == (torch.uint8 if output == "uint8" else torch.float32)
    if output == "float32":  # normalized: ImageNet mean/std moved the 0-255 range to about [-2.2, 2.7]
        assert -2.2 <= images.min() < 0 < images.max() <= 2.7
    assert set(labels.tolist()) <= {peers.label_of(f) for f in files} <= {0, 1}


@pytest.mark.parametrize("output", ["float32", "uint8"])
@pytest.mark.parametrize("peer", ["spdl", "torchdata-nodes"])
def test_thread_peers_read_the_folder(peer, output, folder, files):
    installed(peer)
    make = peers.spdl_loader if peer == "spdl" else peers.nodes_loader
    loader = make(folder, files, BATCH, 2, output)
    seen = 0
    for batch in loader:  # torchdata.nodes: one pass; SPDL: endless (stopped when the process ends)
        check(batch, files, output)
        seen += 1
        if seen == FILES // BATCH:
            break
    assert seen == FILES // BATCH


@pytest.mark.parametrize("peer", peers.CONVERTED)
def test_converted_peers_read_their_own_format(peer, folder, files, tmp_path):
    installed(peer)
    out = tmp_path / peer
    seconds = (
        peers.convert_litdata(folder, files, out, 1) if peer == "litdata" else peers.convert_mosaic(folder, files, out)
    )
    assert seconds > 0 and any(out.iterdir())
    make = peers.litdata_loader if peer == "litdata" else peers.mosaic_loader
    for output in ("float32", "uint8"):
        batches = list(make(out, BATCH, 0, output))
        assert len(batches) == FILES // BATCH  # every converted sample, once, in full batches
        for batch in batches:
            check(batch, files, output)
        labels = np.concatenate([b[1].numpy() for b in batches])
        assert sorted(labels.tolist()) == sorted(peers.label_of(f) for f in files)


def test_a_missing_peer_names_the_command_that_installs_it(monkeypatch):
    monkeypatch.setitem(peers.PEER_PACKAGES, "spdl", ("no_such_module_here", "pip install spdl"))
    why = peers.missing("spdl")
    assert "No module named 'no_such_module_here'" in why and why.endswith("install with: pip install spdl")


def test_a_file_spdl_cannot_read_stops_its_row(folder, files, tmp_path):
    """SPDL's pipeline skips a failing item by default: the row would time fewer files than it claims."""
    installed("spdl")
    loader = peers.spdl_loader(folder, [*files[:BATCH], "no-such-file.1.0_5.1.jpg"] * 2, BATCH, 2, "uint8")
    with pytest.raises(Exception):  # noqa: B017 - SPDL's own failure type
        for _ in range(4):
            next(loader)
