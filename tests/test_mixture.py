"""Several packs in one loader and one run (crackio.loading.mixture): exact shares per epoch, every sampler within
each pack, the same global batches at every world size, states that resume elsewhere, per-pack validation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from crackio import ConfigError, make_loader
from crackio.format.index import load_index
from crackio.loading.mixture import largest_remainder, pack_names
from tests.helpers import tiny
from tests.test_resume import SAMPLERS, steps

GLOBAL = 8


def mixed(packs, world=1, rank=0, mix=(0.3, 0.7), sampler="shuffle", options=None, order="random", seed=5, **kw):
    kw.setdefault("backend", "torch")
    return make_loader(
        [str(p) for p in packs],
        "train",
        batch_size=GLOBAL // world,
        train=True,
        sampler=sampler,
        seed=seed,
        device="cpu",
        rank=rank,
        world_size=world,
        workers=1,
        output="uint8",
        order=order,
        mix=None if mix is None else list(mix),
        **({"block_size": 6, "window": 2} if order == "block" else {}),
        **(options or {}),
        **kw,
    )


def test_largest_remainder_splits_exactly():
    assert largest_remainder([0.3, 0.7], 240) == [72, 168]
    assert largest_remainder([1, 1, 1], 10) == [4, 3, 3]  # a tie: the first pack first
    assert largest_remainder([3, 7], 1) == [0, 1]
    for weights, total in (([0.2, 0.5, 0.3], 101), ([1e-9, 1], 7), ([5, 0, 5], 9)):
        counts = largest_remainder(weights, total)
        assert sum(counts) == total
        assert all(abs(c - total * w / sum(weights)) < 1 for c, w in zip(counts, weights))


def test_pack_names_are_short_and_distinct():
    assert pack_names(["/data/site_a", "s3://bucket/public/"]) == ["site_a", "public"]
    assert pack_names(["a/shards", "b/shards"]) == ["a/shards", "b/shards"]
    assert pack_names(["x/a/shards", "y/a/shards"]) == ["a/shards#1", "a/shards#2"]


@pytest.mark.parametrize("sampler, options", SAMPLERS, ids=lambda x: str(x) if isinstance(x, str) else "")
def test_each_pack_gives_exactly_its_share_under_every_sampler(demo_shards, coded_shards, sampler, options):
    packs = [demo_shards, coded_shards]
    loader = mixed(packs, sampler=sampler, options=options)
    alone = [
        make_loader(str(p), "train", batch_size=1, train=True, sampler=sampler, seed=5, device="cpu", **options)
        for p in packs
    ]
    own = [len(np.concatenate(a.batches(0))) for a in alone]  # each pack's own epoch under the sampler
    size = options.get("num_samples") or sum(own)
    size -= size % GLOBAL  # whole global batches: what an epoch trains on is what the shares count
    expect = largest_remainder([0.3, 0.7], size)
    sequence = loader.traversal.sequence(loader._draws(0), len(loader.labels), 5, 0)
    assert np.bincount(loader.pack_of(sequence), minlength=2).tolist() == expect
    assert [s.share for s in loader.shares(0)] == expect and [s.epoch for s in loader.shares(0)] == own
    assert len(sequence) == size and loader.drawn(0) == expect  # nothing of a share is dropped
    # The sampler acted within each pack: every row drawn is in that pack's selection.
    for p, (_, selection) in enumerate(loader._selections):
        rows = sequence[loader.pack_of(sequence) == p] - loader.offsets[p]
        assert np.isin(rows, selection).all()
    # A pack with less than its share repeats its epoch in fresh orders: no row drawn twice more than the rest.
    short = next(p for p in range(2) if expect[p] > own[p])
    rows = sequence[loader.pack_of(sequence) == short]
    if sampler in ("shuffle", "hard-negatives", "iou-strata", "balanced"):  # each epoch draws each row once
        counts = np.bincount(rows - loader.offsets[short])
        counts = counts[counts > 0]
        assert counts.max() - counts.min() <= 1 and counts.max() == math.ceil(expect[short] / own[short])


def test_concatenated_packs_give_their_own_epochs(demo_shards, coded_shards):
    loader = mixed([demo_shards, coded_shards], mix=None)
    # 260 samples: 256 in whole global batches of 8, shared as the packs' sizes (157.5 and 98.5: a tie, the
    # first pack first).
    assert [(s.share, s.epoch) for s in loader.shares(0)] == [(158, 160), (98, 100)]
    sequence = np.concatenate(loader.batches(0))
    assert len(sequence) == 256 and loader.drawn(0) == [158, 98]
    # Shares act per epoch: the next epoch gives the same counts in another order.
    assert [s.share for s in loader.shares(1)] == [158, 98]
    assert not np.array_equal(np.concatenate(loader.batches(1)), sequence)


@pytest.mark.parametrize("order", ["random", "block"])
def test_a_mixture_s_global_batches_do_not_depend_on_the_world_size(demo_shards, coded_shards, order):
    packs = [demo_shards, coded_shards]
    one = steps([mixed(packs, order=order)])
    for world in (2, 4):
        assert steps([mixed(packs, world, r, order=order) for r in range(world)]) == one, world
    # The samples are the packs' own: names and labels as each pack's index has them.
    loader = mixed(packs, order=order)
    batch = next(iter(loader))
    rows = loader.batches(0)[0]
    names = {}
    for p, pack in enumerate(packs):
        index = load_index(pack, "train")
        mine = rows[loader.pack_of(rows) == p] - loader.offsets[p]
        names |= dict(zip(index.filenames(mine), index.rows["label"][mine].tolist()))
    assert dict(zip(batch.names, batch.labels.int().tolist())) == names


@pytest.mark.parametrize("order", ["random", "block"])
def test_a_mixture_s_state_saved_at_two_ranks_resumes_at_one_and_four(demo_shards, coded_shards, order):
    packs = [demo_shards, coded_shards]
    epochs = [steps([mixed(packs, order=order)])]
    whole = mixed(packs, order=order)
    whole.epoch = 1
    epochs.append(steps([whole]))
    pair = [mixed(packs, 2, r, order=order) for r in range(2)]
    assert steps(pair, 2) == epochs[0][:2]
    state = json.loads(json.dumps(pair[0].state_dict()))
    assert state["pack"] == [pair[0].sources[0].sha256, pair[0].sources[1].sha256] and state["mix"] == [0.3, 0.7]
    for world in (1, 4):
        resumed = [mixed(packs, world, r, order=order) for r in range(world)]
        for loader in resumed:
            loader.load_state_dict(state)
        assert steps(resumed) == epochs[0][2:], world
        assert steps(resumed) == epochs[1], world


def global_plan(packs, world, sampler, options, order, state=None):
    """Each global step's row ids (sorted: block order deals a global batch by row id) from `world` ranks' plans,
    from where `state` leaves off."""
    ranks = [mixed(packs, world, r, sampler=sampler, options=options, order=order) for r in range(world)]
    for loader in ranks:
        if state:
            loader.load_state_dict(state)
    plans = [loader.batches(loader.epoch)[loader.step :] for loader in ranks]
    return [sorted(np.concatenate(step).tolist()) for step in zip(*plans)], ranks[0]


@pytest.mark.parametrize("order", ["random", "block"])
@pytest.mark.parametrize("sampler, options", SAMPLERS, ids=lambda x: str(x) if isinstance(x, str) else "")
def test_every_sampler_s_mixture_is_the_same_at_1_2_and_4_ranks_and_resumes_there(
    demo_shards, coded_shards, sampler, options, order
):
    packs = [demo_shards, coded_shards]
    one, _ = global_plan(packs, 1, sampler, options, order)
    for world in (2, 4):
        assert global_plan(packs, world, sampler, options, order)[0] == one, world
    two = [mixed(packs, 2, r, sampler=sampler, options=options, order=order) for r in range(2)]
    for loader in two:
        batches = iter(loader)
        for _ in range(3):
            next(batches)
        batches.close()
    state = json.loads(json.dumps(two[0].state_dict()))
    for world in (1, 4):
        rest, loader = global_plan(packs, world, sampler, options, order, state)
        assert loader.step == 3 and rest == one[3:], world


def test_both_backends_read_a_mixture_alike(demo_shards, coded_shards):
    from crackio.loading.loader import dali_available

    if not dali_available():
        pytest.skip("needs NVIDIA DALI")
    packs = [demo_shards, coded_shards]
    torch_steps = steps([mixed(packs)], 4)
    dali = steps([mixed(packs, backend="dali")], 4)
    assert [[n for n, _ in s] for s in dali] == [[n for n, _ in s] for s in torch_steps]


def test_a_state_of_other_packs_or_another_mix_is_refused_in_one_line(demo_shards, coded_shards, demo_src):
    packs = [demo_shards, coded_shards]
    state = mixed(packs).state_dict()
    cases = [
        (mixed(packs, mix=(0.5, 0.5)), "the loader state is for another mix: mix [0.3, 0.7] then, [0.5, 0.5] now"),
        (mixed(packs[::-1], mix=(0.7, 0.3)), "the same packs in another order"),
        (mixed([demo_shards], mix=None), "another set of packs (2 then, 1 now"),
    ]
    for loader, message in cases:
        with pytest.raises(ConfigError, match=None) as e:
            loader.load_state_dict(state)
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="another set of packs"):
        mixed(packs).load_state_dict(mixed([demo_shards], mix=None).state_dict())


def test_a_mixture_s_arguments_are_checked_naming_the_pack(demo_shards, coded_shards, tmp_path):
    packs = [demo_shards, coded_shards]
    for mix, message in (
        ((0.3,), "mix gives 1 proportion(s) for 2 pack(s)"),
        ((0.3, -1), "finite numbers >= 0"),
        ((0, 0), "not all 0"),
        ((0.3, float("nan")), "finite numbers >= 0"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            mixed(packs, mix=mix)
    with pytest.raises(ConfigError, match="names one pack twice"):
        mixed([demo_shards, demo_shards])
    with pytest.raises(ConfigError, match="mix gives 2 proportion"):
        mixed([demo_shards], mix=(0.3, 0.7))
    with pytest.raises(ConfigError, match="non-empty list"):
        mixed([])
    with pytest.raises(
        ConfigError, match=r"pack 1 of the mixture \(.*shards\d*\): sampler 'weighted' has nothing to draw"
    ):
        mixed(packs, sampler="weighted", options={"class_weights": {0: 0, 1: 1}}, iou_threshold=0.999)
    # A pack given proportion 0 gives nothing; evaluation reads every pack's samples once, in order.
    loader = mixed(packs, mix=(0, 1))
    assert set(loader.pack_of(np.concatenate(loader.batches(0))).tolist()) == {1}
    ev = make_loader([str(p) for p in packs], "valid", batch_size=16, train=False, device="cpu", backend="torch")
    names = [n for b in ev for n in b.names]
    assert names == load_index(demo_shards, "valid").filenames(np.arange(40)) + load_index(
        coded_shards, "valid"
    ).filenames(np.arange(37))


@pytest.mark.slow
def test_a_mixed_run_reports_each_pack_and_refuses_other_packs_on_resume(demo_shards, coded_shards, tmp_path):
    from train.run.main import main
    from train.run.resume import resume_settings

    out = tmp_path / "run"
    cfg = tiny(demo_shards, out, epochs=1, limit_batches=6, batch_size=8)
    cfg = cfg.replace(
        shards=(str(demo_shards), str(coded_shards)), mix=(0.3, 0.7), val_pack=pack_names([str(coded_shards)])[0]
    )
    main(cfg)
    history = json.loads((out / "history.json").read_text())
    row = history[0] if isinstance(history, list) else history["history"][0]
    names = cfg.data.pack_names
    assert names == pack_names([str(demo_shards), str(coded_shards)])
    assert [row[f"{n}/train_samples"] for n in names] == mixed([demo_shards, coded_shards], seed=0).drawn(0, 6)
    assert sum(row[f"{n}/train_samples"] for n in names) == row["train_samples"] == 48
    for n in names:
        assert 0 <= row[f"{n}/crack_ap"] <= 1 and row[f"{n}/val_loss"] > 0
    summary = json.loads((out / "summary.json").read_text())
    # The coded pack has no test split: the test figures are the other pack's, and the report says so.
    assert set(summary["splits"]) == {"valid", "test", f"test[{names[0]}]", *(f"valid[{n}]" for n in names)}
    assert f"test: of the packs that have it; {names[1]} has none" in (out / "report.txt").read_text()
    assert summary["val_pack"] == names[1] and summary["best_val_loss"] == row[f"{names[1]}/val_loss"]
    assert summary["best_val_loss_all_packs"] == row["val_loss"]
    assert (
        f"best epoch 1 ({names[1]}'s validation loss {row[f'{names[1]}/val_loss']:.4f})"
        in (out / "report.txt").read_text()
    )
    from train.run.evaluate import run_eval
    from train.settings.commands import EvalSettings

    report = run_eval(EvalSettings(checkpoint=str(out / "best.pt"), split="valid", device="cpu", backend="torch"))
    assert "split 'valid' of 2 packs" in report and all(f"== valid[{n}] " in report for n in names)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert [p["name"] for p in ckpt["pack"]["packs"]] == names
    with pytest.raises(ConfigError, match=r"the run trained on 2 pack\(s\) \(.*\) and --shards names 1"):
        resume_settings(out, shards=(str(demo_shards),), epochs=2)
    with pytest.raises(ConfigError, match=r"cannot change --mix 0.5,0.5 \(the run has 0.3,0.7\)"):
        resume_settings(out, mix=(0.5, 0.5))
    with pytest.raises(ConfigError, match=rf"in another order: give them in the run's, {names[0]}, {names[1]}$"):
        main(resume_settings(out, shards=(str(coded_shards), str(demo_shards)), epochs=2))
    # A pack moved to another folder keeps its name: the run recorded its names when it started.
    moved = tmp_path / "moved" / "elsewhere"
    shutil.copytree(demo_shards, moved)
    main(resume_settings(out, shards=(str(moved), str(coded_shards)), epochs=2))
    second = json.loads((out / "history.json").read_text())[1]
    assert (
        all(f"{n}/val_loss" in second for n in names)
        and json.loads((out / "config.json").read_text())["pack_name"] == names
    )


@pytest.mark.slow
def test_detect_split_reads_the_split_of_every_pack_of_a_mixed_run(demo_photos, tmp_path):
    from crackio.writing.proposal_stage import ProposeSettings, propose_to_shards
    from crackio.writing.regions import ProposalSettings
    from tests.helpers import ARCH
    from tools.make_demo_data import write_photos
    from train.detection.detect import run_detect
    from train.run.model import build_model
    from train.settings.commands import DetectSettings
    from train.settings.run import RunSettings

    other = tmp_path / "other"
    write_photos(other, images=6, seed=9, size=(192, 128), formats=("yolo",))
    packs = [tmp_path / "a", tmp_path / "b"]
    settings = ProposalSettings(max_proposals=30)
    propose_to_shards(demo_photos / "coco", "coco", packs[0], settings, ProposeSettings(), progress=False)
    propose_to_shards(other / "yolo", "yolo", packs[1], settings, ProposeSettings(), progress=False)
    cfg = RunSettings.from_flat(
        {"shards": [str(p) for p in packs], "mix": [0.5, 0.5], "arch": ARCH, "weights": "none", "head": "linear"}
    )
    torch.manual_seed(0)
    ckpt = tmp_path / "best.pt"
    model = build_model(ARCH, "none", "linear")
    torch.save({"model": model.state_dict(), "config": cfg.flat(), "proposals": settings.as_dict(), "epoch": 1}, ckpt)
    out = run_detect(DetectSettings(checkpoint=str(ckpt), split="test", out=str(tmp_path / "d"), device="cpu"))
    summary = json.loads((out / "summary.json").read_text())
    recorded = [json.loads((p / "manifest.json").read_text())["photos"]["splits"]["test"] for p in packs]
    assert all(recorded) and sorted(r["photo"] for r in summary["per_photo"]) == sorted(
        Path(name).stem for names in recorded for name in names
    )
    assert summary["ground_truth_boxes"] > 0 and "ap50_voc" in summary
    # One pack of the two: --shards names it.
    out = run_detect(
        DetectSettings(
            checkpoint=str(ckpt), split="test", shards=(str(packs[1]),), out=str(tmp_path / "e"), device="cpu"
        )
    )
    assert len(json.loads((out / "summary.json").read_text())["per_photo"]) == len(recorded[1])


def test_mixture_settings_are_checked_at_the_edge(demo_shards, coded_shards, tmp_path, capsys):
    from train.__main__ import main as cli
    from train.settings.run import RunSettings

    loader = mixed([demo_shards, coded_shards], mix=(1e308, 1e308))  # would overflow a sum: scaled first
    assert [s.share for s in loader.shares(0)] == [128, 128]
    two = {"shards": ["a/site", "b/site"]}
    for values, message in (
        ({"val_pack": "site"}, "--val-pack 'site' names 2 packs: give one of a/site, b/site"),
        ({"pack_name": ["x"]}, "--pack-name gives 1 name(s) for 2 pack(s)"),
        ({"pack_name": ["x", "x"]}, "give each pack a different name"),
        ({"pack_name": ["x", "y[1]"]}, "is not a name"),
        ({"mix": "0.3,,0.7"}, "--mix must be comma-separated numbers"),
        ({"shards": ["a"], "mix": [1, 2]}, "--mix only applies with two or more --shards"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            RunSettings.from_flat(two | values, two | values)
    cfg = RunSettings.from_flat(two | {"pack_name": ["public", "site"], "val_pack": "site"})
    assert cfg.data.pack_names == ["public", "site"]
    # Packs whose split names differ: said as the packs' disagreement, not as one pack's typo.
    lone = tmp_path / "lone"
    shutil.copytree(coded_shards, lone)
    manifest = json.loads((lone / "manifest.json").read_text())
    args = ["--shards", str(demo_shards), "--shards", str(coded_shards), "--arch", "shufflenet_v2_x0_5"]
    args += ["--weights", "none", "--out", str(tmp_path / "r"), "--val-split", "test"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "--val-split 'test' is not a split of every pack" in err and "each needs a test/ split" in err
    assert f"{pack_names([str(coded_shards)])[0]}: {', '.join(manifest['splits'])}" in err
    assert not (tmp_path / "r").exists()
    # A copy is the same pack: refused by its content, for evaluation as for training.
    with pytest.raises(ConfigError, match="names one pack twice"):
        make_loader([str(coded_shards), str(lone)], "valid", batch_size=8, train=False, device="cpu")
