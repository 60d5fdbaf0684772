"""tools/propose.py: annotated photos in four formats to shards, R-CNN's proposal stage."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crackio import make_loader
from crackio.format.index import load_index
from crackio.writing.annotations import read_annotations, resolve_boxes
from crackio.writing.outdir import WRITTEN
from crackio.writing.pack import PackSettings, pack
from crackio.writing.proposal_stage import ProposeSettings, load_photo, propose_to_shards
from crackio.writing.regions import ProposalSettings, proposals_of, stratified_negatives, warp
from crackio.writing.spool import chunk_files
from tests.conftest import BACKENDS, ROOT
from tests.helpers import kill_when
from tests.test_pack import read_with_webdataset, shard_files
from tools.make_demo_data import FORMATS, FULL, full_image, image_plan

SIZE = (192, 128)  # small photos: selective search in ~0.1 s each
FAST = ProposalSettings(max_proposals=40)


@pytest.fixture(scope="module")
def photos(demo_photos) -> Path:
    """The session's photos: 12, seed 4, SIZE, every format (what truth() recomputes)."""
    return demo_photos


def truth(seed: int = 4, images: int = 12) -> dict[str, np.ndarray]:
    """The generator's own ground-truth boxes per stem, in photo pixels (as write_photos scales them)."""
    scale = np.array([*SIZE, *SIZE]) / FULL
    return {stem: (full_image(rng)[1] * scale).round(1) for _, stem, rng in image_plan(images, seed)}


@pytest.fixture(scope="module")
def proposed(photos, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out = {}
    for fmt in FORMATS:
        folder = tmp_path_factory.mktemp(f"shards_{fmt}")
        out[fmt] = (
            folder,
            propose_to_shards(photos / fmt, fmt, folder, FAST, ProposeSettings(workers=2), progress=False),
        )
    return out


@pytest.mark.parametrize("fmt", ["coco", "yolo", "voc"])
def test_box_readers_give_the_known_boxes(photos, fmt):
    expected = truth()
    data = read_annotations(photos / fmt, fmt)
    assert sorted(p.stem for p in data.photos) == sorted(expected) and not data.problems
    assert {p.split for p in data.photos} == {"train", "valid", "test"}
    for p in data.photos:
        boxes, notes, errors = resolve_boxes(p, *SIZE)
        assert not notes and not errors
        np.testing.assert_allclose(boxes, expected[p.stem], atol=0.01 if fmt != "yolo" else 0.05)


def test_mask_reader_boxes_cover_the_drawn_cracks(photos):
    expected = truth()
    for p in read_annotations(photos / "mask", "mask").photos:
        boxes, notes, errors = resolve_boxes(p, *SIZE)
        assert not notes and not errors and len(boxes)
        gt = expected[p.stem]  # the drawing's boxes have a 6-pixel pad the mask does not
        for box in boxes:
            inter = np.clip(np.minimum(box[2:], gt[:, 2:]) - np.maximum(box[:2], gt[:, :2]), 0, None).prod(1)
            assert (inter / ((box[2] - box[0]) * (box[3] - box[1]))).max() > 0.8


def test_coco_image_without_annotations_is_a_photo_without_ground_truth(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    Image.new("RGB", (64, 48), (90, 90, 90)).save(folder / "empty.jpg")
    Image.new("RGB", (64, 48), (90, 90, 90)).save(folder / "one.jpg")
    doc = {
        "images": [
            {"id": 1, "file_name": "empty.jpg"},
            {"id": 2, "file_name": "one.jpg"},
            {"id": 3, "file_name": "gone.jpg"},
        ],
        "annotations": [{"id": 7, "image_id": 2, "category_id": 1, "segmentation": [[4, 4, 20, 4, 20, 30, 4, 30]]}],
        "categories": [{"id": 1, "name": "crack"}, {"id": 2, "name": "spall"}],
    }
    (folder / "_annotations.coco.json").write_text(json.dumps(doc))
    data = read_annotations(tmp_path, "coco")
    by_stem = {p.stem: p for p in data.photos}
    assert len(by_stem["empty"].boxes) == 0
    np.testing.assert_allclose(by_stem["one"].boxes, [[4, 4, 20, 30]])  # the polygon's box
    assert data.problems == [(str(folder / "gone.jpg"), "missing image named in _annotations.coco.json")]
    with pytest.raises(Exception, match="--classes pothole: not in the COCO categories"):
        read_annotations(tmp_path, "coco", ["pothole"])


def test_yolo_box_touching_the_border_and_bad_lines(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for stem in ("a", "b", "c"):
        Image.new("RGB", (200, 100)).save(tmp_path / "images" / f"{stem}.jpg")
    # A byte-order mark (Windows editors), a box touching the right edge, a class that is not crack.
    (tmp_path / "labels" / "a.txt").write_text(
        "\ufeff0 0.95 0.5 0.1 0.4\n0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n", encoding="utf-8"
    )
    (tmp_path / "labels" / "b.txt").write_text("0 120 50 20 20\n")  # pixels, not normalized
    (tmp_path / "labels" / "c.txt").write_text("0 nan 0.5 0.2 0.1\n2 0.5 0.5 0.1 0.1\n")
    (tmp_path / "classes.txt").write_text("crack\nspall\n")
    photos = {p.stem: p for p in read_annotations(tmp_path, "yolo", ["crack"]).photos}
    boxes, notes, errors = resolve_boxes(photos["a"], 200, 100)
    np.testing.assert_allclose(boxes, [[180, 30, 200, 70], [80, 40, 120, 60]])  # spall (class 1) is not crack
    assert not notes and not errors
    assert "not normalized" in resolve_boxes(photos["b"], 200, 100)[2][0]
    errors = resolve_boxes(photos["c"], 200, 100)[2]
    assert "finite numbers" in errors[0] and "class 2 is not in the 2 class names" in errors[1]


def test_voc_difficult_objects_are_ground_truth(tmp_path):
    Image.new("RGB", (100, 80)).save(tmp_path / "p.jpg")
    (tmp_path / "p.xml").write_text(
        "<annotation><filename>p.jpg</filename><object><name>crack</name><difficult>1</difficult><bndbox>"
        "<xmin>11</xmin><ymin>21</ymin><xmax>40</xmax><ymax>60</ymax></bndbox></object></annotation>"
    )
    (photo,) = read_annotations(tmp_path, "voc").photos
    np.testing.assert_allclose(photo.boxes, [[10, 20, 40, 60]])  # VOC's 1-based inclusive corners
    assert photo.difficult == [True]


def iou_by_hand(box: np.ndarray, gt: np.ndarray) -> np.ndarray:
    w = np.clip(np.minimum(box[2], gt[:, 2]) - np.maximum(box[0], gt[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], gt[:, 3]) - np.maximum(box[1], gt[:, 1]), 0, None)
    inter = w * h
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(gt) - inter)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_stored_iou_and_label_is_recomputed(proposed, photos, fmt):
    out, manifest = proposed[fmt]
    gts = {p.stem: resolve_boxes(p, *SIZE)[0] for p in read_annotations(photos / fmt, fmt).photos}
    stems_by_split = {}
    for split in manifest["splits"]:
        rows = load_index(out, split).rows
        assert len(rows) > 0
        stems_by_split[split] = set(rows["stem"])
        for row in rows:
            gt = gts[row["stem"].decode()]
            ious = iou_by_hand(row["box"].astype(np.float64), gt) if len(gt) else np.zeros(1)
            assert abs(float(ious.max()) - float(row["iou"])) <= 5e-4 + 1e-6  # rounded to 3 decimals (ties either way)
            assert row["label"] == int(round(float(ious.max()), 3) > 0.5)
            if row["gt_id"] >= 0:
                np.testing.assert_allclose(row["gt_box"], gt[row["gt_id"]], atol=1e-3)
            assert tuple(row["photo_size"]) == SIZE
    splits = list(stems_by_split)
    assert splits == ["train", "valid", "test"]
    for i, a in enumerate(splits):  # split by photo: no photo's proposals straddle splits
        for b in splits[i + 1 :]:
            assert not stems_by_split[a] & stems_by_split[b]
    assert manifest["leakage"]["shared_stems"]["count"] == 0
    assert all(s["proposal_recall"] is not None and 0 <= s["proposal_recall"] <= 1 for s in manifest["splits"].values())
    assert manifest["proposals"]["context"] == 16 and manifest["proposals"]["mode"] == "fast"


@pytest.mark.parametrize("like_detection", [True, False])
def test_validation_and_test_crops_are_what_detection_scores(photos, proposed, like_detection, tmp_path):
    if like_detection:
        out, manifest = proposed["coco"]
    else:
        settings = dataclasses.replace(FAST, eval_like_detection=False, negatives_per_image=2)
        manifest = propose_to_shards(photos / "coco", "coco", tmp_path, settings, ProposeSettings(), progress=False)
        out = tmp_path
    assert manifest["proposals"]["eval_like_detection"] is like_detection
    annotated = read_annotations(photos / "coco", "coco").photos
    gts = {p.stem: resolve_boxes(p, *SIZE)[0] for p in annotated}
    paths = {p.stem: p.path for p in annotated}
    for split in manifest["splits"]:
        rows = load_index(out, split).rows
        for stem in np.unique(rows["stem"]):
            mine = rows[rows["stem"] == stem]
            truth = mine[mine["ground_truth"] == 1]
            if split == "train" or not like_detection:  # R-CNN's fine-tuning crops: every ground-truth box added
                assert len(truth) == len(gts[stem.decode()]) and (truth["iou"] == 1).all()
                np.testing.assert_allclose(np.sort(truth["box"], 0), np.sort(gts[stem.decode()], 0), atol=1e-3)
            else:  # detection's: every proposal up to the cap, nothing added, nothing left out
                found = proposals_of(load_photo(paths[stem.decode()]), FAST, [0, zlib.crc32(stem)])[0]
                assert not len(truth) and len(mine) == len(found) <= FAST.max_proposals
                assert sorted(mine["proposal"]) == list(range(len(found)))


def test_warp_pads_with_the_photo_mean_at_the_edge():
    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[:, :100] = (200, 0, 0)
    rgb[:, 100:] = (0, 0, 200)
    fill = rgb.reshape(-1, 3).mean(0)  # (100, 0, 100)
    crop = warp(rgb, np.array([0, 0, 96, 100.0]), context=16, size=224, fill=fill)
    # Left of the photo (the context band before x = 0): the mean colour; the box itself: red.
    np.testing.assert_allclose(crop[100, :14], np.tile([100, 0, 100], (14, 1)), atol=1)
    np.testing.assert_allclose(crop[100, 20:200], np.tile([200, 0, 0], (180, 1)), atol=1)
    assert crop[100, 222, 2] > 150  # the context band right of the box (photo x 96..104) reaches the blue half
    assert crop.shape == (224, 224, 3)


def test_stratified_negatives_spread_over_iou_bins():
    rng = np.random.default_rng(0)
    ious = np.concatenate([np.zeros(100), np.full(5, 0.42), np.full(5, 0.27)])
    chosen = stratified_negatives(ious, np.arange(len(ious)), 12, rng)
    assert len(chosen) == 12 and len(set(chosen)) == 12
    assert (ious[chosen] == 0.42).sum() == 4 and (ious[chosen] == 0.27).sum() == 4  # equal shares per bin


@pytest.mark.slow  # multi-process or end-to-end: `make test-fast` leaves it out
def test_same_output_for_any_worker_count_and_after_an_interruption(photos, proposed, tmp_path):
    ref, _ = proposed["coco"]
    one = tmp_path / "one"
    propose_to_shards(photos / "coco", "coco", one, FAST, ProposeSettings(workers=1), progress=False)
    assert shard_files(one) == shard_files(ref)
    assert (one / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    # An interrupted run: no manifest, a half-written tar, a stale spool; the re-run gives the same bytes.
    (one / "manifest.json").unlink()
    tar = next((one / "train").glob("*.tar"))
    tar.write_bytes(tar.read_bytes()[:700])
    (one / ".spool").mkdir()
    for name in chunk_files(0):  # an interrupted run's damaged spool chunk, which it had recorded
        (one / name).write_bytes(b"stale")
    record = json.loads((one / WRITTEN).read_text())
    (one / WRITTEN).write_text(json.dumps({"files": record["files"] + list(chunk_files(0))}))
    propose_to_shards(photos / "coco", "coco", one, FAST, ProposeSettings(workers=2), progress=False)
    assert shard_files(one) == shard_files(ref) and not (one / ".spool").exists()


@pytest.mark.slow  # multi-process or end-to-end: `make test-fast` leaves it out
def test_crops_folder_equals_the_shards_and_packs_to_the_same_samples(photos, proposed, tmp_path):
    ref, _ = proposed["yolo"]
    crops = tmp_path / "crops"
    propose_to_shards(
        photos / "yolo", "yolo", tmp_path / "s", FAST, ProposeSettings(workers=2), crops=crops, progress=False
    )
    packed = tmp_path / "packed"
    pack(crops, packed, PackSettings(workers=1), progress=False)
    for split in ("train", "valid", "test"):
        stored = read_with_webdataset(ref, split)
        files = {p.name: p.read_bytes() for p in (crops / split).iterdir()}
        assert files == {name: s["jpg"] for name, s in stored.items()}
        repacked = read_with_webdataset(packed, split)
        assert {n: (s["jpg"], s["meta"]["iou"], s["meta"]["label"]) for n, s in repacked.items()} == {
            n: (s["jpg"], s["meta"]["iou"], s["meta"]["label"]) for n, s in stored.items()
        }


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaders_read_proposal_shards(proposed, backend):
    out, manifest = proposed["mask"]
    loader = make_loader(out, "valid", batch_size=16, train=False, device="cpu", backend=backend)
    assert sum(len(b.names) for b in loader) == manifest["splits"]["valid"]["samples"]


@pytest.mark.slow
def test_cli_and_training_on_the_result(photos, tmp_path):
    for fmt in ("coco",):  # every format goes through the same call; each reader is tested above
        run = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tools" / "propose.py"),
                str(photos / fmt),
                "--format",
                fmt,
                "--out",
                str(tmp_path / fmt),
                "--max-proposals",
                "30",
                "--quiet",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        assert "proposal recall" in run.stdout
    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "propose.py"),
            str(photos / "coco"),
            "--format",
            "coco",
            "--out",
            str(tmp_path / "x"),
            "--classes",
            "pothole",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "pothole" in bad.stderr and "Traceback" not in bad.stderr
    from tests.helpers import tiny
    from train.run.main import main

    run_dir = main(tiny(tmp_path / "coco", tmp_path / "run", epochs=1, limit_batches=2))  # a few steps suffice
    assert (run_dir / "summary.json").is_file()


@pytest.mark.slow
def test_problems_are_listed_and_strict_fails(photos, tmp_path):
    src = tmp_path / "voc"
    shutil.copytree(photos / "voc", src)
    first = sorted((src / "train").glob("*.jpg"))[0]
    first.write_bytes(b"not a photo")
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "propose.py"),
            str(src),
            "--format",
            "voc",
            "--out",
            str(tmp_path / "o"),
            "--max-proposals",
            "20",
            "--quiet",
            "--strict",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1 and "--strict" in run.stderr
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [s["path"] for s in manifest["skipped"]] == [str(first)]
    assert "unreadable photo" in manifest["skipped"][0]["reason"]


@pytest.mark.slow
def test_rerun_after_kill_gives_identical_shards(photos, proposed, tmp_path):

    ref, _ = proposed["voc"]
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "propose.py"),
        str(photos / "voc"),
        "--format",
        "voc",
        "--out",
        str(out),
        "--max-proposals",
        "40",
        "--workers",
        "2",
        "--quiet",
    ]
    kill_when(cmd, out, ".spool/chunk-000001.npz", tmp_path / "stop")  # killed after its second chunk of photos
    rerun = subprocess.run(cmd, check=True, timeout=300, capture_output=True, text=True)
    # Chunks are of one split: train's 8 photos, then valid's 2; those 10 are not proposed again.
    assert "reused from an interrupted run: 10 of 12 photos" in rerun.stdout
    assert shard_files(out) == shard_files(ref)
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    assert not list(out.rglob("*.tmp")) and not (out / ".spool").exists()


@pytest.mark.slow  # multi-process or end-to-end: `make test-fast` leaves it out
def test_a_photo_with_incomplete_ground_truth_is_left_out_not_made_negatives(photos, tmp_path):
    """One broken annotation per format: that photo is listed and stores no crop; the others are kept."""
    broken = {}
    for fmt in FORMATS:
        src = tmp_path / fmt
        shutil.copytree(photos / fmt, src)
        if fmt == "coco":
            path = src / "train" / "_annotations.coco.json"
            doc = json.loads(path.read_text())
            doc["annotations"][0]["bbox"][2] = -5  # a negative width
            broken[fmt] = doc["images"][doc["annotations"][0]["image_id"]]["file_name"].rsplit(".", 1)[0]
            path.write_text(json.dumps(doc))
        elif fmt == "yolo":
            label = sorted((src / "train" / "labels").glob("*.txt"))[0]
            label.write_text(label.read_text() + "0 0.5 0.5\n")  # three numbers
            broken[fmt] = label.stem
        elif fmt == "voc":
            xml = sorted((src / "train").glob("*.xml"))[0]
            text = xml.read_text()
            xml.write_text(text.replace("<xmin>", "<xmin>9999", 1))  # xmin > xmax
            broken[fmt] = xml.stem
        else:
            mask = sorted((src / "train" / "masks").glob("*.png"))[0]
            Image.new("L", (10, 10)).save(mask)  # the wrong size
            broken[fmt] = mask.stem
        manifest = propose_to_shards(src, fmt, tmp_path / f"o_{fmt}", FAST, ProposeSettings(workers=2), progress=False)
        stems = {s.decode() for s in load_index(tmp_path / f"o_{fmt}", "train").rows["stem"]}
        assert broken[fmt] not in stems and len(stems) == 7, fmt
        (problem,) = [s for s in manifest["skipped"] if broken[fmt] in s["path"] or broken[fmt] in s["reason"]]
        assert "ground truth is incomplete" in problem["reason"], problem


def test_coco_problems_are_listed(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    Image.new("RGB", (64, 48)).save(folder / "a.jpg")
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 48}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]},
        ],
        "categories": [{"id": 1, "name": "crack"}],
    }
    (folder / "_annotations.coco.json").write_text(json.dumps(doc))
    (folder / "notes.json").write_text("[1, 2]")
    data = read_annotations(tmp_path, "coco")
    reasons = " | ".join(r for _, r in data.problems)
    assert "names image_id 5" in reasons and "category_id 9" in reasons and "not a COCO annotation" in reasons
    _, _, errors = resolve_boxes(data.photos[0], 64, 48)
    assert any("unknown category_id 9" in e for e in errors) and any("100x48" in e for e in errors)


def test_voc_photo_without_xml_is_listed(tmp_path):
    Image.new("RGB", (50, 40)).save(tmp_path / "a.jpg")
    Image.new("RGB", (50, 40)).save(tmp_path / "b.jpg")
    (tmp_path / "a.xml").write_text("<annotation><filename>a.jpg</filename></annotation>")
    data = read_annotations(tmp_path, "voc")
    assert [p.stem for p in data.photos] == ["a"]
    assert data.problems == [(str(tmp_path / "b.jpg"), "no VOC annotation (XML) names this photo: left out")]


def test_photos_keep_their_dynamic_range(tmp_path):
    from crackio.writing.proposal_stage import load_photo

    Image.fromarray(np.full((20, 30), 32768, np.uint16)).save(tmp_path / "deep.png")
    assert np.abs(load_photo(tmp_path / "deep.png").astype(int) - 128).max() <= 1  # not a white photo


def test_split_ratio_mistakes_are_refused(photos, tmp_path):
    from crackio import ConfigError
    from crackio.writing.proposal_stage import assign_splits

    with pytest.raises(ConfigError, match="three non-negative numbers"):
        assign_splits(read_annotations(photos / "coco", "coco").photos, (float("inf"), 1, 1), 0)

    with pytest.raises(ConfigError, match="split-ratios"):
        propose_to_shards(
            photos / "coco",
            "coco",
            tmp_path / "o",
            FAST,
            ProposeSettings(split_ratios=(float("inf"), 1, 1)),
            progress=False,
        )
    with pytest.raises(ConfigError, match="every photo .* has one"):
        propose_to_shards(
            photos / "coco",
            "coco",
            tmp_path / "o",
            FAST,
            ProposeSettings(split_ratios=(0.5, 0.25, 0.25)),
            progress=False,
        )


def test_propose_flags_are_the_settings_fields(tmp_path, monkeypatch, capsys):
    """tools/propose.py's settings flags come from ProposalSettings and ProposeSettings (crackio.flags): each
    field's `#` comment is its help, and the parsed flags make the settings propose_to_shards receives."""
    import dataclasses

    import tools.propose as tool
    from crackio.flags import field_help, flag

    monkeypatch.setenv("COLUMNS", "400")  # no wrapped help lines
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    text = capsys.readouterr().out
    own_parsing = ("search_max_side", "split_ratios", "classes")
    for cls in (ProposalSettings, ProposeSettings):
        for f in dataclasses.fields(cls):
            if f.name in ("min_size", "size", "quality"):  # fixed: R-CNN's crops
                assert flag(f.name) not in text
            else:
                assert flag(f.name) in text
                assert f.name in own_parsing or field_help(cls)[f.name] in text

    got = {}

    class Stop(Exception):
        pass

    def fake(src, fmt, out, proposal, run, crops, progress, overwrite, cluster, append):
        got.update(proposal=proposal, run=run)
        raise Stop

    monkeypatch.setattr(tool, "propose_to_shards", fake)
    with pytest.raises(Stop):
        tool.main([str(tmp_path), "--format", "coco", "--out", str(tmp_path / "o"), "--quiet"])
    assert got == {"proposal": ProposalSettings(), "run": ProposeSettings()}
    flags = "--mode quality --max-proposals 7 --search-max-side 64 --context 4 --positive-iou 0.6 "
    flags += "--negatives-per-image 3 --gt-jitter 2 --split-ratios 1,0,0 --classes a,b --mask-piece 12 "
    flags += "--mask-crack-label 3 --workers 2 --seed 5 --samples-per-shard 11"
    with pytest.raises(Stop):
        tool.main([str(tmp_path), "--format", "mask", "--out", str(tmp_path / "o"), *flags.split(), "--quiet"])
    proposal = {"mode": "quality", "max_proposals": 7, "search_max_side": 64, "context": 4, "positive_iou": 0.6}
    assert got["proposal"] == ProposalSettings(**proposal, negatives_per_image=3, gt_jitter=2)
    run = {"split_ratios": (1, 0, 0), "classes": ("a", "b"), "workers": 2, "seed": 5, "samples_per_shard": 11}
    assert got["run"] == ProposeSettings(**run, mask_piece=12, mask_crack_label=3)
