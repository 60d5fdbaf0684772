"""python -m train svm: features from the frozen backbone, R-CNN's SVM protocol, the cache, the report."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from tests.conftest import copy_run
from train.__main__ import main as cli
from train.run import features
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
    data = {k: np.arange(3) for k in features.FIELDS}
    compute = lambda: calls.append(1) or data
    features.cached_features(tmp_path, "key-a", "valid", compute)
    features.cached_features(tmp_path, "key-a", "valid", compute)
    assert len(calls) == 1
    features.cached_features(tmp_path, "key-b", "valid", compute)  # another checkpoint or shards: recomputed
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
    monkeypatch.setattr(features, "extract", lambda *a: pytest.fail("features were recomputed"))
    capsys.readouterr()
    assert cli(args) == 0
    assert capsys.readouterr().out.count("cached in") == 3
    assert cli([*args, "--pos-iou", "0.999"]) == 2
    assert "adjust --pos-iou" in capsys.readouterr().err
    assert cli([*args, "--pos-iou", "0.2"]) == 2
    assert "--neg-iou <= --pos-iou" in capsys.readouterr().err


@pytest.mark.slow
def test_without_a_test_split_every_report_says_what_it_was_judged_on(demo_src, tmp_path, capsys):
    """The original write-up's layout (train/ and valid/ only): the run's report, the SVM stage and eval say that
    their figures are on the split the best epoch and the thresholds were chosen on; eval's default names the
    split to give."""
    import shutil

    from crackio.writing.pack import PackSettings, pack
    from tests.helpers import tiny
    from train.run.main import main

    src = tmp_path / "src"
    for split in ("train", "valid"):
        shutil.copytree(demo_src / split, src / split)
    shards = tmp_path / "shards"
    pack(src, shards, PackSettings(samples_per_shard=50, workers=1), progress=False)
    run = tmp_path / "run"
    main(tiny(shards, run, epochs=1, target_recall=0.9, quiet=True, limit_batches=2))
    said = "no 'test' split in {}: every figure {} is on valid, the split "
    assert (
        said.format(shards, "above") + "the best epoch and the threshold were chosen on"
        in (run / "report.txt").read_text()
    )
    assert json.loads((run / "summary.json").read_text())["held_out_split"] is None
    args = ["svm", "--checkpoint", str(run / "best.pt"), "--device", "cpu", "--negatives", "30", "--C", "0.01"]
    assert cli(args) == 0
    assert said.format(shards, "below") + "both thresholds were tuned on" in (run / "svm" / "report.txt").read_text()
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(run / "best.pt"), "--device", "cpu"]) == 2
    assert "give --split valid" in capsys.readouterr().err
    assert cli(["eval", "--checkpoint", str(run / "best.pt"), "--device", "cpu", "--split", "valid"]) == 0
    assert "note: valid is the split the run chose its best epoch on" in capsys.readouterr().out
