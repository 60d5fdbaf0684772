"""Train-time augmentation parameters and the torch implementation of the pipeline.

The original (seed write-up) used, for training:
    v2.ColorJitter(brightness=0.5)   factor ~ U[0.5, 1.5], result clamped (uint8 on PIL)
    v2.RandomHorizontalFlip(p=0.5)
    v2.RandomRotation(180)           angle ~ U[-180, 180], same size, black fill, nearest
then ToDtype(scale=True) and Normalize(ImageNet mean/std); eval: normalize only.

The random parameters are drawn here with numpy from (seed, epoch, global batch), position by
position, so both backends apply the same augmentation to the same sample, and a run resumed
mid-epoch, at this or another number of ranks, repeats an uninterrupted one. DALI applies them with
its operators (crackio/loading/dali_backend.py); the torch backend with `warp` and `brighten_into` below.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = 224
BRIGHTNESS = (0.5, 1.5)
FLIP_P = 0.5
DEGREES = 180.0
_SEED_AUG = 0xA06


class AugmentParams(NamedTuple):
    brightness: np.ndarray  # float32 factor per sample
    flip: np.ndarray  # int32 0/1 per sample
    angle: np.ndarray  # float32 degrees, counter-clockwise, per sample


def draw_params(count: int, seed: int, epoch: int, step: int) -> AugmentParams:
    """The parameters of global batch `step` of `epoch`, one per position 0..count-1 (count = the global
    batch size): a pure function of the arguments, never of the rank that reads a position, so every world
    size augments each sample of the epoch alike (a rank takes its positions' rows of the result). Drawn
    per global batch (~20 us), so nothing per sample of the split is held for the epoch."""
    rng = np.random.default_rng([seed, _SEED_AUG, epoch, step])
    return AugmentParams(
        brightness=rng.uniform(*BRIGHTNESS, size=count).astype(np.float32),
        flip=(rng.random(count) < FLIP_P).astype(np.int32),
        angle=rng.uniform(-DEGREES, DEGREES, size=count).astype(np.float32),
    )


def take(params: AugmentParams, positions: np.ndarray) -> AugmentParams:
    """The parameters at `positions` (int64 indices into a global batch's)."""
    return AugmentParams(*(p[positions] for p in params))


def rotate_batch(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image by its own angle (counter-clockwise), same size, zero fill, nearest.

    Written with affine_grid/grid_sample because torchvision's `rotate` takes one
    angle per call; this is one batched kernel on whatever device `x` is on.
    """
    rad = degrees.to(x.device, torch.float32) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    # Output -> input sampling map; with y pointing down this turns the picture counter-clockwise.
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def augment(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """uint8 NCHW -> augmented uint8 NCHW, batched on whatever device `images` is on (the CUDA path)."""
    x = images.to(torch.float32)
    dev = x.device
    factor = torch.from_numpy(params.brightness).to(dev).view(-1, 1, 1, 1)
    x = (x * factor).round_().clamp_(0, 255)  # rounded like the uint8 result of PIL and DALI
    flip = torch.from_numpy(params.flip).to(dev).view(-1, 1, 1, 1).bool()
    x = torch.where(flip, x.flip(-1), x)
    return rotate_batch(x, torch.from_numpy(params.angle)).to(torch.uint8)  # whole numbers: exact


def normalize(images: torch.Tensor) -> torch.Tensor:
    """0-255 NCHW (uint8 or float) -> ImageNet-normalized float32 NCHW, on the images' device.

    The loaders apply it unless asked for uint8 output; then the model applies it on its device
    (`train.run.model.CrackClassifier`), FFCV-style: 4x fewer bytes cross the host."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.to(torch.float32) - mean) / std


def _normalize_table() -> np.ndarray:
    """float32 (256, 1, 3): `normalize`'s output for each uint8 value of each channel, computed by `normalize`
    itself, so a lookup gives its every bit."""
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, 3, 256, 1)
    return normalize(values)[0, :, :, 0].T.contiguous().numpy().reshape(256, 1, 3)


NORMALIZE_TABLE = _normalize_table()


def augment_normalize(images: torch.Tensor, params: AugmentParams | None) -> torch.Tensor:
    """uint8 NCHW -> normalized float32 NCHW; `params=None` is the eval pipeline."""
    return normalize(images if params is None else augment(images, params))


def warp_matrix(angle: float, flip: int, size: int = SIZE) -> np.ndarray:
    """The 2x3 output -> input pixel map of flip-then-rotate (counter-clockwise by `angle` degrees about the
    centre), as `rotate_batch` and DALI's fn.rotate compute it: one warp instead of a flip copy and a rotation."""
    c = (size - 1) / 2
    r = math.radians(float(angle))
    cos, sin = math.cos(r), math.sin(r)
    row0 = [cos, -sin, c - cos * c + sin * c]
    row1 = [sin, cos, c - sin * c - cos * c]
    if flip:  # x -> size - 1 - x after the rotation's map
        row0 = [-row0[0], -row0[1], 2 * c - row0[2]]
    return np.array([row0, row1], dtype=np.float64)


_IDENTITY = np.arange(256, dtype=np.uint8).reshape(256, 1)


def warp(hwc: np.ndarray, flip: int, angle: float, out: np.ndarray | None = None) -> np.ndarray:
    """Flip-then-rotate of one uint8 H x W x 3 image on the CPU (the torch backend's worker threads), into `out`
    (uint8 H x W x 3, e.g. one image of the batch's N x H x W x 3 buffer, which the loader views as N x 3 x H x W,
    channels_last, without a copy) or a new array; returns it.

    OpenCV because the CPU rotation is what bounds a CPU pipeline: DALI's fn.rotate halves the DALI CPU
    pipeline's rate and torch's grid_sample is slower still, while cv2.warpAffine (nearest, the flip folded into
    its matrix, zero fill) costs ~0.1 ms for 224 x 224 and releases the GIL.
    """
    import cv2

    return cv2.warpAffine(
        hwc,
        warp_matrix(angle, flip, hwc.shape[1]),
        (hwc.shape[1], hwc.shape[0]),
        dst=out,
        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )


def brighten_into(image: np.ndarray, brightness: float, out: np.ndarray) -> None:
    """The brightness factor applied to a warped uint8 H x W x 3 image, written into `out`: uint8 (may be `image`
    itself) or float32, then also ImageNet-normalized, equal to `normalize` bit for bit.

    Brightness goes after the warp: a per-pixel scale commutes with copying pixels and with the zero fill, so the
    result equals brightness-flip-rotate (the original's order). `cv2.convertScaleAbs` rounds half to even and
    saturates, as `augment` does. For float32 the scale and the normalization are one lookup (`cv2.LUT`, 1 byte
    read and 4 written per value) whose table is convertScaleAbs's result for each of the 256 values mapped
    through NORMALIZE_TABLE, so each output value is what the two steps give, in one pass.
    """
    import cv2

    if out.dtype == np.uint8:
        cv2.convertScaleAbs(image, dst=out, alpha=float(brightness))
    else:
        scaled = cv2.convertScaleAbs(_IDENTITY, alpha=float(brightness))[:, 0]
        cv2.LUT(image, NORMALIZE_TABLE[scaled], dst=out)


def augment_into(hwc: np.ndarray, brightness: float, flip: int, angle: float, out: np.ndarray) -> None:
    """`warp` then `brighten_into`: one image's train augmentation on the CPU, into `out` (uint8 or float32
    H x W x 3, the same size as `hwc`)."""
    if out.dtype == np.uint8:
        brighten_into(warp(hwc, flip, angle, out), brightness, out)
    else:
        brighten_into(warp(hwc, flip, angle), brightness, out)
