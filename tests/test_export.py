"""python -m train export: the ONNX graph gives PyTorch's probabilities within the tolerance, and
python -m train detect --onnx gives the checkpoint's boxes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from crackio import make_loader
from crackio.writing.regions import ProposalSettings
from tests.helpers import ARCH, save_untrained
from train.__main__ import main as cli
from train.detection.export import DYNAMO, ExportError, run_export
from train.run.model import build_model, last_linear
from train.settings.commands import ExportSettings

try:
    import onnx
    import onnxruntime as ort

    if DYNAMO:
        import onnxscript  # noqa: F401
except ImportError:
    onnx = ort = None
# The extra is optional: without it the export tests skip, and only the message saying what to install is tested.
needs_onnx = pytest.mark.skipif(ort is None, reason="needs pip install 'crackio[export]'")

TOL = 1e-4  # the export's default --tolerance: what is claimed and checked
SETTINGS = ProposalSettings(max_proposals=60)


def spread_like_a_trained_model(model: torch.nn.Module, shards: Path) -> None:
    """An untrained network in eval mode gives nearly one probability for every crop (BatchNorm's initial
    statistics), which would make the boxes' order a matter of rounding: measure BatchNorm's statistics on
    the train split and scale the last layer, so that probabilities spread over ~0.1-0.9 as a trained model's."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches
    model.train()
    loader = make_loader(shards, "train", batch_size=32, train=False, device="cpu", output="uint8")
    with torch.no_grad(), contextlib.closing(iter(loader)) as batches:
        for batch in itertools.islice(batches, 2):  # 64 crops
            model(batch.images)
        model.eval()
        last_linear(model.backbone)[2].weight.mul_(20)


@pytest.fixture(scope="module")
def run(demo_shards, tmp_path_factory) -> Path:
    """RUN/best.pt of a tiny classifier, its run trained on demo_shards, proposal settings saved in it."""
    root = tmp_path_factory.mktemp("export_run")
    torch.manual_seed(0)
    model = build_model(ARCH, "none", "linear")
    spread_like_a_trained_model(model, demo_shards)
    return save_untrained(root / "best.pt", demo_shards, model, epoch=3, proposals=SETTINGS.as_dict())


@pytest.fixture(scope="module")
def exported(run) -> tuple[Path, str]:
    """The run exported once through the command line: (RUN/model.onnx, what it printed). It takes ~5 s (with
    torch.export, ~10 s with its first imports): the tests that use it are marked slow."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli(["export", "--checkpoint", str(run)]) == 0  # --out defaults to RUN/model.onnx
    return run.parent / "model.onnx", printed.getvalue()


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A photo with two dark rectangles (cracks, for selective search) on a light, slightly noisy ground."""
    path = tmp_path_factory.mktemp("export_photos") / "wall.jpg"
    rng = np.random.default_rng(0)
    img = Image.fromarray((np.full((120, 200, 3), 150) + rng.integers(0, 6, (120, 200, 3))).astype(np.uint8))
    pen = ImageDraw.Draw(img)
    pen.rectangle([20, 20, 69, 59], fill=(40, 30, 30))
    pen.rectangle([150, 80, 199, 119], fill=(60, 40, 30))
    img.save(path, quality=95)
    return path


def torch_model(checkpoint: Path) -> torch.nn.Module:
    model = build_model(ARCH, "none", "linear")
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    return model.eval()


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@needs_onnx
@pytest.mark.slow
def test_the_exported_models_probabilities_match_pytorchs_on_the_test_split(run, exported, demo_shards):
    path, printed = exported
    report = json.loads((path.parent / "model.export.json").read_text())
    check = report["check"]
    assert check["split"] == "test" and check["tolerance"] == TOL
    assert check["max_abs_diff"] <= TOL and check["decisions_differ_at_0.5"] == 0
    assert report["throughput"]["onnxruntime_images_per_sec"] > 0
    assert "max |p_onnx - p_torch|" in printed and "onnxruntime" in printed and "images/s" in printed
    # The same comparison, made here from the written file: every test crop, in batches of 16.
    model, ort_session = torch_model(run), session(path)
    p_torch, p_onnx = [], []
    with torch.no_grad():
        for batch in make_loader(demo_shards, "test", batch_size=16, train=False, device="cpu", output="uint8"):
            p_torch.append(torch.sigmoid(model(batch.images)).numpy())
            p_onnx.append(ort_session.run(["crack_probability"], {"images": batch.images.numpy()})[0])
    p_torch, p_onnx = np.concatenate(p_torch), np.concatenate(p_onnx)
    assert len(p_onnx) == check["samples"] > 0
    assert p_onnx.dtype == np.float32 and p_onnx.shape == (check["samples"],)
    assert np.abs(p_onnx - p_torch).max() <= TOL
    assert p_torch.std() > 0.05  # probabilities that differ from crop to crop: the check means something


@needs_onnx
@pytest.mark.slow
def test_the_graph_takes_uint8_images_of_any_batch_and_carries_the_runs_settings(run, exported):
    path, _ = exported
    s = session(path)
    (inp,), (out,) = s.get_inputs(), s.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [3, 224, 224])
    assert isinstance(inp.shape[0], str)  # a named, dynamic batch axis
    assert (out.name, out.type, len(out.shape)) == ("crack_probability", "tensor(float)", 1)
    model = torch_model(run)
    for n in (1, 5):
        images = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8)
        with torch.no_grad():
            expected = torch.sigmoid(model(images)).numpy()
        np.testing.assert_allclose(s.run(None, {"images": images.numpy()})[0], expected, rtol=0, atol=TOL)
    meta = s.get_modelmeta().custom_metadata_map
    assert json.loads(meta["crackio.config"])["arch"] == ARCH
    assert json.loads(meta["crackio.proposals"]) == SETTINGS.as_dict()
    assert meta["crackio.checkpoint_sha256"] == hashlib.sha256(run.read_bytes()).hexdigest()
    assert meta["crackio.trained"] == "epoch 3"


@needs_onnx
@pytest.mark.slow
def test_detect_with_onnx_gives_the_checkpoints_boxes(run, exported, photo, tmp_path):
    path, _ = exported
    found = {}
    for how, model in (("checkpoint", str(run)), ("onnx", str(path))):
        out = tmp_path / how
        args = ["detect", f"--{how}", model, str(photo), "--out", str(out), "--score-threshold", "0"]
        assert cli([*args, "--device", "cpu", "--batch-size", "16"]) == 0
        found[how] = json.loads((out / "detections.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
        assert summary["proposals"] == SETTINGS.as_dict()  # from the .onnx's metadata alone for --onnx
    assert summary["scored_by"] == "network (onnxruntime)"
    a, b = found["checkpoint"], found["onnx"]
    assert len(a) == len(b) > 5  # every box after NMS (--score-threshold 0)
    assert [d["bbox"] for d in a] == [d["bbox"] for d in b]  # the same boxes, in the same order
    scores_a, scores_b = np.array([d["score"] for d in a]), np.array([d["score"] for d in b])
    assert np.abs(scores_a - scores_b).max() <= TOL
    assert scores_a.max() - scores_a.min() > 0.05


@needs_onnx
@pytest.mark.slow
def test_an_export_that_does_not_match_pytorch_is_refused_and_nothing_is_written(run, exported, tmp_path, monkeypatch):
    # A wrong graph: the exported graph of another model (the checkpoint's weights, perturbed).
    ckpt = torch.load(run, weights_only=True)
    fc = last_linear(torch_model(run).backbone)[1]
    key = next(k for k in ckpt["model"] if k.endswith(f"{fc}.bias"))
    ckpt["model"][key] = ckpt["model"][key] + 0.5
    torch.save(ckpt, tmp_path / "best.pt")
    monkeypatch.setattr("train.detection.export.to_onnx", lambda model: onnx.load(exported[0]))
    with pytest.raises(ExportError, match=r"differs from PyTorch's by up to .* was not written"):
        run_export(ExportSettings(checkpoint=str(tmp_path / "best.pt"), out=str(tmp_path / "model.onnx")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]  # no model, no report, no temporary


def foreign_onnx(folder: Path) -> dict[str, Path]:
    """ONNX files detection must refuse: not a model, another input shape, the right signature without crackio's
    metadata (any model exported by hand)."""
    (folder / "text.onnx").write_text("not a model\n")
    h = onnx.helper
    for name, dtype, side in (("other", onnx.TensorProto.FLOAT, 32), ("plain", onnx.TensorProto.UINT8, 224)):
        cast = h.make_node("Cast", ["images"], ["x"], to=onnx.TensorProto.FLOAT)
        mean = h.make_node("ReduceMean", ["x"], ["crack_probability"], axes=[1, 2, 3], keepdims=0)
        graph = h.make_graph(
            [cast, mean],
            name,
            [h.make_tensor_value_info("images", dtype, ["n", 3, side, side])],
            [h.make_tensor_value_info("crack_probability", onnx.TensorProto.FLOAT, ["n"])],
        )
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.save(model, folder / f"{name}.onnx")
    return {name: folder / f"{name}.onnx" for name in ("text", "other", "plain")}


def test_export_refuses_bad_options_in_one_line_before_exporting(run, tmp_path, capsys):
    out = ["--out", str(tmp_path / "m.onnx")]
    cases = [
        (["--checkpoint", str(tmp_path / "gone.pt")], "gone.pt does not exist"),
        (
            ["--checkpoint", str(run), "--out", str(tmp_path / "no" / "m.onnx")],
            f"the folder {tmp_path / 'no'} does not exist: create it (mkdir -p",
        ),
        (["--checkpoint", str(run), "--out", str(tmp_path)], "is a folder: name the file to write"),
        (["--checkpoint", str(run), *out, "--tolerance", "-1"], "--tolerance must be >= 0"),
        (["--checkpoint", str(run), *out, "--split", "tset"], "--split 'tset' is not in "),  # a split of the shards
        (["--checkpoint", str(run), *out, "--shards", str(tmp_path / "moved")], "moved does not exist"),
    ]
    for argv, message in cases:
        assert cli(["export", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not list(tmp_path.iterdir())  # nothing written, no folder made


@needs_onnx
def test_detect_refuses_onnx_files_it_cannot_use_naming_the_file_and_the_fix(photo, tmp_path, capsys):
    files = foreign_onnx(tmp_path)
    export = "export one with `python -m train export --checkpoint RUN/best.pt --out model.onnx`"
    cases = [
        ([str(tmp_path / "gone.onnx")], "gone.onnx does not exist (write one with `python -m train export"),
        ([str(files["text"])], "text.onnx is not an ONNX model onnxruntime can load"),
        ([str(files["other"])], "crackio needs one uint8 images of shape (batch, 3, 224, 224)"),
        ([str(files["plain"])], "plain.onnx was not written by `python -m train export` (no crackio metadata"),
        (
            [str(files["plain"]), "--svm", str(tmp_path / "svm.npz")],
            "--svm scores the network's features, which an ONNX model does not output: use --checkpoint",
        ),
        ([str(files["plain"]), "--device", "cuda"], "--onnx scores with onnxruntime on the CPU"),
    ]
    for argv, message in cases:
        assert cli(["detect", str(photo), "--onnx", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert export in cli_error(["detect", str(photo), "--onnx", str(files["text"])], capsys)
    with pytest.raises(SystemExit) as stop:  # argparse's own usage error
        cli(["detect", "--onnx", str(files["plain"]), "--checkpoint", "RUN/best.pt", str(photo)])
    assert stop.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def cli_error(argv: list[str], capsys) -> str:
    assert cli(argv) == 2
    return capsys.readouterr().err


def test_missing_onnx_packages_say_what_to_install(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    err = cli_error(["export", "--checkpoint", str(run), "--out", str(tmp_path / "m.onnx")], capsys)
    assert "onnxruntime" in err and "pip install 'crackio[export]'" in err
    assert not list(tmp_path.iterdir())


def test_export_out_must_be_a_new_onnx_file_not_the_checkpoint_nor_a_device(tmp_path, capsys):
    import os

    from train.__main__ import main as cli

    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "best.pt"
    ckpt.write_bytes(b"not read: --out is checked first")
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    for out, message in (
        (ckpt, "is the checkpoint itself"),
        (run / "model.txt", "name an .onnx file"),
        (fifo, "is not a regular file"),
    ):
        assert cli(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert ckpt.read_bytes() == b"not read: --out is checked first"
    onnx_named = run / "best.onnx"
    onnx_named.write_bytes(b"x")
    assert cli(["export", "--checkpoint", str(onnx_named), "--out", str(onnx_named)]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err
    assert cli(["detect", "--checkpoint", str(onnx_named), str(tmp_path)]) == 2
    assert f"takes it as --onnx {onnx_named}" in capsys.readouterr().err
