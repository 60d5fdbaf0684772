"""Proposal recall you can read: regions before the cap and their recall per split, and the downscaled search."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import cv2
import numpy as np
import pytest

from crackio.errors import ConfigError
from crackio.writing.annotations import read_annotations, resolve_boxes
from crackio.writing.proposal_stage import ProposeSettings, load_photo, propose_to_shards, summary
from crackio.writing.regions import ProposalSettings, box_iou, proposals_of, propose, ridges, search_regions
from tests.test_pack import shard_files
from tools.propose import main as propose_main

SIZE = (192, 128)
SEARCH = "selective-search"
CAPPED = ProposalSettings(method=SEARCH, max_proposals=20)  # under the ~100-200 regions of these photos: the cap bites


@pytest.fixture(scope="module")
def photos(demo_photos) -> Path:
    return demo_photos / "coco"  # SIZE


@pytest.fixture(scope="module")
def capped(photos, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("capped")
    return out, propose_to_shards(photos, "coco", out, CAPPED, ProposeSettings(workers=2), progress=False)


def old_selective_search(rgb, mode, max_proposals, min_size, seed) -> np.ndarray:
    """crackio's selective_search before the downscale option, verbatim: the proposals must not change."""
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(rgb[:, :, ::-1]))
    search.switchToSelectiveSearchFast() if mode == "fast" else search.switchToSelectiveSearchQuality()
    rects = np.asarray(search.process()).reshape(-1, 4)
    rects = rects[(rects[:, 2] >= min_size) & (rects[:, 3] >= min_size)]
    rects = np.unique(rects, axis=0)
    if len(rects) > max_proposals:
        keep = np.random.default_rng(seed).choice(len(rects), size=max_proposals, replace=False)
        rects = rects[np.sort(keep)]
    x, y, w, h = rects.T.astype(np.float64)
    return np.stack([x, y, x + w, y + h], 1)


def hits(gt: np.ndarray, boxes: np.ndarray) -> int:
    return int((box_iou(gt, boxes).max(axis=1) >= 0.5).sum()) if len(gt) and len(boxes) else 0


def test_manifest_gives_regions_before_the_cap_and_their_recall(photos, capped):
    _, manifest = capped
    expected: dict[str, dict[str, int]] = {}
    for p in read_annotations(photos, "coco").photos:
        rgb = load_photo(p.path)
        gt, _, _ = resolve_boxes(p, *SIZE)
        every = old_selective_search(rgb, "fast", 10**9, CAPPED.min_size, 0)  # no cap: every region
        e = expected.setdefault(p.split or "", {"regions": 0, "gt": 0, "uncapped": 0})
        e["regions"] += len(every)
        e["gt"] += len(gt)
        e["uncapped"] += hits(gt, every)
    assert set(manifest["splits"]) == set(expected)
    for split, e in expected.items():
        s = manifest["splits"][split]
        assert s["regions_before_cap"] == e["regions"] > s["photos"] * CAPPED.max_proposals  # the cap did bite
        assert s["proposal_recall_uncapped"] == round(e["uncapped"] / e["gt"], 4)
        assert s["proposal_recall"] <= s["proposal_recall_uncapped"]
    train = manifest["splits"]["train"]
    line = summary(manifest, Path("out"))
    assert (
        f"proposal recall {train['proposal_recall']:.2f} at --max-proposals {CAPPED.max_proposals} "
        f"({train['proposal_recall_uncapped']:.2f} from all {train['regions_before_cap'] / train['photos']:.0f} "
        f"regions per photo)"
    ) in line


def test_proposals_are_unchanged_when_the_photo_is_not_downscaled(photos):
    rgb = load_photo(next(photos.glob("train/*.jpg")))
    for cap in (5, 40, 10**6):
        before = old_selective_search(rgb, "fast", cap, 8, [3, 9])
        for max_side in (0, max(SIZE), 4000):  # off, or a photo no larger than --search-max-side
            settings = ProposalSettings(method=SEARCH, max_proposals=cap, search_max_side=max_side)
            now = proposals_of(rgb, settings, [3, 9])[0]
            assert now.dtype == before.dtype and now.tobytes() == before.tobytes()


def test_shards_are_byte_identical_when_the_option_does_not_downscale(photos, capped, tmp_path):
    ref, _ = capped
    neutral = ProposalSettings(method=SEARCH, max_proposals=CAPPED.max_proposals, search_max_side=max(SIZE))
    propose_to_shards(photos, "coco", tmp_path, neutral, ProposeSettings(workers=2), progress=False)
    assert shard_files(tmp_path) == shard_files(ref)


def drawn_crack(width: int = 800, height: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """A concrete-grey photo with one long dark crack, and the crack's box."""
    rng = np.random.default_rng(0)
    rgb = np.clip(150 + rng.normal(0, 4, (height, width, 1)), 0, 255).repeat(3, 2).astype(np.uint8)
    points = np.array([[460, 90], [520, 220], [560, 330], [640, 470], [700, 560]], np.int32)
    cv2.polylines(rgb, [points], False, (40, 40, 40), 9)
    return rgb, np.array([[456.0, 86.0, 704.0, 564.0]])


def test_downscaled_search_gives_boxes_in_photo_pixels_covering_the_crack():
    rgb, gt = drawn_crack()
    height, width = rgb.shape[:2]
    boxes = search_regions(rgb, "fast", 8, max_side=200)  # searched at 200 x 150
    assert len(boxes) and (boxes >= 0).all()
    assert (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()
    assert boxes[:, 2].max() > 700 and boxes[:, 3].max() > 560  # scaled back, not left at 200 x 150
    assert ((boxes[:, 2] - boxes[:, 0]) >= 8).all() and ((boxes[:, 3] - boxes[:, 1]) >= 8).all()
    assert hits(gt, boxes) == 1
    settings = ProposalSettings(method=SEARCH, max_proposals=10**6, search_max_side=200)
    found = propose(rgb, gt, settings, 0, "crack")
    assert found.recall_hits == found.uncapped_hits == 1 and found.regions == len(boxes)


@pytest.mark.parametrize("side", [0, 200])
def test_ridges_outline_a_thin_crack_as_one_window(side):
    rgb, gt = drawn_crack()
    cv2.polylines(rgb, [np.array([[80, 500], [200, 430], [330, 400]], np.int32)], False, (70, 70, 70), 2)  # 2 px
    thin = np.array([[79.0, 399.0, 332.0, 502.0]])
    lines = ridges(rgb, 8, side)
    assert hits(thin, lines) == 1 and hits(gt, lines) == 1
    assert lines.dtype == np.float64 and (lines[:, 2:] > lines[:, :2]).all()
    assert (lines[:, 2] <= rgb.shape[1]).all() and (lines[:, 3] <= rgb.shape[0]).all()
    if side:  # found at 200 x 150, boxes scaled back to the photo
        assert lines[:, 2].max() > 300


def test_the_default_method_keeps_every_ridge_and_fills_the_cap_with_selective_search():
    rgb, gt = drawn_crack()
    side = 300  # searched small: the rule is the same at any size, and the test stays fast
    lines, search = ridges(rgb, 8, side), search_regions(rgb, "fast", 8, side)
    assert ProposalSettings().method == "selective-search+ridges"
    cap = len(lines) + 10
    boxes, regions, every = proposals_of(rgb, ProposalSettings(max_proposals=cap, search_max_side=side), 0)
    assert boxes[: len(lines)].tobytes() == lines.tobytes() and len(boxes) == cap
    assert {tuple(b) for b in boxes[len(lines) :].tolist()} <= {tuple(b) for b in search.tolist()}
    union = {tuple(b) for b in np.concatenate([lines, search]).tolist()}
    assert regions == len(every) == len(union)  # a box both methods found is one region
    few = proposals_of(rgb, ProposalSettings(max_proposals=3, search_max_side=side), 0)[0]  # windows pass the cap
    assert len(few) == 3 and {tuple(b) for b in few.tolist()} <= {tuple(b) for b in lines.tolist()}
    assert proposals_of(rgb, ProposalSettings(method="ridges", search_max_side=side), 0)[1] == len(lines)


def test_settings_without_the_new_key_are_the_defaults():
    recorded = ProposalSettings().as_dict()
    del recorded["search_max_side"]  # a manifest or checkpoint written before the option
    names = {f.name for f in fields(ProposalSettings)}
    settings = ProposalSettings(**{k: v for k, v in recorded.items() if k in names})  # as detection builds them
    assert settings == ProposalSettings() and settings.search_max_side == 0
    assert ProposalSettings(search_max_side=500).as_dict()["search_max_side"] == 500


@pytest.mark.parametrize("side", [-1, 5])
def test_a_bad_max_side_is_refused(side, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--search-max-side"):
        ProposalSettings(search_max_side=side)
    with pytest.raises(SystemExit) as stop:
        propose_main([str(tmp_path), "--format", "coco", "--search-max-side", str(side)])
    assert stop.value.code == 2 and "--search-max-side must be 0" in capsys.readouterr().err


def test_a_mode_for_a_method_without_selective_search_is_refused():
    with pytest.raises(ConfigError, match="--mode quality is selective search's, and --method ridges runs none"):
        ProposalSettings(method="ridges", mode="quality")
    assert ProposalSettings(method="ridges").mode == "fast"  # the default stands for nothing, as recorded
