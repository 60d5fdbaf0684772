"""python -m train svm: features from the frozen backbone, R-CNN's SVM protocol, the cache, the report."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from tests.conftest import copy_run
from train.__main__ import main as cli
from train.svm import stage as svm


def settings(**kw) -> argparse.Namespace:
    return argparse.Namespace(
        **{"pos_iou": 0.7, "neg_iou": 0.3, "rounds": 3, "negatives": 20, "C": 1.0, "seed": 0, **kw}
    )


def test_hard_negative_mining_grows_the_cache_with_margin_violators():
    rng = np.random.default_rng(0)
    ious = np.concatenate([rng.uniform(0.7, 1, 40), rng.uniform(0, 0.3, 400), rng.uniform(0.3, 0.7, 60)])
    x = rng.normal(size=(500, 8)).astype(np.float32)
    x[:40, 0] += 3  # positives shifted along one axis
    x[40:80, 0] += 2  # some negatives look like positives: the hard ones
    log = []
    scaler, model = svm.train_svm(x, ious, settings(), log)
    assert "40 positives (IoU >= 0.7), 400 negatives (IoU < 0.3), 60 in between ignored" in log[0]
    sizes = [int(line.split("+ ")[1].split(" ")[0]) for line in log[1:]]
    assert sizes[0] == 20 and sizes == sorted(sizes) and sizes[-1] > 20  # rounds add negatives
    scores = model.decision_function(scaler.transform(x))
    assert scores[:40].mean() > scores[80:440].mean()
    with pytest.raises(ValueError, match="adjust --pos-iou"):
        svm.train_svm(x, ious, settings(pos_iou=1.0), [])


def test_feature_cache_is_keyed(tmp_path):
    calls = []
    data = {k: np.arange(3) for k in svm.FIELDS}
    compute = lambda: calls.append(1) or data
    svm.cached_features(tmp_path, "key-a", "valid", compute)
    svm.cached_features(tmp_path, "key-a", "valid", compute)
    assert len(calls) == 1
    svm.cached_features(tmp_path, "key-b", "valid", compute)  # another checkpoint or shards: recomputed
    assert len(calls) == 2


@pytest.mark.slow
def test_svm_stage_reports_beside_the_head_and_reuses_features(tiny_run, tmp_path, monkeypatch, capsys):
    run = copy_run(tiny_run, tmp_path / "run")  # the stage writes RUN/svm/
    args = ["svm", "--checkpoint", str(run / "best.pt"), "--device", "cpu", "--negatives", "30", "--C", "0.01"]
    assert cli(args) == 0
    out = run / "svm"
    for name in (
        "report.txt",
        "summary.json",
        "pr_curve.png",
        "svm_model.npz",
        "features/train.npz",
        "features/valid.npz",
        "features/test.npz",
    ):
        assert (out / name).is_file(), name
    report = (out / "report.txt").read_text()
    for title in ("valid: SVM", "valid: network head", "test: SVM", "test: network head at 0.5"):
        assert f"== {title} (threshold" in report
    assert "round 0: trained on" in report and "in between ignored" in report

    # The saved arrays are the model: scoring the cached test features with them gives the reported figures.
    summary = json.loads((out / "summary.json").read_text())
    with (
        np.load(out / "svm_model.npz", allow_pickle=False) as m,
        np.load(out / "features/test.npz", allow_pickle=False) as f,
    ):
        scores = ((f["features"] - m["mean"]) / m["scale"]) @ m["coef"] + m["intercept"][0]
        assert len(str(m["checkpoint_sha256"])) == 64  # which checkpoint's features: detection checks it
        predicted = scores >= float(m["threshold"])
        crack = f["labels"] == 1
        assert predicted[crack].mean() == pytest.approx(summary["splits"]["test"]["svm"]["crack"]["recall"])
        assert int(crack.sum()) == summary["splits"]["test"]["head"]["crack"]["support"]
        assert float(m["threshold"]) == summary["thresholds"]["svm"]

    # Second run: every split comes from the cache, the backbone never runs.
    monkeypatch.setattr(svm, "extract", lambda *a: pytest.fail("features were recomputed"))
    capsys.readouterr()
    assert cli(args) == 0
    assert capsys.readouterr().out.count("cached in") == 3
    assert cli([*args, "--pos-iou", "0.999"]) == 2
    assert "adjust --pos-iou" in capsys.readouterr().err
    assert cli([*args, "--pos-iou", "0.2"]) == 2
    assert "--neg-iou <= --pos-iou" in capsys.readouterr().err
