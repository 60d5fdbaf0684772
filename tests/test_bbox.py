"""`python -m train bbox`: R-CNN's bounding-box regression (appendix C), and detect with and without it."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from tests.conftest import ROOT
from train.detection.bbox import Regressor, apply, box_iou_pairs, fit, targets
from train.evaluation.report import proposal_ap, proposal_ap_line, sampled_negatives


def test_targets_are_r_cnns_and_apply_inverts_them():
    proposals = np.array([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 100.0, 10.0]])
    gt = np.array([[14.0, 18.0, 58.0, 62.0], [5.0, 1.0, 85.0, 13.0]])
    t = targets(proposals, gt)
    # proposal 0: centre (30, 40), 40 x 40; ground truth: centre (36, 40), 44 x 44
    assert np.allclose(t[0], [6 / 40, 0 / 40, np.log(44 / 40), np.log(44 / 40)])
    assert np.allclose(apply(proposals, t), gt)
    assert np.allclose(apply(proposals, np.zeros((2, 4))), proposals)
    assert np.allclose(box_iou_pairs(gt, gt), 1.0)


def test_ridge_regression_recovers_a_linear_relation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8))
    w = rng.normal(size=(8, 4)) * 0.05
    t = x @ w + 0.01
    reg = fit(x, t, alpha=1e-3)
    assert np.allclose(reg.deltas(x), t, atol=1e-3)


@pytest.mark.slow  # a subprocess on the session's run: `make test-fast` leaves it out
def test_a_pack_without_boxes_is_refused_in_one_line(tiny_run, tmp_path):
    cmd = [sys.executable, "-m", "train", "bbox", "--checkpoint", str(tiny_run / "best.pt")]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "b")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("needs a pack made by tools/propose.py")


@pytest.mark.slow
def test_bbox_fits_and_detect_reports_ap_with_and_without_it(proposal_run, tmp_path):
    from tests.conftest import copy_run

    run = copy_run(proposal_run, tmp_path / "run")
    python = [sys.executable, "-m", "train"]
    detect = ["detect", "--checkpoint", str(run / "best.pt"), "--split", "test", "--threads", "1"]
    steps = [
        ["bbox", "--checkpoint", str(run / "best.pt"), "--device", "cpu", "--alphas", "10,1000"],
        [*detect, "--out", str(tmp_path / "with")],
        [*detect, "--no-bbox-reg", "--out", str(tmp_path / "without")],
    ]
    for args in steps:
        done = subprocess.run([*python, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "bbox" / "summary.json").read_text())
    assert summary["lambda"] in (10.0, 1000.0) and summary["splits"]["train"]["proposals"] > 0
    with_reg = json.loads((tmp_path / "with" / "summary.json").read_text())
    without = json.loads((tmp_path / "without" / "summary.json").read_text())
    assert "without_bbox_regression" not in without
    assert with_reg["without_bbox_regression"]["ap50_voc"] == pytest.approx(without["ap50_voc"])
    assert "with bounding-box regression (without:" in (tmp_path / "with" / "report.txt").read_text()
    moved = json.loads((tmp_path / "with" / "detections.json").read_text())
    plain = json.loads((tmp_path / "without" / "detections.json").read_text())
    assert moved and [d["bbox"] for d in moved] != [d["bbox"] for d in plain]
    sizes = {i["id"]: (i["width"], i["height"]) for i in json.loads((tmp_path / "with" / "images.json").read_text())}
    for d in moved:  # regressed boxes stay in their photo, as R-CNN clips them
        x, y, w, h = d["bbox"]
        assert x >= 0 and y >= 0 and x + w <= sizes[d["image_id"]][0] + 1e-6 and y + h <= sizes[d["image_id"]][1] + 1e-6
    # The suite's validation crops are detection's, with few proposals near a crack: lambda by cross-validation.
    report = (run / "bbox" / "report.txt").read_text()
    assert "lambda chosen by the mean IoU after, on " in report and "nan" not in report


def test_regressed_boxes_are_clipped_to_their_photo():
    reg = Regressor(np.zeros(2), np.ones(2), np.zeros((4, 2)), np.array([0.0, 0.0, 1.0, 1.0]))  # every box e times
    boxes = np.array([[10.0, 10, 50, 30], [0, 0, 100, 100]])
    moved = reg.move(boxes, np.zeros((2, 2)), np.array([[60, 40], [120, 90]]))  # each row's photo: width, height
    wide = apply(boxes, np.tile([0.0, 0.0, 1.0, 1.0], (2, 1)))
    assert moved.tolist() == [[0, 0, 60, 40], [0, 0, 120, 90]] and (wide[:, :2] < 0).all()
    one = reg.move(boxes, np.zeros((2, 2)), np.array([60, 40]))  # one photo's size for every row
    assert one.tolist() == [[0, 0, 60, 40], [0, 0, 60, 40]]


@pytest.mark.slow  # the session's proposal run: `make test-fast` leaves it out
def test_the_report_gives_the_proposal_level_ap_beside_the_crop_ap(proposal_run):
    report = (proposal_run / "report.txt").read_text()
    summary = json.loads((proposal_run / "summary.json").read_text())
    # The proposal stage's validation and test crops are detection's: the crop AP is the proposal-level AP.
    assert "every crop is a proposal as detection scores them" in report
    valid = summary["splits"]["valid"]
    assert valid["proposal_ap"] == valid["average_precision"] or math.isnan(valid["average_precision"])


def test_the_proposal_level_ap_leaves_out_the_ground_truth_added_for_training():
    labels = np.array([1, 1, 0, 0, 1, 0])
    probs = np.array([0.9, 0.2, 0.8, 0.1, 0.95, 0.3])
    added = np.array([False, False, False, False, True, False])  # a ground-truth box, scored highest
    assert proposal_ap(labels, probs, added) == average_precision_score([1, 1, 0, 0, 0], [0.9, 0.2, 0.8, 0.1, 0.3])
    line = proposal_ap_line(labels, probs, added)
    assert "proposal-level AP 0.750 over the 5 proposals, without the 1 ground-truth boxes and jittered" in line
    assert proposal_ap(labels, probs, None) is None and proposal_ap_line(labels, probs, None) == ""
    sampled = proposal_ap_line(labels, probs, added, sampled=10)  # --eval-like-detection false --negatives-per-image
    assert "its negatives were sampled to 10 per photo" in sampled
    assert "as detection scores them" not in proposal_ap_line(labels, probs, np.zeros(6, bool), sampled=10)
    manifests = [{"proposals": {"eval_like_detection": False, "negatives_per_image": 10}}]
    assert sampled_negatives(manifests) == 10 and sampled_negatives([{"proposals": {"eval_like_detection": True}}]) == 0


@pytest.mark.slow  # the session's proposal run
def test_eval_gives_the_proposal_level_ap_too(proposal_run):
    from train.run.evaluate import run_eval
    from train.settings.commands import EvalSettings

    text = run_eval(EvalSettings(checkpoint=str(proposal_run / "best.pt"), split="test", device="cpu"))
    assert "every crop is a proposal as detection scores them" in text


@pytest.mark.slow  # trains a run
def test_a_validation_cut_gets_no_proposal_level_line(proposal_run, tmp_path):
    from train.run.main import main
    from train.settings.run import RunSettings

    flat = {"shards": str(proposal_run.parent / "pack"), "out": str(tmp_path / "run"), "weights": "none"}
    flat |= {"arch": "timm/test_efficientnet", "head": "linear", "epochs": 1, "limit_batches": 2, "device": "cpu"}
    main(RunSettings.from_flat({**flat, "val_sampler": "hard-negatives", "val_negatives": 5}))
    report = (tmp_path / "run" / "report.txt").read_text()
    valid, test = report.split("== test")[0], report.split("== test")[1]
    assert "proposal" not in valid  # every positive + 5 negatives: not detection's distribution
    assert "every crop is a proposal as detection scores them" in test  # the test split, scored whole
