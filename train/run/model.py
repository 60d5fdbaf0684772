"""The crack classifier: a torchvision backbone with the original's head or a linear one."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from crackio.cli import closest
from crackio.errors import ConfigError, CrackioError
from crackio.loading.augment import normalize
from train.run.checkpoint import CheckpointError, is_state_dict, load_data
from train.settings.run import RunSettings


class WeightsError(CrackioError, RuntimeError):
    """Pretrained weights that cannot be had; the message says which file to provide."""


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """adam (the original's) | adamw | sgd (momentum 0.9)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}  # the choices: settings


class CrackClassifier(nn.Module):
    """Returns one logit per image; probabilities come from a sigmoid at evaluation."""

    def __init__(self, backbone: nn.Module, head: str):
        super().__init__()
        self.backbone = backbone
        # original: the write-up's ReLU + Linear(1000, 1) on the 1000-class output (its Sigmoid moved
        # into the loss); linear: the backbone's last Linear already maps to one logit.
        original = head == "original"
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(1000, 1)) if original else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # a loader's uint8 output: normalized here, on the model's device
            x = normalize(x)
        return self.head(self.backbone(x)).squeeze(1)


def last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent, attribute, layer) of the classifier's final Linear: `fc` for ResNets,
    `classifier[-1]` for MobileNet/EfficientNet, `heads.head` for ViT, ..."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = name
    if found is None:
        raise ConfigError(f"{type(model).__name__} has no Linear layer to replace with a 1-logit head")
    parent_name, _, attr = found.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr, getattr(parent, attr)


def imagenet_state_dict(arch: str) -> dict:
    """torchvision's DEFAULT ImageNet weights, through its API and cache ($TORCH_HOME/hub/checkpoints)."""
    weights = models.get_model_weights(arch).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=not cached.exists())
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a partial download a RuntimeError
        raise WeightsError(
            f"cannot load ImageNet weights for {arch} ({e}). Offline? Put {weights.url} at {cached} "
            f"(or set TORCH_HOME), or train from scratch with --weights none."
        ) from e


def arch_hint(arch: str, known: list[str], shown: int = 8) -> str:
    """ "; did you mean ...?" for an unknown --arch: the architectures whose names it begins (resnext50 ->
    resnext50_32x4d; efficientnet_b -> efficientnet_b0 ... b7), in numeric order, else the closest name."""
    typed = arch.strip().lower()
    starts = sorted((name for name in known if typed and name.startswith(typed)), key=_numeric)
    if not starts:
        return closest(arch, known)
    if len(starts) == 1:
        return f"; did you mean {starts[0]!r}?"
    listed = ", ".join(repr(name) for name in starts[:shown]) + (", ..." if len(starts) > shown else "")
    return f"; did you mean one of {listed}?"


def _numeric(name: str) -> list:
    """Sort key reading digit runs as numbers: resnet18 < resnet34 < resnet101."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def build_model(arch: str, weights: str, head: str) -> CrackClassifier:
    """`weights`: imagenet | none | PATH to a state dict of the torchvision backbone or of this classifier.

    Raises:
        ConfigError: an unknown --arch.
        WeightsError: weights that cannot be had or do not fit.
        CheckpointError: a weights file that is no torch file or needs unpickling beyond tensors (refused).
    """
    known = models.list_models(module=models)
    if arch not in known:
        raise ConfigError(
            f"--arch {arch!r} is not a torchvision classification model{arch_hint(arch, known)} "
            f"(e.g. resnext50_32x4d, resnet18, mobilenet_v3_small)"
        )
    backbone = models.get_model(arch, weights=None)
    if weights == "imagenet":
        backbone.load_state_dict(imagenet_state_dict(arch))
    path_state = None
    if weights not in ("imagenet", "none"):
        path = Path(weights)
        if not path.is_file():
            what = "a folder, not a file" if path.is_dir() else "no such file"
            raise WeightsError(f"--weights {weights}: {what} (use imagenet, none or a state-dict path)")
        state = load_data(path, torch.device("cpu"), "weights file")  # data only: refused if it needs code
        config = state.get("config") if isinstance(state, dict) else None
        if isinstance(config, dict) and isinstance(config.get("arch"), str) and isinstance(config.get("head"), str):
            if (config["arch"], config["head"]) != (arch, head):  # a crackio checkpoint says what it was
                raise WeightsError(
                    f"--weights {weights} was trained as --arch {config['arch']} --head {config['head']}, not --arch "
                    f"{arch} --head {head}: give --arch {config['arch']} --head {config['head']}"
                )
        if isinstance(state, dict) and "model" in state:
            state = state["model"]
        if not is_state_dict(state):  # a crackio checkpoint, or a bare state dict; nothing else
            raise WeightsError(
                f"--weights {weights} is not a state dict or a crackio checkpoint (a mapping of parameter names "
                f"to tensors): use imagenet, none, RUN/best.pt or torch.save(model.state_dict())"
            )
        if any(k.startswith("backbone.") for k in state):
            path_state = state
        else:
            _load(backbone, state, f"--weights {weights}", arch)
    if head == "linear":
        parent, attr, layer = last_linear(backbone)
        setattr(parent, attr, nn.Linear(layer.in_features, 1))
    model = CrackClassifier(backbone, head)
    if path_state is not None:
        _load(model, path_state, f"--weights {weights}", arch)
    return model


def _load(module: nn.Module, state: dict, source: str, arch: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatched keys"
        raise WeightsError(
            f"{source} does not fit --arch {arch} and this head: {first}. Was it saved from another architecture?"
        ) from e


def model_from_checkpoint(ckpt: dict, path: Path) -> tuple[CrackClassifier, RunSettings]:
    """The classifier and run config a checkpoint (from train.run.checkpoint.load_checkpoint) holds.

    Raises:
        CheckpointError: its config is refused (unknown keys, wrong types, values no run could have).
        WeightsError: its weights do not fit its own config.
    """
    try:
        # Checked as a command line's: its split names become paths (features/<split>.npz).
        cfg = RunSettings.from_flat(ckpt["config"], source=f"{path} (its config)")
    except ConfigError as e:
        raise CheckpointError(f"{path} holds a config no run could have: {e}") from e
    model = build_model(cfg.model.arch, "none", cfg.model.head)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise WeightsError(
            f"{path} does not fit its own config (arch {cfg.model.arch}, head {cfg.model.head}): "
            f"{str(e).splitlines()[0]}"
        ) from e
    return model, cfg
