"""Inputs from the field: each kind of odd or broken input has one tested outcome, and no good crop is lost."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from crackio import ConfigError, make_loader
from crackio.format.index import load_index
from crackio.loading.augment import MEAN, STD
from crackio.writing.filenames import BadName, parse_name
from crackio.writing.images import EXIF_ORIENTATION, prepare
from crackio.writing.pack import PackSettings, pack
from crackio.writing.quality import iou_histogram, label_report
from tests import field_inputs
from tests.conftest import ROOT, needs_dali
from tests.test_pack import read_with_webdataset, shard_files

PACK = [sys.executable, str(ROOT / "tools" / "pack.py")]


@pytest.fixture(scope="module")
def field(demo_src, tmp_path_factory):
    """The demo set with one input of each field kind, packed twice (same settings) and once with 1 worker."""
    root = tmp_path_factory.mktemp("field")
    src = root / "src"
    expected = field_inputs.build(demo_src, src)
    settings = PackSettings(samples_per_shard=64, workers=2)
    manifests = [pack(src, root / name, settings, progress=False) for name in ("a", "b")]
    pack(src, root / "one", PackSettings(samples_per_shard=64, workers=1), progress=False)
    return src, root, expected, manifests[0]


def stored_names(out: Path) -> list[str]:
    return sorted(
        n
        for split in ("train", "valid", "test")
        for n in load_index(out, split).filenames(np.arange(len(load_index(out, split))))
    )


def test_every_good_crop_is_stored_exactly_once(field):
    src, root, expected, manifest = field
    good = {
        p.name
        for p in src.rglob("*.jpg")
        if "__MACOSX" not in p.parts
        and not p.name.startswith(".")
        and expected["files"].get(p.name, (0, "stored"))[1] != "skipped"
        and parse_ok(p.name)
    }
    good |= {n for n, (_, kind, _) in expected["files"].items() if kind != "skipped"}
    names = stored_names(root / "a")
    assert len(names) == len(set(names)) == len(good)
    assert set(names) == good


def parse_ok(name: str) -> bool:
    try:
        parse_name(name)
    except BadName:
        return False
    return True


def test_each_kind_is_skipped_or_converted_with_its_reason(field):
    _, root, expected, manifest = field
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    converted = manifest["splits"]["train"]["converted"]
    for name, (_, kind, text) in expected["files"].items():
        if kind == "skipped":
            assert text in skipped[name], (name, skipped.get(name))
        elif kind == "converted":
            assert name not in skipped
            assert any(text in note for note in converted), (name, converted)
    assert len(skipped) == sum(k == "skipped" for _, k, _ in expected["files"].values()) + 1  # + the non-UTF-8 name
    listed = dict(line.split("\t") for line in (root / "a" / "train" / "converted.tsv").read_text().splitlines())
    assert sorted(listed) == sorted(n for n, (_, kind, _) in expected["files"].items() if kind == "converted")
    assert all(text in listed[n] for n, (_, kind, text) in expected["files"].items() if kind == "converted")
    assert manifest["splits"]["train"]["converted_list"] == "train/converted.tsv"
    assert "at 0x" not in json.dumps(manifest)


def test_a_name_that_is_not_utf8_is_skipped_shown_escaped(field):
    _, _, _, manifest = field
    (bad,) = [s for s in manifest["skipped"] if "UTF-8" in s["reason"]]
    assert bad["path"].endswith("caf\\xe9_jpg.15.0_500.0.jpg")
    assert "rename" in bad["reason"]


def test_valid_non_ascii_utf8_names_keep_working(field):
    _, root, _, _ = field
    samples = read_with_webdataset(root / "a", "train")
    assert "beton_\u00e9_\u00fc.2.0_600.1.jpg" in samples


def test_same_input_gives_identical_shards_and_manifest(field):
    _, root, _, _ = field
    a, b = (root / "a"), (root / "b")
    assert shard_files(a) == shard_files(b)
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert shard_files(root / "one") == shard_files(a)  # the decoding threads do not change a byte


def test_os_debris_and_metadata_are_ignored_and_counted(field):
    _, _, _, manifest = field
    assert list(manifest["splits"]) == ["train", "valid", "test"]  # no __MACOSX split
    ignored = manifest["ignored"]
    assert sum(v for k, v in ignored.items() if k.startswith("hidden")) == 3  # __MACOSX, .DS_Store, ._IMG_1
    assert sum(v for k, v in ignored.items() if k.startswith("not an image")) == 3  # README, data.yaml, COCO json


def test_leakage_between_splits_is_reported(field):
    _, _, expected, manifest = field
    leak = manifest["leakage"]
    assert leak["duplicate_contents"]["count"] == 1
    assert leak["duplicate_contents"]["examples"] == [
        {"train": [expected["duplicate"]], "test": ["copied_jpg.rf.z.1.0_900.1.jpg"]}
    ]
    shared = leak["shared_stems"]
    assert shared["count"] == 1 and shared["examples"] == [{"stem": expected["stem"], "splits": ["train", "valid"]}]


@pytest.mark.slow
def test_cli_exit_codes_and_warning_lines(field, tmp_path):
    src, _, _, _ = field
    cmd = PACK + [str(src), "--out", str(tmp_path / "o"), "--quiet"]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "warning: 1 crops have the same bytes in more than one split" in ok.stdout
    assert "warning: 1 full images (stems) have proposals in more than one split" in ok.stdout
    assert "warning: train: 1 names carry a label no IoU threshold gives" in ok.stdout
    strict = subprocess.run(cmd + ["--strict"], capture_output=True, text=True)
    assert strict.returncode == 1 and "--strict" in strict.stderr


@pytest.mark.slow
def test_strict_accepts_an_export_with_metadata_files(demo_src, tmp_path):
    src = tmp_path / "export"
    shutil.copytree(demo_src, src)
    (src / "README.roboflow.txt").write_text("exported\n")
    (src / "data.yaml").write_text("nc: 1\n")
    (src / "train" / "_annotations.coco.json").write_text("{}")
    (src / "__MACOSX").mkdir()
    run = subprocess.run(
        PACK + [str(src), "--out", str(tmp_path / "o"), "--quiet", "--strict"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 ignored" in run.stdout


# --- one decoding truth: orientation, bit depth, modes, warnings ---------------------------------------------


def unnormalize(images: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return ((images.cpu() * std + mean) * 255).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def oriented(tmp_path_factory):
    src = tmp_path_factory.mktemp("oriented") / "valid"
    src.mkdir()
    for k in range(1, 9):
        (src / f"orient_{k}.{k}.0_600.1.jpg").write_bytes(field_inputs.with_orientation(field_inputs.quadrants(), k))
    out = tmp_path_factory.mktemp("oriented_shards")
    manifest = pack(src, out, PackSettings(workers=1), progress=False)
    return src, out, manifest


def eval_images(out: Path, backend: str) -> dict[str, np.ndarray]:
    loader = make_loader(out, "valid", batch_size=8, train=False, backend=backend, device="cpu")
    return {n: img for b in loader for n, img in zip(b.names, unnormalize(b.images))}


@needs_dali
def test_exif_orientation_is_applied_once_and_both_backends_agree(oriented):
    src, out, manifest = oriented
    dali, torch_ = eval_images(out, "dali"), eval_images(out, "torch")
    assert sorted(dali) == sorted(torch_) and len(dali) == 8
    for name, pixels in dali.items():
        # The same 8-bit pixels; the float normalization differs only in the last bits (~1e-5 levels).
        assert np.array_equal(np.rint(pixels), np.rint(torch_[name])), f"{name}: the backends decode differently"
        with Image.open(src / name) as img:
            upright = np.asarray(ImageOps.exif_transpose(img).convert("RGB"), dtype=np.float32)
        assert np.abs(pixels - upright).mean() < 3, name  # a wrong turn differs by ~100 levels
    converted = manifest["splits"]["valid"]["converted"]
    assert sum(n for note, n in converted.items() if "EXIF orientation" in note) == 7  # 2..8; 1 is upright
    for s in read_with_webdataset(out, "valid").values():
        with Image.open(io.BytesIO(s["jpg"])) as img:
            assert img.getexif().get(EXIF_ORIENTATION, 1) == 1
    assert (
        read_with_webdataset(out, "valid")["orient_1.1.0_600.1.jpg"]["jpg"]
        == (src / "orient_1.1.0_600.1.jpg").read_bytes()
    )  # upright: stored byte for byte


def stored_pixels(path: Path) -> np.ndarray:
    result = prepare(str(path))
    assert result.data is not None, result.note
    with Image.open(io.BytesIO(result.data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32)


@pytest.fixture()
def files(tmp_path):
    for name, (data, _, _) in field_inputs.field_files().items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_16_bit_keeps_its_dynamic_range(files):
    pixels = stored_pixels(files / "depth16.4.0_800.1.png")
    ramp = np.linspace(0, 255, 224)  # the 16-bit ramp 0..65535 scaled by 255/65535
    assert np.abs(pixels[100, :, 0] - ramp).max() < 6  # JPEG tolerance; the old white crop was 255 everywhere
    assert pixels[:, :8].mean() < 8 and pixels[:, -8:].mean() > 247


def test_integer_and_float_modes(files, tmp_path):
    assert np.abs(stored_pixels(files / "float01.5.0_200.0.tif") - 128).max() <= 2  # 0.5 * 255
    ints = tmp_path / "ints.1.0_1.0.tif"
    Image.fromarray(np.full((224, 224), 65535 // 4, np.int32)).save(ints)  # mode I
    assert np.abs(stored_pixels(ints) - 64).max() <= 2
    too_big = tmp_path / "big.1.0_1.0.tif"
    Image.fromarray(np.full((224, 224), 70000, np.int32)).save(too_big)
    assert prepare(str(too_big)).data is None and "0..65535" in prepare(str(too_big)).note
    assert "only [0, 1]" in prepare(str(files / "float_big.6.0_200.0.tif")).note


def test_transparency_is_composited_over_black(files, tmp_path):
    pal = stored_pixels(files / "palette_alpha.7.0_100.0.png")
    assert pal[:, :100].max() <= 3  # transparent (white underneath) -> black
    assert np.abs(pal[:, 124:] - [10, 200, 10]).max() <= 4  # opaque palette colour kept
    la = stored_pixels(files / "gray_alpha.8.0_100.0.png")
    assert np.abs(la - 200 * 128 / 255).max() <= 2  # grey 200 at alpha 128
    rgba = tmp_path / "rgba.1.0_1.0.png"
    Image.new("RGBA", (224, 224), (100, 150, 200, 255)).save(rgba)
    assert np.abs(stored_pixels(rgba) - [100, 150, 200]).max() <= 2


def test_jpeg_with_decoder_warnings_is_skipped_whatever_pillows_global(tmp_path, monkeypatch):
    warned = tmp_path / "w.1.0_5.1.jpg"
    warned.write_bytes(field_inputs.corrupt_jpeg())
    good = field_inputs.jpeg(field_inputs.quadrants())
    cut_png = tmp_path / "p.1.0_5.1.png"
    png = field_inputs.encoded(field_inputs.quadrants(), "PNG")
    cut_png.write_bytes(png[: len(png) // 2])
    cut_jpg = tmp_path / "c.1.0_5.1.jpg"
    cut_jpg.write_bytes(good[: len(good) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as a user's script may set it
    assert "decoder warning" in prepare(str(warned)).note and prepare(str(warned)).data is None
    assert prepare(str(cut_jpg)).data is None
    assert prepare(str(cut_png)).data is None and "truncated" in prepare(str(cut_png)).note
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is left as it was


# --- labels -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_at_035(tmp_path_factory):
    """Crops whose names were labelled IoU > 0.35, as in the original's relabeling experiment."""
    src = tmp_path_factory.mktemp("l035") / "train"
    src.mkdir()
    ious = [0.1, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.9] * 4
    for i, iou in enumerate(ious):
        img = Image.new("RGB", (224, 224), (i * 7 % 255, 80, 80))
        img.save(src / f"p{i % 3}.{i}.{str(iou).replace('.', '_')}.{int(iou > 0.35)}.jpg", quality=95)
    out = tmp_path_factory.mktemp("l035_shards")
    return out, pack(src, out, PackSettings(workers=1), progress=False)


def test_loaders_take_the_names_labels_unless_a_threshold_is_given(labelled_at_035):
    out, _ = labelled_at_035
    names = make_loader(out, "train", batch_size=64, train=False, device="cpu")
    for b in names:
        assert [int(v) for v in b.labels] == [parse_name(n).label for n in b.names]
        assert sum(b.labels) == 20  # 0.4 and above
    relabelled = make_loader(out, "train", batch_size=64, train=False, device="cpu", iou_threshold=0.5)
    assert sum(sum(b.labels) for b in relabelled) == 8  # 0.6 and 0.9 only


def test_manifest_says_which_thresholds_the_labels_follow(labelled_at_035):
    _, manifest = labelled_at_035
    labels = manifest["splits"]["train"]["labels"]
    assert labels["consistent_thresholds"] == {"min": 0.35, "below": 0.4}
    assert labels["impossible"] == {"count": 0, "names": []}


def test_label_report_names_contradicting_labels():
    ious = np.array([0.1, 0.6, 0.7, 0.2, 0.0, 1.0], np.float32)
    labels = np.array([0, 1, 1, 1, 1, 0])
    names = np.array([b"a", b"b", b"c", b"d", b"e", b"f"])
    report = label_report(ious, labels, names)
    assert report["consistent_thresholds"] is None
    assert report["impossible"] == {"count": 2, "names": ["e", "f"]}
    best = report["fewest_conflicts"]
    assert best["threshold"] == pytest.approx(0.1) and best["count"] == 2 and best["names"] == ["e", "f"]


def test_iou_histogram_bins_follow_the_label_rule():
    ious = np.array([0.0, 0.05, 0.5, 0.5, 0.500001, 1.0], np.float32)
    labels = np.array([0, 0, 0, 0, 1, 1])
    h = iou_histogram(ious, labels)
    assert h["closed"] == "right"
    assert h["0"][0] == 2 and h["0"][9] == 2  # 0.5 is a negative and counts in (0.45, 0.5]
    assert h["1"][10] == 1 and h["1"][19] == 1 and sum(h["1"]) == 2


def test_splits_are_listed_train_valid_test_then_the_rest(demo_src, tmp_path):
    src = tmp_path / "s"
    shutil.copytree(demo_src, src)
    shutil.copytree(src / "test", src / "extra")
    shutil.copytree(src / "test", src / "holdout")
    manifest = pack(src, tmp_path / "o", PackSettings(workers=1), progress=False)
    assert list(manifest["splits"]) == ["train", "valid", "test", "extra", "holdout"]
    assert list(json.loads((tmp_path / "o" / "manifest.json").read_text())["splits"]) == list(manifest["splits"])


# --- samplers with nothing to draw ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, options", [("weighted", {"class_weights": {0: 0, 1: 1}}), ("balanced", {"class_weights": {0: 0, 1: 1}})]
)
def test_weights_that_leave_nothing_to_draw_are_refused(labelled_at_035, sampler, options):
    out, _ = labelled_at_035
    with pytest.raises(ConfigError, match=r"nothing to draw.*32 no crack, 0 crack.*IoU > 0.95"):
        make_loader(
            out, "train", batch_size=4, train=True, sampler=sampler, iou_threshold=0.95, device="cpu", **options
        )


# --- scripts and notebooks without a __main__ guard ---------------------------------------------------------

UNGUARDED = """
import sys
sys.path.insert(0, {root!r})
from crackio import make_loader
from crackio.writing.pack import PackSettings, pack
manifest = pack({src!r}, {out!r}, PackSettings(workers=2), progress=False)
loader = make_loader({out!r}, "train", batch_size=16, train=True, backend="torch", device="cpu", workers=2)
seen = sum(len(b.names) for b in loader)
print("seen", seen, manifest["samples"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["script", "-c", "stdin"])
def test_pack_and_torch_loader_work_without_a_main_guard(demo_src, tmp_path, how):
    code = UNGUARDED.format(root=str(ROOT), src=str(demo_src), out=str(tmp_path / "o"))
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(code))
    argv = {"script": [str(script)], "-c": ["-c", code], "stdin": ["-"]}[how]
    run = subprocess.run(
        [sys.executable, *argv],
        input=code if how == "stdin" else None,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "seen" in run.stdout


# --- found by trying to break it (a fresh user with the README and the issue) ------------------------------


def test_a_stray_image_beside_the_split_folders_does_not_make_one_split(demo_src, tmp_path):
    src = tmp_path / "s"
    shutil.copytree(demo_src, src)
    crop = next((src / "train").glob("*.jpg"))
    shutil.copy(crop, src / "IMG_x.0.0_100.0.jpg")
    shutil.copy(crop, src / "preview.jpg")
    manifest = pack(src, tmp_path / "o", PackSettings(workers=1), progress=False)
    assert list(manifest["splits"]) == ["train", "valid", "test"]
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"IMG_x.0.0_100.0.jpg", "preview.jpg"}
    assert all("outside any split folder" in r for r in reasons.values())


def test_fifo_and_odd_files_are_skipped_without_being_opened(demo_src, tmp_path):
    src = tmp_path / "s"
    shutil.copytree(demo_src / "train", src / "train")
    os.mkfifo(src / "train" / "pipe.0.0_100.0.jpg")  # opening it for reading would block forever
    (src / "train" / "dangling.0.0_100.0.jpg").symlink_to(tmp_path / "nowhere.jpg")
    field_inputs.quadrants().save(src / "train" / "still.1.0_900.1.gif")
    frames = [field_inputs.quadrants(), field_inputs.quadrants().rotate(90)]
    frames[0].save(src / "train" / "animated.2.0_900.1.gif", save_all=True, append_images=frames[1:])
    (src / "train" / "odd.3.0_500.1.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (src / "train" / "doc.4.0_500.1.jpg").write_bytes(b"%PDF-1.7\n")
    (src / "train" / "tab\tname.5.0_500.1.png").write_bytes(field_inputs.encoded(field_inputs.quadrants(), "PNG"))
    manifest = pack(src, tmp_path / "o", PackSettings(workers=2), progress=False)
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert "not a regular file" in reasons["pipe.0.0_100.0.jpg"]
    assert "not a regular file" in reasons["dangling.0.0_100.0.jpg"]
    assert "2 frames" in reasons["animated.2.0_900.1.gif"]
    assert "extension .heic" in reasons["odd.3.0_500.1.heic"]  # a proposal name: skipped, not ignored
    assert "PDF" in reasons["doc.4.0_500.1.jpg"]
    names = load_index(tmp_path / "o", "train").filenames(np.arange(manifest["splits"]["train"]["samples"]))
    assert "still.1.0_900.1.gif" in names and "tab\tname.5.0_500.1.png" in names
    listed = (tmp_path / "o" / "train" / "converted.tsv").read_text().splitlines()
    assert any(line.startswith("tab\\tname.5.0_500.1.png\t") for line in listed)  # one line, the tab escaped


def test_manifest_is_the_same_however_src_was_typed(demo_src, tmp_path, monkeypatch):
    src = tmp_path / "s"
    shutil.copytree(demo_src, src)
    (src / "train" / "bad.1.0_5.1.jpg").write_bytes(b"")
    pack(src, tmp_path / "a", PackSettings(workers=1), progress=False)
    monkeypatch.chdir(tmp_path)
    pack(Path("s"), tmp_path / "b", PackSettings(workers=2), progress=False)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


@pytest.mark.slow
def test_empty_source_and_out_inside_a_split_are_refused(demo_src, tmp_path):
    (tmp_path / "empty").mkdir()
    run = subprocess.run(
        PACK + [str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True
    )
    assert run.returncode == 2 and "holds no image files" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()
    src = tmp_path / "s"
    shutil.copytree(demo_src, src)
    with pytest.raises(ConfigError, match="inside the split folder"):
        pack(src, src / "train" / "shards", progress=False)


@pytest.mark.slow
def test_strict_fails_on_leakage_alone(demo_src, tmp_path):
    src = tmp_path / "leak"
    shutil.copytree(demo_src, src)
    shutil.copy(next((src / "train").glob("*.jpg")), src / "test")
    run = subprocess.run(
        PACK + [str(src), "--out", str(tmp_path / "o"), "--quiet", "--strict"], capture_output=True, text=True
    )
    assert run.returncode == 1 and "0 inputs were skipped, 2 warnings" in run.stderr


@pytest.mark.parametrize("weights", [{0: float("nan"), 1: 1}, {0: float("inf"), 1: 1}, [1, 2], {0: -1, 1: 1}])
@pytest.mark.parametrize("sampler", ["weighted", "balanced"])
def test_class_weights_that_are_not_finite_weights_are_refused(labelled_at_035, sampler, weights):
    out, _ = labelled_at_035
    with pytest.raises(ConfigError, match="class_weights"):
        make_loader(out, "train", batch_size=4, train=True, sampler=sampler, class_weights=weights, device="cpu")


def test_huge_class_weights_keep_their_ratio(labelled_at_035):
    out, _ = labelled_at_035
    loader = make_loader(
        out, "train", batch_size=4, train=True, sampler="balanced", class_weights={0: 1e308, 1: 1e308}, device="cpu"
    )
    assert len(loader) > 0


@pytest.mark.parametrize("option", [{"negatives": -1}, {"bin_width": 0}, {"bin_width": float("nan")}, {"per_bin": 0}])
def test_sampler_options_out_of_range_are_refused(labelled_at_035, option):
    out, _ = labelled_at_035
    sampler = "hard-negatives" if "negatives" in option else "iou-strata"
    with pytest.raises(ConfigError, match=next(iter(option))):
        make_loader(out, "train", batch_size=4, train=True, sampler=sampler, device="cpu", **option)
