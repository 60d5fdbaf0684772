"""python -m train detect: proposals, scores, NMS, boxes in photo pixels, detection AP."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_iou

from crackio import ConfigError
from crackio.format.layout import FORMAT_VERSION
from crackio.writing.proposal_stage import load_photo
from crackio.writing.regions import ProposalSettings
from tests.conftest import needs_cuda
from tests.helpers import ARCH, save_untrained
from train.__main__ import main as cli
from train.detection.detect import Scorer, detect_photo, run_detect
from train.detection.report import Nms, coco_ap, suppress, voc_ap
from train.run.model import build_model, last_linear
from train.settings.commands import DetectSettings

SETTINGS = ProposalSettings(max_proposals=200)
# Dark rectangles on a light, slightly noisy ground: selective search finds each one exactly. The second
# photo is not square and its second box touches the right and bottom edges.
PHOTOS = {
    "easy_a": ((200, 120), [[20, 20, 70, 60], [150, 80, 200, 120]]),
    "easy_b": ((160, 240), [[30, 40, 100, 90], [90, 170, 160, 240]]),
}


class TrueIoU:
    """A stand-in scorer: each crop's score is its proposal's true IoU with the photo's ground truth."""

    threshold = 0.5

    def __init__(self, gt: np.ndarray):
        self.gt = gt

    def __call__(self, jpegs, boxes):
        return box_iou(torch.from_numpy(boxes), torch.from_numpy(self.gt)).max(dim=1).values.numpy()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("detect_photos")
    rng = np.random.default_rng(0)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "crack"}]}
    for i, (stem, ((w, h), boxes)) in enumerate(PHOTOS.items()):
        img = Image.fromarray((np.full((h, w, 3), 150) + rng.integers(0, 6, (h, w, 3))).astype(np.uint8))
        pen = ImageDraw.Draw(img)
        for b in boxes:
            pen.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], fill=(40, 30, 30))
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]),
                    "image_id": i,
                    "category_id": 1,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                }
            )
        img.save(folder / f"{stem}.jpg", quality=95)
        coco["images"].append({"id": i, "file_name": f"{stem}.jpg"})
    coco["images"].append({"id": 9, "file_name": "gone.jpg"})  # annotations naming a photo that is not there
    (folder / "_annotations.coco.json").write_text(json.dumps(coco))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained classifier whose run 'trained' on shards recording the proposal settings."""
    root = tmp_path_factory.mktemp("ckpt")
    shards = root / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(
        json.dumps({"format_version": FORMAT_VERSION, "splits": {}, "proposals": SETTINGS.as_dict()})
    )
    return save_untrained(root / "best.pt", shards, epoch=1)


def detect_all(photos: Path, nms_iou: float = 0.3):
    results = []
    with ThreadPoolExecutor(2) as pool:
        for stem, (_, boxes) in PHOTOS.items():
            gt = np.array(boxes, float)
            r = detect_photo(photos / f"{stem}.jpg", SETTINGS, TrueIoU(gt), Nms(nms_iou), 0, pool)
            r.gt = gt
            results.append(r)
    return results


def test_a_perfect_scorer_finds_every_box_in_photo_pixels_with_ap_1(photos):
    results = detect_all(photos)
    ap, precision, recall = voc_ap(results)
    assert ap == pytest.approx(1.0) and recall[-1] == 1.0
    assert coco_ap(results)["ap50"] == pytest.approx(1.0)
    for r in results:
        assert r.size == PHOTOS[r.stem][0]
        top = r.boxes[r.scores >= 0.5]
        # One detection per ground-truth box, at its place in the photo (the edge box included).
        assert len(top) == len(r.gt)
        assert box_iou(torch.from_numpy(r.gt), torch.from_numpy(top)).max(dim=1).values.min() > 0.95


def test_nms_suppresses_duplicates(photos):
    for r in detect_all(photos):
        assert (r.scores[:-1] >= r.scores[1:]).all()  # best first
        overlap = box_iou(torch.from_numpy(r.boxes), torch.from_numpy(r.boxes)).numpy()
        np.fill_diagonal(overlap, 0)
        assert overlap.max() <= 0.3 + 1e-9
        assert len(r.proposals) > len(r.boxes)  # something was suppressed


def test_containment_keeps_one_box_per_crack():
    boxes = np.array(
        [
            [0, 0, 100, 100],  # the whole crack, best
            [40, 10, 48, 90],  # a thin piece of it, inside: IoU 0.064 with the first, so NMS at 0.3 keeps it
            [90, 90, 140, 140],  # another crack overlapping the corner: 4% of it inside the first
            [110, 92, 116, 138],  # a thin piece of the third, inside it
            [2, 2, 98, 98],  # a near duplicate of the first: NMS's
        ],
        float,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    assert suppress(boxes, scores, Nms(0.3)).tolist() == [0, 1, 2, 3]
    assert suppress(boxes, scores, Nms(0.3, contained=0.8)).tolist() == [0, 2]
    assert suppress(boxes, scores, Nms(0.3, contained=0.8)).dtype == suppress(boxes, scores, Nms(0.3)).dtype
    assert "boxes 0.8 inside a better one" in Nms(0.3, 0.8).describe()
    around = np.array([[40, 10, 48, 90], [0, 0, 100, 100]], float)  # a better piece, then the whole crack around it
    assert suppress(around, np.array([0.9, 0.8]), Nms(0.3, contained=0.8)).tolist() == [0, 1]
    only = suppress(boxes[:1], scores[:1], Nms(0.3, contained=0.5))
    assert only.tolist() == [0]
    with pytest.raises(ConfigError, match="--nms-contained must be in"):
        DetectSettings(checkpoint="x.pt", photos=("p",), nms_contained=0)


def test_svm_scores_are_the_saved_arrays_on_the_networks_features(checkpoint, photos, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=True)
    model = build_model(ARCH, "none", "linear")
    model.load_state_dict(ckpt["model"])
    model.eval()
    rng = np.random.default_rng(1)
    dim = last_linear(model.backbone)[2].in_features
    arrays = {
        "mean": rng.normal(size=dim),
        "scale": rng.uniform(0.5, 2, dim),
        "coef": rng.normal(size=dim),
        "intercept": np.array([0.3]),
        "threshold": np.float64(0.1),
    }
    np.savez(tmp_path / "svm_model.npz", **arrays)
    from crackio.writing.regions import encode_jpeg, warp

    rgb = load_photo(photos / "easy_a.jpg")
    boxes = np.array([[10, 10, 80, 70], [140, 70, 200, 120.0]])
    jpegs = [encode_jpeg(warp(rgb, b, 16, 224, rgb.reshape(-1, 3).mean(0)), 95) for b in boxes]
    scores = Scorer(model, torch.device("cpu"), 8, tmp_path / "svm_model.npz")(jpegs)
    grabbed = []
    hook = last_linear(model.backbone)[2].register_forward_pre_hook(lambda _m, a: grabbed.append(a[0]))
    from torchvision.io import decode_jpeg

    from crackio.loading.augment import augment_normalize

    with torch.no_grad():
        model(
            augment_normalize(
                torch.stack([decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8)) for j in jpegs]), None
            )
        )
    hook.remove()
    expected = ((grabbed[0].numpy() - arrays["mean"]) / arrays["scale"]) @ arrays["coef"] + 0.3
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # multi-process or end-to-end: `make test-fast` leaves it out
def test_detect_end_to_end_writes_every_output(checkpoint, photos, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for p in photos.glob("*.jpg"):
        (tmp_path / "in" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a photo")
    out = tmp_path / "det"
    assert (
        cli(
            [
                "detect",
                "--checkpoint",
                str(checkpoint),
                str(tmp_path / "in"),
                "--annotations",
                str(photos),
                "--format",
                "coco",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--score-threshold",
                "0",
            ]
        )
        == 0
    )
    for name in (
        "detections.json",
        "images.json",
        "report.txt",
        "summary.json",
        "overview.jpg",
        "pr_curve.png",
        "images/easy_a.jpg",
        "images/easy_b.jpg",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["detected"] == 2 and summary["photos"] == 3
    assert summary["proposal_recall"] == 1.0 and 0 <= summary["ap50_voc"] <= 1
    reasons = {Path(p["path"]).name: p["reason"] for p in summary["problems"]}
    assert "unreadable photo" in reasons["broken.jpg"]
    assert reasons["gone.jpg"].startswith("missing image named in")
    detections = json.loads((out / "detections.json").read_text())
    assert detections and all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in detections)
    # The annotation file's ids (easy_a is 0, easy_b 1); the unreadable photo has none and is not in images.json.
    images = {Path(im["file_name"]).name: im["id"] for im in json.loads((out / "images.json").read_text())}
    assert images == {"easy_a.jpg": 0, "easy_b.jpg": 1} and {d["image_id"] for d in detections} == {0, 1}
    assert len(detections) == sum(1 for _ in detections) <= 2 * 100  # every kept box, not only those above 0
    report = (out / "report.txt").read_text()
    assert "detection AP@0.5" in report and "proposal recall 1.000" in report
    for timing in ("proposals", "warping", "scoring", "nms"):
        assert timing in summary["seconds_per_photo"]
    assert set(summary["baselines"]) == {"area", "whole_photo", "random"}
    for figures in summary["baselines"].values():
        assert set(figures) == {"ap50_voc", "ap_coco", "ap50_coco"} and 0 <= figures["ap50_voc"] <= 1
    assert "baselines without the network" in report and "box area" in report


@pytest.mark.slow
def test_a_run_trained_on_packed_crops_detects_with_r_cnn_s_or_given_proposals(checkpoint, photos, tmp_path, capsys):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt.pop("proposals", None)
    shards = tmp_path / "packed"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "splits": {}}))
    ckpt["config"]["shards"] = str(shards)
    torch.save(ckpt, tmp_path / "best.pt")
    out = run_detect(
        DetectSettings(
            checkpoint=str(tmp_path / "best.pt"), photos=(str(photos),), out=str(tmp_path / "o"), device="cpu"
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["proposals"]["mode"], summary["proposals"]["max_proposals"], summary["proposals"]["context"]) == (
        "fast",
        2000,
        16,
    )
    assert summary["proposals_from"].startswith("R-CNN's (selective search fast, 2000 proposals, 16 px context)")
    args = ["detect", "--checkpoint", str(tmp_path / "best.pt"), str(photos), "--out", str(tmp_path / "p")]
    assert cli([*args, "--max-proposals", "5", "--context", "0"]) == 0
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["per_photo"][0]["proposals"] <= 5 and summary["proposals"]["context"] == 0
    assert "the command line (--max-proposals 5, --context 0)" in (tmp_path / "p" / "report.txt").read_text()
    # A run on tools/propose.py shards makes its crops as they were made: the options are refused.
    own = ["detect", "--checkpoint", str(checkpoint), str(photos), "--out", str(tmp_path / "q"), "--mode", "quality"]
    assert cli(own) == 2
    assert "detection makes its crops the same way: drop --mode" in capsys.readouterr().err


def test_settings_come_from_the_checkpoint_and_svms_of_other_runs_are_refused(checkpoint, photos, tmp_path, capsys):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["proposals"] = dataclasses.replace(SETTINGS, max_proposals=7).as_dict()  # saved at training time
    ckpt["config"]["shards"] = str(tmp_path / "moved-away")  # the shards are gone
    torch.save(ckpt, tmp_path / "best.pt")
    out = run_detect(
        DetectSettings(
            checkpoint=str(tmp_path / "best.pt"),
            photos=(str(photos / "easy_a.jpg"),),
            out=str(tmp_path / "o"),
            device="cpu",
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["proposals"]["max_proposals"] == 7 and summary["per_photo"][0]["proposals"] <= 7
    dim = last_linear(build_model(ARCH, "none", "linear").backbone)[2].in_features
    np.savez(
        tmp_path / "svm.npz",
        mean=np.zeros(dim),
        scale=np.ones(dim),
        coef=np.ones(dim),
        intercept=np.zeros(1),
        threshold=np.float64(0),
        checkpoint_sha256=np.array("0" * 64),
    )
    with pytest.raises(ConfigError, match="another checkpoint's features"):
        run_detect(
            DetectSettings(
                checkpoint=str(tmp_path / "best.pt"),
                photos=(str(photos),),
                out=str(tmp_path / "o2"),
                svm=str(tmp_path / "svm.npz"),
                device="cpu",
            )
        )


def test_the_model_normalizes_uint8_input_itself():
    from crackio.loading.augment import normalize

    torch.manual_seed(0)
    model = build_model(ARCH, "none", "linear").eval()
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(model(images), model(normalize(images)))


@pytest.mark.cuda
@needs_cuda
def test_scoring_on_the_gpu_agrees_with_the_cpu(checkpoint, photos):
    """Crops decoded by nvJPEG and scored on the GPU (TF32/cuDNN) against libjpeg-turbo and the CPU: within 0.05."""
    from crackio.writing.regions import encode_jpeg, warp

    rgb = load_photo(photos / "easy_a.jpg")
    boxes = np.array([[10, 10, 80, 70], [140, 70, 200, 120.0], [0, 0, 100, 100]])
    jpegs = [encode_jpeg(warp(rgb, b, 16, 224, rgb.reshape(-1, 3).mean(0)), 95) for b in boxes]
    scores = {}
    for device in ("cpu", "cuda"):
        model = build_model(ARCH, "none", "linear")
        model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
        scores[device] = Scorer(model.eval().to(device), torch.device(device), 8, None)(jpegs)
    np.testing.assert_allclose(scores["cuda"], scores["cpu"], atol=0.05)


def test_baselines_are_their_definitions_on_hand_made_boxes():
    """Photo 1 (100 x 100, a crack at 10..30): proposals the whole photo, the crack, a small square. Photo 2
    (200 x 100, a crack at x 150..190): a corner box and the crack's box."""
    from train.detection.baselines import baseline, baseline_aps
    from train.detection.detect import PhotoDetections
    from train.detection.report import verdict

    whole, crack, small = [0.0, 0, 100, 100], [10.0, 10, 30, 30], [50.0, 50, 60, 60]
    one = PhotoDetections(Path("a.jpg"), "a", (100, 100), proposals=np.array([small, whole, crack]),
                          gt=np.array([crack]))  # fmt: skip
    two = PhotoDetections(Path("b.jpg"), "b", (200, 100), proposals=np.array([[0.0, 0, 40, 40], [150.0, 0, 190, 90]]),
                          gt=np.array([[150.0, 0, 190, 90]]))  # fmt: skip
    by_area = baseline([one, two], "area", Nms(), seed=0)
    assert by_area[0].boxes.tolist() == [whole, crack, small] and by_area[0].scores.tolist() == [10000, 400, 100]
    assert by_area[1].scores.tolist() == [3600, 1600]
    photo = baseline([one, two], "whole_photo", Nms(), seed=0)
    assert photo[1].boxes.tolist() == [[0, 0, 200, 100]] and photo[1].scores.tolist() == [1.0]
    random = baseline([one, two], "random", Nms(), seed=7)
    expected = np.random.default_rng([7, 1]).random(2)
    assert sorted(random[1].scores.tolist()) == sorted(expected.tolist())
    assert baseline([one, two], "random", Nms(), seed=7)[0].scores.tolist() == random[0].scores.tolist()  # seeded
    aps = baseline_aps([one, two], Nms(), seed=0)
    # By area over both photos: whole (FP), photo 2's crack box (TP), its corner box (FP), the crack (TP), the small
    # square (FP): precision 1/2 at recall 1/2, 2/4 at recall 1; the envelope is 1/2 at both steps.
    assert aps["area"]["ap50_voc"] == pytest.approx(0.5)
    assert aps["whole_photo"]["ap50_voc"] == 0.0  # neither whole-photo box overlaps a crack at IoU 0.5
    assert "BELOW box area (0.500)" in verdict(0.2, aps) and "above every baseline" in verdict(0.9, aps)


def checkpoint_on(shards: Path, path: Path) -> Path:
    """An untrained tiny classifier whose run trained on `shards` (a tools/propose.py pack)."""
    return save_untrained(path, shards, epoch=1)


@pytest.fixture(scope="module")
def ratio_pack(demo_photos, tmp_path_factory):
    """A COCO dataset without split folders, proposed with --split-ratios: its test photos live only in the
    manifest."""
    from crackio.writing.proposal_stage import ProposeSettings, propose_to_shards

    root = tmp_path_factory.mktemp("ratio")
    flat = root / "flat"
    flat.mkdir()
    coco = {"images": [], "annotations": [], "categories": []}
    for split_json in sorted((demo_photos / "coco").glob("*/_annotations.coco.json")):
        doc = json.loads(split_json.read_text())
        offset = len(coco["images"]) * 100  # unique ids across the merged files
        coco["categories"] = doc["categories"]
        for im in doc["images"]:
            (flat / im["file_name"]).write_bytes((split_json.parent / im["file_name"]).read_bytes())
            coco["images"].append({**im, "id": im["id"] + offset})
        coco["annotations"] += [
            {**a, "id": a["id"] + offset, "image_id": a["image_id"] + offset} for a in doc["annotations"]
        ]
    (flat / "_annotations.coco.json").write_text(json.dumps(coco))
    shards = root / "shards"
    settings = ProposalSettings(max_proposals=30)
    propose_to_shards(flat, "coco", shards, settings, ProposeSettings(split_ratios=(0.5, 0.2, 0.3)), progress=False)
    return flat, shards, checkpoint_on(shards, root / "best.pt")


@pytest.mark.slow
def test_split_test_detects_exactly_the_held_out_photos_of_a_ratio_split(ratio_pack, tmp_path, capsys):
    flat, shards, ckpt = ratio_pack
    manifest = json.loads((shards / "manifest.json").read_text())
    recorded = manifest["photos"]["splits"]
    assert sorted(sum(recorded.values(), [])) == sorted(p.name for p in flat.glob("*.jpg"))  # each photo once
    assert len(recorded["test"]) == manifest["splits"]["test"]["photos"] > 0
    out = run_detect(
        DetectSettings(checkpoint=str(ckpt), photos=(), out=str(tmp_path / "d"), split="test", device="cpu")
    )
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(row["photo"] + ".jpg" for row in summary["per_photo"]) == sorted(recorded["test"])
    assert "ap50_voc" in summary and summary["ground_truth_boxes"] > 0  # with the recorded annotations
    # Explicit photos: those the run trained or validated on are listed, and refused with --strict.
    train_photo = str(flat / recorded["train"][0])
    out = run_detect(DetectSettings(checkpoint=str(ckpt), photos=(train_photo,), out=str(tmp_path / "e"), device="cpu"))
    problems = json.loads((out / "summary.json").read_text())["problems"]
    assert any("in the train split of the run's pack" in p["reason"] for p in problems)
    assert "warning: 1 of the photos were in the run's training or validation split" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--strict: 1 of the photos were in the run's training"):
        run_detect(
            DetectSettings(
                checkpoint=str(ckpt), photos=(train_photo,), out=str(tmp_path / "f"), device="cpu", strict=True
            )
        )
    test_photo = str(flat / recorded["test"][0])
    out = run_detect(
        DetectSettings(checkpoint=str(ckpt), photos=(test_photo,), out=str(tmp_path / "g"), device="cpu", strict=True)
    )  # held out: fine
    for args, message in (
        (["--split", "test", test_photo], "give no photos, --annotations or --format with it"),
        ([], "give photos (files or folders), or --split SPLIT"),
        (["--split", "tst"], "--split 'tst' is not in"),
    ):
        assert cli(["detect", "--checkpoint", str(ckpt), "--out", str(tmp_path / "h"), *args]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_pycocotools_on_detections_json_gives_the_reported_coco_ap(ratio_pack, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    flat, shards, ckpt = ratio_pack
    out = run_detect(
        DetectSettings(
            checkpoint=str(ckpt),
            photos=(str(flat),),
            out=str(tmp_path / "d"),
            annotations=str(flat),
            format="coco",
            device="cpu",
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    detections = json.loads((out / "detections.json").read_text())
    assert max(sum(1 for d in detections if d["image_id"] == i) for i in {d["image_id"] for d in detections}) <= 100
    truth = COCO(str(flat / "_annotations.coco.json"))
    evaluation = COCOeval(truth, truth.loadRes(str(out / "detections.json")), "bbox")
    evaluation.params.imgIds = [im["id"] for im in json.loads((out / "images.json").read_text())]
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(summary["ap_coco"]) and evaluation.stats[1] == pytest.approx(
        summary["ap50_coco"]
    )


@pytest.mark.slow
def test_split_of_a_mask_pack_and_split_train_is_flagged(demo_photos, tmp_path, capsys):
    """--split on a --format mask pack reads the masks back (no --classes for masks); --split train lists every
    photo as not held out, and --strict refuses it."""
    from crackio.writing.proposal_stage import ProposeSettings, propose_to_shards

    shards = tmp_path / "shards"
    propose_to_shards(demo_photos / "mask", "mask", shards, ProposalSettings(max_proposals=20),
                      ProposeSettings(), progress=False)  # fmt: skip
    ckpt = checkpoint_on(shards, tmp_path / "best.pt")
    out = run_detect(
        DetectSettings(checkpoint=str(ckpt), photos=(), out=str(tmp_path / "d"), split="test", device="cpu")
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ground_truth_boxes"] > 0 and "baselines" in summary
    out = run_detect(
        DetectSettings(checkpoint=str(ckpt), photos=(), out=str(tmp_path / "e"), split="train", device="cpu")
    )
    problems = json.loads((out / "summary.json").read_text())["problems"]
    assert sum("in the train split of the run's pack" in p["reason"] for p in problems) == len(
        json.loads((shards / "manifest.json").read_text())["photos"]["splits"]["train"]
    )
    with pytest.raises(ConfigError, match="--strict"):
        run_detect(
            DetectSettings(
                checkpoint=str(ckpt), photos=(), out=str(tmp_path / "f"), split="train", device="cpu", strict=True
            )
        )


def test_a_proposal_stage_that_finds_no_crack_warns(demo_photos, tmp_path):
    from crackio.writing.pack import warnings
    from crackio.writing.proposal_stage import ProposeSettings, propose_to_shards

    settings, run = ProposalSettings(max_proposals=10), ProposeSettings(mask_crack_label=7)
    manifest = propose_to_shards(demo_photos / "mask", "mask", tmp_path / "s", settings, run, progress=False)
    (line,) = [w for w in warnings(manifest) if w.startswith("no photo has a crack box")]
    assert "mask label 7" in line and "--mask-crack-label" in line


def test_score_labels_overlap_no_other_label_and_no_box_outline(tmp_path):
    from train.detection.detect import PhotoDetections
    from train.detection.pictures import DETECTION, draw, pen_sizes, score_labels

    Image.fromarray(np.full((600, 900, 3), 170, np.uint8)).save(tmp_path / "grey.jpg")
    # Nested and crossing boxes, one in the photo's corner and one on its edges: the first label's default place
    # (the box's top left) is inside or on another box each time.
    boxes = np.array(
        [[100, 100, 400, 300], [110, 95, 390, 310], [120, 120, 300, 280], [0, 0, 250, 200], [380, 90, 600, 400],
         [590, 380, 899, 599], [600, 400, 880, 590], [200, 150, 500, 350]], float)  # fmt: skip
    r = PhotoDetections(tmp_path / "grey.jpg", "grey", (900, 600), boxes, np.linspace(0.83, 0.51, len(boxes)))
    r.gt = np.array([[105, 105, 395, 305.0]])
    labels = score_labels(r, 0.5)
    assert [t for t, _, _ in labels] == [f"{s:.2f}" for s in r.scores]
    rects = [rect for _, rect, _ in labels]
    for i, a in enumerate(rects):
        assert 0 <= a[0] < a[2] <= 900 and 0 <= a[1] < a[3] <= 600  # in the photo
        for b in rects[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    # Every outline drawn, rasterised as Pillow draws it: no pixel of it under a label.
    outlines = Image.new("L", (900, 600))
    pen = ImageDraw.Draw(outlines)
    width = pen_sizes(r.size)[0]
    for b in [*boxes, *r.gt]:
        pen.rectangle([float(v) for v in b], outline=255, width=width)
    mask = np.asarray(outlines) > 0
    for x0, y0, x1, y1 in rects:
        assert not mask[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))].any(), (x0, y0, x1, y1)
    picture = np.asarray(draw(r, 0.5))
    for x0, y0, *_ in rects:  # the label's opaque background, over every box
        assert tuple(picture[int(y0) + 1, int(x0) + 1]) == DETECTION


def test_a_crowded_photo_leaves_out_labels_rather_than_stack_them(tmp_path):
    """100 overlapping boxes (detect --nms-iou 0.7 on a busy photo): no label covers another; every box stays."""
    from train.detection.detect import PhotoDetections
    from train.detection.pictures import score_labels

    rng = np.random.default_rng(0)
    x0, y0 = rng.uniform(0, 500, 100), rng.uniform(0, 300, 100)
    boxes = np.stack([x0, y0, x0 + rng.uniform(40, 300, 100), y0 + rng.uniform(40, 200, 100)], 1).clip(0, 599)
    Image.fromarray(np.full((600, 600, 3), 170, np.uint8)).save(tmp_path / "busy.jpg")
    r = PhotoDetections(tmp_path / "busy.jpg", "busy", (600, 600), boxes, np.linspace(0.99, 0.5, 100))
    labels = score_labels(r, 0.5)
    assert 0 < len(labels) < 100  # some had no free place
    rects = [rect for _, rect, _ in labels]
    for i, a in enumerate(rects):
        for b in rects[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    assert labels[0][0] == "0.99"  # the best box keeps its label


@pytest.mark.slow
def test_detect_lists_the_problems_of_the_photos_it_ran_on_only(demo_photos, tmp_path):
    """A photo of the train split whose file is gone is a problem of the pack's annotations, not of `--split test`'s
    run on other photos."""
    import shutil

    from crackio.writing.proposal_stage import ProposeSettings, propose_to_shards

    src = tmp_path / "coco"
    shutil.copytree(demo_photos / "coco", src)
    doc = json.loads((src / "train" / "_annotations.coco.json").read_text())
    gone = doc["images"][0]["file_name"]
    (src / "train" / gone).unlink()
    shards = tmp_path / "shards"
    propose_to_shards(src, "coco", shards, ProposalSettings(max_proposals=30), ProposeSettings(), progress=False)
    ckpt = checkpoint_on(shards, tmp_path / "best.pt")
    out = run_detect(DetectSettings(checkpoint=str(ckpt), split="test", out=str(tmp_path / "d"), device="cpu"))
    summary = json.loads((out / "summary.json").read_text())
    ran = {row["photo"] for row in summary["per_photo"]}
    assert ran and all(Path(p["path"]).stem in ran for p in summary["problems"]), summary["problems"]
    # Photos given by hand with their folder's annotations: a photo those name and the folder lacks is listed (the
    # user may have meant to give it), as are the photos seen in training; nothing else.
    photos = tuple(str(p) for p in sorted((src / "train").glob("*.jpg")))
    train = DetectSettings(
        checkpoint=str(ckpt), photos=photos, annotations=str(src / "train"), format="coco", out=str(tmp_path / "e"),
        device="cpu",
    )  # fmt: skip
    problems = json.loads((run_detect(train) / "summary.json").read_text())["problems"]
    assert any(Path(gone).stem in p["path"] and "missing image" in p["reason"] for p in problems)
    assert len(problems) == len(photos) + 1  # each photo given was seen in training, and the missing one
