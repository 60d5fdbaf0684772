"""Annotated layouts as users have them: YOLO labels beside the photos, BSDS .mat masks, the crack label,
thin cracks cut into pieces, and the "nothing found" error that says what it looked for and found."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from crackio.errors import ConfigError
from crackio.writing.annotations import read_annotations, resolve_boxes, survey
from crackio.writing.masks import mask_boxes
from crackio.writing.proposal_stage import ProposeSettings, propose_to_shards
from crackio.writing.regions import ProposalSettings

W, H = 48, 32
# stem -> (split, YOLO lines): class 0 is crack; one photo has no label file (a background photo).
LABELS = {
    "a": ("train", ["0 0.5 0.5 0.25 0.5", "0 0.2 0.3 0.1 0.2"]),
    "b": ("train", ["0 0.7 0.6 0.3 0.4"]),
    "c": ("valid", []),
    "d": ("valid", None),
}


def ground_truth(src: Path, fmt: str = "yolo", **options) -> dict[str, tuple]:
    """stem -> (split, boxes in pixels) as the reader and resolve_boxes give them."""
    out = {}
    for p in read_annotations(src, fmt, **options).photos:
        boxes, notes, errors = resolve_boxes(p, W, H)
        assert not notes and not errors
        out[p.stem] = (p.split, boxes.round(3).tolist())
    return out


def write_yolo(src: Path, photo_dir, label_dir) -> None:
    """Photos at photo_dir(split) / stem.jpg, labels at label_dir(split) / stem.txt."""
    for stem, (split, lines) in LABELS.items():
        photos, labels = src / photo_dir(split), src / label_dir(split)
        photos.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (W, H), (120, 120, 120)).save(photos / f"{stem}.jpg")
        if lines is not None:
            (labels / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))


def test_yolo_labels_beside_the_photos_give_the_standard_ground_truth(tmp_path):
    write_yolo(tmp_path / "standard", lambda s: f"{s}/images", lambda s: f"{s}/labels")
    expected = ground_truth(tmp_path / "standard")
    assert expected["a"][1] and expected["c"] == ("valid", []) and expected["d"] == ("valid", [])
    # Darknet / YOLOv7 export: train/*.jpg + train/*.txt side by side
    write_yolo(tmp_path / "beside", lambda s: s, lambda s: s)
    assert ground_truth(tmp_path / "beside") == expected
    # Ultralytics with nested folders: images/<split>/sub/x.jpg -> labels/<split>/sub/x.txt
    write_yolo(tmp_path / "nested", lambda s: f"images/{s}/site1", lambda s: f"labels/{s}/site1")
    assert ground_truth(tmp_path / "nested") == expected
    # A flat folder of jpg + txt: no split folders, so no split
    write_yolo(tmp_path / "flat", lambda s: "", lambda s: "")
    assert ground_truth(tmp_path / "flat") == {stem: (None, boxes) for stem, (_, boxes) in expected.items()}
    # Ultralytics' rule: labels/ first, the .txt beside only where labels/ has none
    write_yolo(tmp_path / "both", lambda s: f"images/{s}", lambda s: f"labels/{s}")
    (tmp_path / "both/images/train/a.txt").write_text("0 0.5 0.5 0.9 0.9\n")  # ignored: labels/train/a.txt exists
    (tmp_path / "both/images/valid/d.txt").write_text("0 0.5 0.5 0.5 0.5\n")  # used: no labels/valid/d.txt
    both = ground_truth(tmp_path / "both")
    assert both["a"] == expected["a"] and both["d"] == ("valid", [[12.0, 8.0, 36.0, 24.0]])


def test_yolo_class_ids_taken_as_crack_are_recorded(tmp_path):
    Image.new("RGB", (W, H)).save(tmp_path / "p.jpg")
    (tmp_path / "p.txt").write_text("3 0.5 0.5 0.2 0.2\n0 0.2 0.2 0.1 0.1\n")
    data = read_annotations(tmp_path, "yolo")
    assert data.settings == {"class_names_from": None, "class_ids_seen": [0, 3], "crack_class_ids": [0, 3]}
    assert len(data.photos[0].boxes) == 2  # no names: every class is crack, and the manifest says which
    (tmp_path / "classes.txt").write_text("crack\nspall\nrust\nhole\n")
    data = read_annotations(tmp_path, "yolo", ["crack"])
    assert data.settings == {"class_names_from": "classes.txt", "class_ids_seen": [0, 3], "crack_class_ids": [0]}
    assert len(data.photos[0].boxes) == 1


def crack_mask(pattern: int = 0) -> np.ndarray:
    """A W x H label image: 1 background, 2 crack (CrackForest's labels), two thin cracks."""
    seg = np.ones((H, W), np.uint8)
    cv2.line(seg, (3, 4 + pattern), (40, 12 + pattern), 2, 2)
    cv2.line(seg, (10, 28), (30, 22 - pattern), 2, 1)
    return seg


def test_bsds_mat_masks_give_the_png_masks_ground_truth(tmp_path):
    png, mat = tmp_path / "png", tmp_path / "crackforest"
    for folder in (png / "images", png / "masks", mat / "image", mat / "groundTruth", mat / "seg"):
        folder.mkdir(parents=True)
    for number in range(4):  # the last one has no crack: all label 1, an all-zero PNG
        stem, seg = f"{number + 1:03d}", crack_mask(number) if number < 3 else np.ones((H, W), np.uint8)
        for folder in (png / "images", mat / "image"):
            Image.new("RGB", (W, H), (150, 140, 130)).save(folder / f"{stem}.jpg")
        Image.fromarray(((seg == 2) * 255).astype(np.uint8)).save(png / "masks" / f"{stem}.png")
        boundaries = np.zeros_like(seg)
        if number < 2:  # CrackForest: groundTruth a 1x1 struct with Segmentation and Boundaries
            savemat(
                mat / "groundTruth" / f"{stem}.mat", {"groundTruth": {"Segmentation": seg, "Boundaries": boundaries}}
            )
        else:  # BSDS: a cell of structs, one per annotator (the second one sees no crack: the union counts)
            cells = np.empty((1, 2), object)
            cells[0, 0] = {"Segmentation": seg, "Boundaries": boundaries}
            cells[0, 1] = {"Segmentation": np.ones_like(seg), "Boundaries": boundaries}
            savemat(mat / "groundTruth" / f"{stem}.mat", {"groundTruth": cells})
    expected = ground_truth(png, "mask")
    assert [len(expected[s][1]) > 0 for s in sorted(expected)] == [True, True, True, False]
    assert ground_truth(mat, "mask") == expected
    assert ground_truth(mat, "mask", mask_piece=10) == ground_truth(png, "mask", mask_piece=10)
    # The proposal stage reads it alike (its workers resolve the .mat)
    settings, run = ProposalSettings(max_proposals=20), ProposeSettings(workers=1, split_ratios=(1, 0, 0))
    stats = [
        propose_to_shards(src, "mask", tmp_path / f"shards-{src.name}", settings, run, progress=False)["splits"]
        for src in (png, mat)
    ]
    assert stats[0] == stats[1]
    assert stats[0]["train"]["ground_truth_boxes"] == sum(len(boxes) for _, boxes in expected.values())


def test_mask_crack_label_picks_the_crack_pixels(tmp_path):
    for folder in ("image", "groundTruth", "p/images", "p/masks"):
        (tmp_path / folder).mkdir(parents=True)
    Image.new("RGB", (W, H)).save(tmp_path / "image/x.jpg")
    Image.new("RGB", (W, H)).save(tmp_path / "p/images/x.jpg")
    seg = np.zeros((H, W), np.uint8)
    seg[4:8, 2:30] = 1  # the crack, label 1
    seg[20:30, 30:45] = 3  # another class (say, a spall), the label maximum
    savemat(tmp_path / "groundTruth/x.mat", {"groundTruth": {"Segmentation": seg}})
    Image.fromarray(seg).save(tmp_path / "p/masks/x.png")
    assert ground_truth(tmp_path, "mask")["x"][1] == [[30.0, 20.0, 45.0, 30.0]]  # default: above half of 3
    data = read_annotations(tmp_path, "mask", mask_crack_label=1)
    assert data.settings == {"mask_crack_label": 1, "mask_piece": 0}
    assert ground_truth(tmp_path, "mask", mask_crack_label=1)["x"][1] == [[2.0, 4.0, 30.0, 8.0]]
    assert ground_truth(tmp_path / "p", "mask", mask_crack_label=1)["x"][1] == [[2.0, 4.0, 30.0, 8.0]]
    with pytest.raises(ConfigError, match="--mask-piece and --mask-crack-label apply to --format mask"):
        read_annotations(tmp_path, "yolo", mask_crack_label=1)
    with pytest.raises(ConfigError, match="--mask-piece must be 0 .* or >= 8 pixels, got 3"):
        read_annotations(tmp_path, "mask", mask_piece=3)


def test_a_crackforest_mat_with_other_labels_gives_the_crack_labels_pixels(tmp_path):
    for folder in ("image", "groundTruth"):
        (tmp_path / folder).mkdir()
    Image.new("RGB", (W, H)).save(tmp_path / "image/x.jpg")
    seg = np.ones((H, W), np.uint8)  # CrackForest: 1 background
    seg[4:8, 2:30] = 2  # the crack
    seg[20:30, 30:45] = 3  # other marks, as 5 of CrackForest's photos carry
    seg[40:44, 5:9] = 4
    savemat(tmp_path / "groundTruth/x.mat", {"groundTruth": {"Segmentation": seg, "Boundaries": seg * 0}})
    assert ground_truth(tmp_path, "mask")["x"][1] == [[2.0, 4.0, 30.0, 8.0]]  # label 2, not above half of 4
    assert ground_truth(tmp_path, "mask", mask_crack_label=3)["x"][1] == [[30.0, 20.0, 45.0, 30.0]]  # overridden


def test_bad_mat_masks_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "image").mkdir()
    (tmp_path / "groundTruth").mkdir()
    for stem in ("a", "b"):
        Image.new("RGB", (W, H)).save(tmp_path / "image" / f"{stem}.jpg")
    savemat(tmp_path / "groundTruth/a.mat", {"labels": np.zeros((H, W), np.uint8)})
    (tmp_path / "groundTruth/b.mat").write_text("not matlab")
    photos = {p.stem: p for p in read_annotations(tmp_path, "mask").photos}
    (error,) = resolve_boxes(photos["a"], W, H)[2]
    assert "a.mat" in error and "no groundTruth.Segmentation label image (it has: labels)" in error
    assert "else give a PNG mask" in error
    (error,) = resolve_boxes(photos["b"], W, H)[2]
    assert "b.mat" in error and "not a readable MATLAB file" in error
    seg = np.ones((H + 1, W), np.uint8)
    savemat(tmp_path / "groundTruth/a.mat", {"groundTruth": {"Segmentation": seg}})
    assert resolve_boxes(photos["a"], W, H)[2] == [f"mask {photos['a'].mask} is 48x33, the photo 48x32"]


def test_nothing_found_says_what_was_looked_for_and_what_is_there(tmp_path):
    (tmp_path / "annotations").mkdir()
    for name in ("a.json", "b.json", "annotations/c.json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(ConfigError) as e:
        read_annotations(tmp_path, "yolo")
    message = str(e.value)
    assert "\n" not in message and "looked for <split>/images + <split>/labels" in message
    assert "found no photo, 3 .json; top-level folders: annotations; see docs/propose.md" in message
    # YOLO photos and labels given as VOC: the photos, their .txt, the hint
    shutil.rmtree(tmp_path / "annotations")
    for stem in ("a", "b"):
        (tmp_path / f"{stem}.json").unlink()
        Image.new("RGB", (W, H)).save(tmp_path / f"{stem}.jpg")
        (tmp_path / f"{stem}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(
        ConfigError,
        match=r"found 2 photos \(2 with a .txt beside\), 2 .txt; top-level folders: none; "
        "this looks like --format yolo",
    ):
        read_annotations(tmp_path, "voc")
    # Photos without a single label file are not a YOLO set of background photos
    for stem in ("a", "b"):
        (tmp_path / f"{stem}.txt").unlink()
    with pytest.raises(ConfigError, match="as --format yolo: looked for .*; found 2 photos; top-level"):
        read_annotations(tmp_path, "yolo")
    # Masks missing: the problems come along; a huge folder is counted only so far
    (tmp_path / "images").mkdir()
    (tmp_path / "a.jpg").rename(tmp_path / "images/a.jpg")
    with pytest.raises(ConfigError, match=r"no mask a.png, a_mask.png or a.mat in .*masks \(missing\)"):
        read_annotations(tmp_path, "mask")
    assert survey(tmp_path, "coco", limit=2).endswith("(counted the first 2 entries)")


def test_thin_crack_pieces_follow_the_crack():
    mask = np.zeros((120, 320), np.uint8)
    points = np.array([[10, 20], [150, 60], [300, 100]])
    cv2.polylines(mask, [points.astype(np.int32)], False, 255, 3)
    length = np.hypot(*np.diff(points, axis=0).T).sum()  # 301 pixels
    crack = mask > 0
    (whole,) = mask_boxes(mask)
    ys, xs = np.nonzero(crack)
    assert whole.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # the default: today's one box
    for piece in (20, 40, 100):
        boxes = mask_boxes(mask, piece).astype(int)
        assert abs(len(boxes) - length / piece) <= 1, (piece, len(boxes))
        inside = np.zeros_like(crack)
        for x0, y0, x1, y1 in boxes:
            inside[y0:y1, x0:x1] = True
            own = crack[y0:y1, x0:x1]  # tight: crack pixels on each of the box's four sides
            assert own[0].any() and own[-1].any() and own[:, 0].any() and own[:, -1].any()
            assert min(x1 - x0, y1 - y0) >= 3  # the crack's width is inside
        assert inside[crack].all()  # every crack pixel is in some piece
    assert len(mask_boxes(mask, 400)) == 1  # a crack shorter than 1.5 pieces stays whole


def test_classes_on_a_yolo_set_without_names_says_how_to_name_them(tmp_path):
    import pytest

    from crackio.errors import ConfigError

    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match="names no classes .* write their names in .*classes.txt"):
        read_annotations(tmp_path, "yolo", ["3"])
