"""tools/propose.py --append: new photos added to a proposal-stage pack (crackio.writing.append)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crackio import make_loader
from crackio.errors import ConfigError
from crackio.format.index import load_index
from crackio.format.verify import verify
from crackio.writing.append import draw_split
from crackio.writing.proposal_stage import ProposeSettings, propose_to_shards
from crackio.writing.regions import ProposalSettings
from tests.conftest import ROOT
from tests.helpers import TINY_ARGS, kill_when
from tests.test_pack import shard_files
from tools.make_demo_data import write_photos

FAST = ProposalSettings(max_proposals=40)
RUN = ProposeSettings(workers=1, samples_per_shard=60)


def renamed(root: Path, prefix: str) -> Path:
    """The YOLO photos under `root` with every stem prefixed (another month's photos: other names)."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".jpg", ".txt") and path.name != "classes.txt":
            path.rename(path.with_name(prefix + path.name))
    return root


@pytest.fixture(scope="module")
def new_photos(tmp_path_factory) -> Path:
    """8 photos of other stems (seed 9), YOLO: the photos appended."""
    root = tmp_path_factory.mktemp("new_photos")
    write_photos(root, images=8, seed=9, size=(192, 128), formats=("yolo",))
    return renamed(root / "yolo", "m2_")


@pytest.fixture(scope="module")
def base(demo_photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    propose_to_shards(demo_photos / "coco", "coco", out, FAST, RUN, progress=False)
    return out


@pytest.fixture(scope="module")
def appended(base, new_photos, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("appended") / "pack"
    shutil.copytree(base, out)
    return out, propose_to_shards(new_photos, "yolo", out, FAST, RUN, progress=False, append=True)


@pytest.mark.slow  # end-to-end: `make test-fast` leaves it out
def test_append_keeps_every_earlier_shard_and_adds_shards_after_them(base, appended):
    out, result = appended
    before, after = shard_files(base), shard_files(out)
    assert all(after[name] == data for name, data in before.items() if name.endswith((".tar", ".idx")))
    new = sorted(set(after) - set(before))
    assert new and all(name.endswith((".tar", ".idx")) for name in new)
    assert list(verify(out)) == []
    assert result["appended"] == 8 and result["reused"]["already"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    old = json.loads((base / "manifest.json").read_text())
    for split, entry in manifest["splits"].items():
        rows = load_index(out, split).rows
        first = len(old["splits"].get(split, {}).get("shards", []))
        assert entry["shards"][:first] == old["splits"].get(split, {}).get("shards", [])
        assert entry["samples"] == len(rows) == sum(s["samples"] for s in entry["shards"])
        assert (np.diff(rows["key"]) > 0).all()
    # Every crop of both photo sets once: the appended photos' stems and the earlier ones'.
    stems = {bytes(s).decode() for split in manifest["splits"] for s in load_index(out, split).rows["stem"]}
    assert sum(s.startswith("m2_") for s in stems) == 8 and len(stems) == 20
    assert manifest["appended"][0]["annotations"]["format"] == "yolo"
    assert sum(len(v) for v in manifest["appended"][0]["photos"]["splits"].values()) == 8
    assert manifest["photos"] == old["photos"]  # the pack's own photo list is as it was


@pytest.mark.slow  # end-to-end: `make test-fast` leaves it out
def test_appended_crops_are_the_crops_of_those_photos_proposed_alone(new_photos, appended, tmp_path):
    out, _ = appended
    alone = tmp_path / "alone"
    propose_to_shards(new_photos, "yolo", alone, FAST, RUN, progress=False)

    def crops(pack: Path, prefix: str) -> dict[str, bytes]:
        got = {}
        for split in json.loads((pack / "manifest.json").read_text())["splits"]:
            index = load_index(pack, split)
            for row in index.rows:
                if bytes(row["stem"]).decode().startswith(prefix):
                    tar = index.shards[int(row["shard"])]
                    with open(tar, "rb") as f:
                        f.seek(int(row["offset"]))
                        got[bytes(row["filename"]).decode()] = f.read(int(row["size"]))
        return got

    assert crops(out, "m2_") == crops(alone, "m2_")


def test_a_photos_split_is_its_own_draw():
    ratios = (0.7, 0.15, 0.15)
    stems = [f"photo_{i}" for i in range(2000)]
    draws = [draw_split(s, ratios, 0) for s in stems]
    assert draws[:50] == [draw_split(s, ratios, 0) for s in stems[:50]]  # alone or among others
    shares = [draws.count(s) / len(draws) for s in ("train", "valid", "test")]
    assert np.allclose(shares, ratios, atol=0.03)
    assert [draw_split(s, ratios, 1) for s in stems[:200]] != draws[:200]  # the seed is a setting


@pytest.mark.slow  # end-to-end: `make test-fast` leaves it out
def test_appending_the_same_photos_again_appends_nothing(appended, new_photos, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(appended[0], out)
    before = (out / "manifest.json").read_bytes()
    result = propose_to_shards(new_photos, "yolo", out, FAST, RUN, progress=False, append=True)
    assert result["appended"] == 0 and result["reused"]["already"] == 8
    assert (out / "manifest.json").read_bytes() == before and not (out / ".spool").exists()


@pytest.mark.slow  # end-to-end: `make test-fast` leaves it out
def test_another_photo_under_a_name_in_the_pack_is_refused(base, demo_photos, tmp_path):
    other = tmp_path / "other"
    write_photos(other, images=12, seed=11, size=(192, 128), formats=("coco",))  # the base's names, other photos
    out = tmp_path / "pack"
    shutil.copytree(base, out)
    with pytest.raises(ConfigError, match=r"--append: .*IMG_0000.* is not the photo the pack holds under the name"):
        propose_to_shards(other / "coco", "coco", out, FAST, RUN, progress=False, append=True)
    assert shard_files(out) == shard_files(base)


def test_append_refuses_other_settings_and_packs_it_did_not_make(base, new_photos, demo_src, tmp_path):
    out = tmp_path / "pack"
    shutil.copytree(base, out)
    with pytest.raises(ConfigError, match=r"--append: .* other settings \(max_proposals 40 then, 80 now\)"):
        propose_to_shards(new_photos, "yolo", out, ProposalSettings(max_proposals=80), RUN, False, append=True)
    with pytest.raises(ConfigError, match=r"holds no complete pack .* without --append"):
        propose_to_shards(new_photos, "yolo", tmp_path / "none", FAST, RUN, progress=False, append=True)
    from crackio.writing.pack import PackSettings, pack

    pack(demo_src, tmp_path / "packed", PackSettings(workers=1), progress=False)
    with pytest.raises(ConfigError, match="tools/pack.py; tools/propose.py appends"):
        propose_to_shards(new_photos, "yolo", tmp_path / "packed", FAST, RUN, progress=False, append=True)
    assert shard_files(out) == shard_files(base)


@pytest.mark.slow
def test_an_append_killed_halfway_resumes_to_the_same_pack(base, new_photos, appended, tmp_path):
    out = tmp_path / "pack"
    shutil.copytree(base, out)
    cmd = [sys.executable, str(ROOT / "tools" / "propose.py"), str(new_photos), "--format", "yolo", "--out", str(out)]
    cmd += ["--max-proposals", "40", "--workers", "1", "--samples-per-shard", "60", "--append", "--quiet"]
    # Killed (as the OOM killer does) once its first new shard is written: the pack's indexes are being rewritten.
    kill_when(cmd, out, "train/train-00000[1-9].tar", tmp_path / "stop")
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "reused from an interrupted run: 8 of 8 photos" in rerun.stdout
    assert shard_files(out) == shard_files(appended[0])
    assert (out / "manifest.json").read_bytes() == (appended[0] / "manifest.json").read_bytes()


@pytest.mark.slow
def test_a_run_on_the_pack_before_refuses_to_resume_and_a_new_run_trains_on_all(base, appended, tmp_path):
    def train(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "train", *args, *TINY_ARGS, "--head", "linear", "--batch-size", "16"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)

    run, pack = tmp_path / "run", tmp_path / "pack"
    shutil.copytree(base, pack)
    done = train("--shards", str(pack), "--out", str(run), "--epochs", "1", "--limit-batches", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.rmtree(pack)
    shutil.copytree(appended[0], pack)
    refused = subprocess.run(
        [sys.executable, "-m", "train", "--resume", str(run), "--epochs", "2"], capture_output=True, text=True, cwd=ROOT
    )
    assert refused.returncode != 0 and "holds another pack than the run trained on" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    fresh = train("--shards", str(pack), "--out", str(tmp_path / "fresh"), "--epochs", "1", "--limit-batches", "2")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    loader = make_loader(str(pack), "train", batch_size=32, train=False, device="cpu", backend="torch")
    samples = json.loads((pack / "manifest.json").read_text())["splits"]["train"]["samples"]
    assert (
        sum(len(b.labels) for b in loader)
        == samples
        > json.loads((base / "manifest.json").read_text())["splits"]["train"]["samples"]
    )


@pytest.mark.slow  # end-to-end: `make test-fast` leaves it out
def test_pack_append_adds_the_new_crops_after_the_packs_shards(demo_src, tmp_path):
    """tools/pack.py --append: a crop folder's new files in shards after the pack's, the pack's untouched; crops
    of names it holds are skipped; the same pack again appends nothing."""
    from crackio.writing.pack import PackSettings, pack

    settings = PackSettings(workers=1, samples_per_shard=50)
    out = tmp_path / "pack"
    pack(demo_src, out, settings, progress=False)
    before = shard_files(out)
    more = tmp_path / "more"
    for split in ("train", "valid"):  # the same crops again, and new ones under other names
        (more / split).mkdir(parents=True)
        for k, crop in enumerate(sorted((demo_src / split).glob("*.jpg"))[:30]):
            shutil.copy(crop, more / split / crop.name)
            if k % 2:
                shutil.copy(crop, more / split / ("new_" + crop.name))
    result = pack(more, out, settings, progress=False, append=True)
    assert result["appended"] == 30 and result["already"] == 60
    after = shard_files(out)
    assert all(after[name] == data for name, data in before.items() if name.endswith((".tar", ".idx")))
    assert list(verify(out)) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["appended"] == [{"source": str(more.absolute()), "inputs": 30}]
    names = {bytes(n).decode() for n in load_index(out, "train").rows["filename"]}
    assert sum(n.startswith("new_") for n in names) == 15
    assert manifest["leakage"]["duplicate_contents"]["count"] == 0  # the copies are in their own crops' split
    again = pack(more, out, settings, progress=False, append=True)
    assert again["appended"] == 0 and (out / "manifest.json").read_text() == json.dumps(manifest, indent=1) + "\n"
    with pytest.raises(ConfigError, match=r"other settings \(seed 0 then, 1 now\)"):
        pack(more, out, PackSettings(workers=1, samples_per_shard=50, seed=1), progress=False, append=True)


@pytest.mark.slow  # end-to-end: `make test-fast` leaves it out
def test_a_pack_with_appended_photos_is_not_rebuilt_from_one_source(demo_photos, appended, tmp_path):
    """Writing an appended pack again without --append would drop what was appended: refused unless --overwrite."""
    out = tmp_path / "pack"
    shutil.copytree(appended[0], out)
    before = shard_files(out)
    with pytest.raises(ConfigError, match=r"had more added with --append \(from .*new_photos.*\): writing it again"):
        propose_to_shards(demo_photos / "coco", "coco", out, FAST, RUN, progress=False)
    assert shard_files(out) == before
    propose_to_shards(demo_photos / "coco", "coco", out, FAST, RUN, progress=False, overwrite=True)
    assert "appended" not in json.loads((out / "manifest.json").read_text())


@pytest.mark.slow  # end-to-end: `make test-fast` leaves it out
def test_an_interrupted_append_is_finished_not_replaced(base, new_photos, demo_photos, tmp_path):
    out = tmp_path / "pack"
    shutil.copytree(base, out)
    (out / "manifest.json").unlink()  # where an interrupted append leaves the pack: its copy in .spool/base
    (out / ".spool" / "base").mkdir(parents=True)
    shutil.copy(base / "manifest.json", out / ".spool" / "base" / "manifest.json")
    for split in json.loads((base / "manifest.json").read_text())["splits"]:
        (out / ".spool" / "base" / split).mkdir()
        shutil.copy(base / split / "index.npy", out / ".spool" / "base" / split / "index.npy")
    with pytest.raises(ConfigError, match="an append was adding to when it was interrupted: run that same command"):
        propose_to_shards(new_photos, "yolo", out, FAST, RUN, progress=False)
    from crackio.format.manifest import repack

    assert repack(out).startswith("an append to it was interrupted")
    propose_to_shards(new_photos, "yolo", out, FAST, RUN, progress=False, append=True)
    assert list(verify(out)) == [] and not (out / ".spool").exists()


def test_append_where_no_pack_is_leaves_nothing(new_photos, tmp_path):
    with pytest.raises(ConfigError, match="holds no complete pack"):
        propose_to_shards(new_photos, "yolo", tmp_path / "none", FAST, RUN, progress=False, append=True)
    assert not (tmp_path / "none").exists()


@pytest.mark.slow  # end-to-end: `make test-fast` leaves it out
def test_append_takes_its_own_annotation_reading(base, tmp_path):
    """--classes, --mask-piece and --mask-crack-label say how a source's annotations are read: an appended set of
    masks or of other class names is not refused for them."""
    masks = tmp_path / "masks"
    write_photos(masks, images=6, seed=13, size=(192, 128), formats=("mask",))
    renamed(masks / "mask", "m3_")
    for path in sorted((masks / "mask").rglob("*.png")):  # masks carry the photo's stem too
        path.rename(path.with_name("m3_" + path.name))
    out = tmp_path / "pack"
    shutil.copytree(base, out)
    result = propose_to_shards(masks / "mask", "mask", out, FAST, ProposeSettings(workers=1, samples_per_shard=60,
                               mask_piece=40), progress=False, append=True)  # fmt: skip
    assert result["appended"] == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["appended"][-1]["annotations"]["mask_piece"] == 40 and manifest["settings"]["mask_piece"] == 0
