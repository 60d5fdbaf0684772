"""The library's edges as a new user meets them: a file of a pack or a folder that is no pack given as `shards`,
argument types, options that would be ignored, and settings named in the caller's words."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from crackio import ConfigError, HardNegatives, RemoteSettings, ShardError, Weighted, make_loader, open_pack
from crackio.errors import OutOfRange
from crackio.format.manifest import pack_file_text
from crackio.storage.packs import verify_pack
from crackio.storage.remote import Remote
from crackio.writing.pack import PackSettings
from crackio.writing.proposal_stage import ProposeSettings
from crackio.writing.regions import ProposalSettings

CPU = dict(batch_size=8, device="cpu", backend="torch", workers=1)


def refusal(error: type[Exception], call) -> str:
    with pytest.raises(error) as e:
        call()
    return str(e.value)


def sibling(folder: Path) -> Path:
    return folder.resolve().parent / f"{folder.resolve().name}-shards"


# --- 1. a file of a pack given where the pack is wanted -----------------------------------------------------


@pytest.mark.parametrize(
    "name", ["manifest.json", "train/index.npy", "train/train-000000.tar", "train/train-000000.idx"]
)
def test_a_file_of_a_pack_names_the_packs_folder(demo_shards, name):
    path = demo_shards / name
    for call in (lambda: open_pack(path), lambda: make_loader(path, "train", train=True, **CPU)):
        message = refusal(ShardError, call)
        assert message == pack_file_text(str(path), str(demo_shards))
        assert f"of the pack {demo_shards}, not the pack: give the pack's folder, {demo_shards}" in message
        assert "does not exist" not in message and "--out" not in message


def test_a_file_of_a_pack_reads_the_same_local_and_remote(demo_shards, tmp_path, monkeypatch):
    local = refusal(ShardError, lambda: open_pack(demo_shards / "manifest.json"))
    remote = refusal(ConfigError, lambda: open_pack("s3://bucket/pack/manifest.json"))
    assert local == f"{demo_shards}/manifest.json names the manifest of the pack {demo_shards}, not the pack: " + (
        f"give the pack's folder, {demo_shards}"
    )
    assert remote == local.replace(str(demo_shards), "s3://bucket/pack")
    assert str(Remote("s3://bucket/pack").url) in remote  # the same words from the URL's check
    monkeypatch.chdir(demo_shards / "train")  # a relative file: its pack named as a resolved folder
    assert refusal(ShardError, lambda: open_pack("index.npy")).endswith(f"give the pack's folder, {demo_shards}")
    stray = tmp_path / "notes.txt"
    stray.write_text("x")
    assert "is a file, not a pack: give the pack's folder" in refusal(ShardError, lambda: open_pack(stray))


@pytest.fixture
def served(demo_shards, monkeypatch):
    """The demo pack over HTTP on the loopback (Python's own server: whole-file GETs only, which is all a refusal
    needs); its URL."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    monkeypatch.setenv("CRACKIO_REMOTE_TIMEOUT", "5")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(demo_shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_file_or_split_of_a_remote_pack_names_the_pack(served):
    for url in (f"{served}/train/index.npy", f"{served}/valid/valid-000000.tar"):
        with pytest.raises(ShardError) as e:
            open_pack(url)
        assert str(e.value) == pack_file_text(url, served)
    verified = refusal(ShardError, lambda: list(verify_pack(f"{served}/train")))
    assert verified.endswith(f"not a pack: verify the pack's folder {served} (every split is checked)")


# --- 2. a folder that is not a pack: what it is and what to run -------------------------------------------


def photos(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    "fmt, files",
    [
        ("coco", {"train/_annotations.coco.json": "{}", "train/a.jpg": "", "valid/b.jpg": ""}),
        ("coco", {"annotations/instances_train.json": "{}", "images/a.jpg": ""}),
        ("yolo", {"data.yaml": "names: [crack]", "images/a.jpg": "", "labels/a.txt": ""}),
        ("yolo", {"train/images/a.jpg": "", "train/labels/a.txt": ""}),
        ("voc", {"Annotations/a.xml": "", "JPEGImages/a.jpg": ""}),
        ("mask", {"images/a.jpg": "", "masks/a.png": ""}),
    ],
)
def test_annotated_photos_point_at_the_proposal_stage(tmp_path, fmt, files):
    src = photos(tmp_path / "photos", files)
    out = sibling(src)
    message = refusal(ShardError, lambda: make_loader(src, "train", train=True, **CPU))
    assert f"{src} looks like annotated photos (" in message and f": --format {fmt}), not a pack" in message
    assert f"`python tools/propose.py {src} --format {fmt} --out {out}`, then give shards={str(out)!r}" in message
    assert "proposal crops" not in message and "tools/pack.py" not in message


def test_a_training_runs_folder_names_the_pack_it_trained_on(tmp_path):
    run = photos(tmp_path / "run", {"best.pt": "", "last.pt": "", "curves.png": ""})
    (run / "config.json").write_text(json.dumps({"shards": "/data/cracks-shards", "epochs": 3}))
    message = refusal(ShardError, lambda: open_pack(run))
    assert message == (
        f"{run} is a training run's folder (it holds config.json, best.pt, last.pt, curves.png), not a pack: the "
        "pack it trained on is named in its config.json: \"shards\": '/data/cracks-shards'"
    )
    (run / "config.json").write_text("not json")
    assert refusal(ShardError, lambda: open_pack(run)).endswith('named in its config.json as "shards"')


def test_proposal_crops_are_told_in_the_callers_words(demo_src):
    out = sibling(demo_src)
    pack = f"`python tools/pack.py {demo_src} --out {out}`"
    assert f"{pack}, then give {out} in its place" in refusal(ShardError, lambda: open_pack(demo_src))
    assert f"{pack}, then give --shards {out}" in refusal(ShardError, lambda: open_pack(demo_src, option="--shards"))
    loader = refusal(ShardError, lambda: make_loader(demo_src, "train", train=True, **CPU))
    assert f"{pack}, then give shards={str(out)!r}" in loader and "--shards" not in loader
    verified = refusal(ShardError, lambda: list(verify_pack(demo_src)))
    assert f"{pack}, then verify {out}" in verified and "--shards" not in verified


def test_pack_verify_of_a_split_folder_or_crops_says_what_to_verify(demo_shards, demo_src, capsys):
    import tools.pack as tool

    assert tool.main(["--verify", str(demo_shards / "train")]) == 2
    err = capsys.readouterr().err
    assert f"not a pack: verify the pack's folder {demo_shards} (every split is checked)" in err
    assert "choose the split" not in err
    assert tool.main(["--verify", str(demo_src)]) == 2
    err = capsys.readouterr().err
    assert f"then verify {sibling(demo_src)}" in err and "--shards" not in err


# --- 3. argument types, checked at the edge ------------------------------------------------------------


@pytest.mark.parametrize(
    "change, words",
    [
        ({"shards": None}, "shards must be a pack's folder (a str or path), its URL"),
        ({"shards": 123}, "a Pack opened by crackio.open_pack, or a non-empty list of them (a mixture), got 123"),
        ({"train": "yes"}, "train must be True (training: augmented, in the sampler's order) or False"),
        ({"iou_threshold": "none"}, "iou_threshold must be None (the labels in the file names) or a number in [0, 1)"),
        ({"iou_threshold": 1.0}, "or a number in [0, 1) (label = IoU > it), got 1.0"),
        ({"remote": {"cache_limit": 1}}, "remote must be crackio.RemoteSettings(...) or None"),
        ({"remote": "x"}, "remote must be crackio.RemoteSettings(...) or None (the environment's"),
        ({"shards": "s3://bucket/pack", "remote": {"cache_limit": 1}}, "remote must be crackio.RemoteSettings(...)"),
    ],
)
def test_argument_types_are_one_line_naming_the_argument(demo_shards, change, words):
    kw = {"shards": demo_shards, "train": True, **CPU, **change}
    message = refusal(ConfigError, lambda: make_loader(kw.pop("shards"), "train", **kw))
    assert words in message and "\n" not in message and "--" not in message


@pytest.mark.parametrize("location", ["folder", "s3://bucket/pack"])
def test_open_pack_checks_remote_for_a_folder_and_a_url(demo_shards, location):
    where = demo_shards if location == "folder" else location
    for remote in ("x", {"cache_limit": 1}):
        with pytest.raises(ConfigError, match=r"^remote must be crackio\.RemoteSettings\(\.\.\.\) or None"):
            open_pack(where, remote)  # type: ignore[arg-type]
    assert open_pack(demo_shards, RemoteSettings()).manifest == open_pack(demo_shards).manifest


def test_a_torch_habit_is_said_with_a_missing_argument(demo_shards):
    message = refusal(ConfigError, lambda: make_loader(demo_shards, "train", shuffle=True))
    assert message.startswith("shuffle=True is not an argument of make_loader: a training loader (train=True)")
    assert message.endswith("; and give the required batch_size= and train=")
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'train'"):
        make_loader(demo_shards, "train", batch_size=8)  # nothing else to say: Python's own message


# --- 4. options that would be ignored are refused, saying when they apply -------------------------------


def test_block_options_apply_with_block_order_only(demo_shards):
    message = refusal(ConfigError, lambda: make_loader(demo_shards, "train", train=True, block_size=64, **CPU))
    assert message.startswith("block_size=64 applies with order='block' only")
    assert "give order='block', or leave it out" in message
    both = refusal(ConfigError, lambda: make_loader(demo_shards, "train", train=True, block_size=64, window=2, **CPU))
    assert both.startswith("block_size=64 and window=2 apply with order='block' only")
    make_loader(demo_shards, "train", train=True, block_size=128, window=8, **CPU)  # the defaults, passed as such
    make_loader(demo_shards, "train", train=True, order="block", block_size=64, **CPU)


def test_a_weighting_is_refused_for_evaluation(demo_shards):
    message = refusal(
        ConfigError, lambda: make_loader(demo_shards, "valid", train=False, sampler="weighted", num_samples=40, **CPU)
    )
    assert message.startswith("sampler 'weighted' (class_weights, replacement, num_samples) weights training draws")
    assert "evaluation (train=False) reads the selection once in index order" in message
    assert "give sampler=Shuffle()" in message
    cut = Weighted(selection=HardNegatives(5))
    assert "give sampler=HardNegatives(negatives=5)" in refusal(
        ConfigError, lambda: make_loader(demo_shards, "valid", train=False, sampler=cut, **CPU)
    )
    assert "sampler 'balanced' (class_weights)" in refusal(
        ConfigError, lambda: make_loader(demo_shards, "valid", train=False, sampler="balanced", **CPU)
    )
    loader = make_loader(demo_shards, "valid", train=False, sampler=HardNegatives(5), **CPU)  # what applies
    assert sum(len(b) for b in loader.batches(0)) == len(loader.selection)


# --- 5. settings objects speak in their fields, the tools in their flags --------------------------------


def test_pack_settings_name_their_fields_and_the_tool_its_flags(tmp_path, capsys):
    import tools.pack as tool

    assert refusal(ConfigError, lambda: PackSettings(workers=-1)) == "PackSettings(workers=-1): workers must be >= 0"
    assert refusal(ConfigError, lambda: PackSettings(samples_per_shard=2.5)) == (
        "PackSettings(samples_per_shard=2.5): samples_per_shard must be an integer >= 1"
    )
    with pytest.raises(SystemExit) as stop:
        tool.main([str(tmp_path), "--workers", "-1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "error: --workers must be >= 0, got -1" in err and "samples" not in err


def test_propose_names_only_the_failing_option_and_its_value(tmp_path, capsys):
    import tools.propose as tool

    message = refusal(ConfigError, lambda: ProposalSettings(max_proposals=-5))
    assert message == "ProposalSettings(max_proposals=-5): max_proposals must be >= 1"
    assert refusal(ConfigError, lambda: ProposalSettings(context=112)).endswith("context must be in [0, 112)")
    assert refusal(ConfigError, lambda: ProposeSettings(workers=-1)) == (
        "ProposeSettings(workers=-1): workers must be >= 0"
    )
    for flags, words in (
        (["--max-proposals", "-5"], "error: --max-proposals must be >= 1, got -5\n"),
        (["--positive-iou", "1.5"], "error: --positive-iou must be in [0, 1), got 1.5\n"),
        (["--workers", "-2"], "error: --workers must be >= 0, got -2\n"),
    ):
        with pytest.raises(SystemExit) as stop:
            tool.main([str(tmp_path), "--format", "coco", *flags])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and words in err and err.count("--") == 1 + err.split("error:")[0].count("--")


def test_out_of_range_crosses_processes_intact():
    with pytest.raises(OutOfRange) as e:
        PackSettings(samples_per_shard=0, workers=-1)
    again = pickle.loads(pickle.dumps(e.value))
    assert str(again) == str(e.value) and again.failing == e.value.failing
    assert again.named(lambda f: "--" + f.replace("_", "-")) == (
        "--samples-per-shard must be >= 1 and --workers >= 0, got 0 and -1"
    )
