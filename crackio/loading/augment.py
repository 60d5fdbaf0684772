"""Train-time augmentation parameters and the torch implementation of the pipeline.

The original (seed write-up) used, for training:
    v2.ColorJitter(brightness=0.5)   factor ~ U[0.5, 1.5], result clamped (uint8 on PIL)
    v2.RandomHorizontalFlip(p=0.5)
    v2.RandomRotation(180)           angle ~ U[-180, 180], same size, black fill, nearest
then ToDtype(scale=True) and Normalize(ImageNet mean/std); eval: normalize only.

The random parameters are drawn here with numpy from (seed, epoch, global batch), position by
position, so both backends apply the same augmentation to the same sample, and a run resumed
mid-epoch, at this or another number of ranks, repeats an uninterrupted one. DALI applies them with
its operators (crackio/loading/dali_backend.py); the torch backend with `augment_image` below.
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


def normalize_into(image: np.ndarray, out: np.ndarray) -> None:
    """`normalize` for one uint8 H x W x 3 image (the CPU path's augmented crop), written into `out` (float32
    H x W x 3, e.g. one image of the batch's buffer): OpenCV's `cv2.LUT` with NORMALIZE_TABLE, one pass that
    reads 1 byte and writes 4 per value (5x faster than subtracting and scaling the stacked batch in torch, on one
    core), equal to `normalize` bit for bit."""
    import cv2

    cv2.LUT(image, NORMALIZE_TABLE, dst=out)


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


def augment_image(hwc: np.ndarray, brightness: float, flip: int, angle: float) -> np.ndarray:
    """One uint8 H x W x 3 image, augmented on the CPU with OpenCV (the torch backend's worker threads), returned
    H x W x 3 (the caller stacks a batch and views it as N x 3 x H x W, channels_last, without a copy).

    OpenCV because the CPU rotation is what bounds a CPU pipeline: DALI's fn.rotate halves the DALI CPU
    pipeline's rate and torch's grid_sample is slower still, while cv2.warpAffine (nearest, the flip folded
    into its matrix) costs ~0.25 ms and releases the GIL. Brightness goes last: a per-pixel scale commutes
    with copying pixels and with the zero fill, so the result equals brightness-flip-rotate (the original's
    order); `convertScaleAbs` rounds half to even and saturates, as `augment` does.
    """
    import cv2

    size = hwc.shape[1], hwc.shape[0]
    out = cv2.warpAffine(
        hwc,
        warp_matrix(angle, flip, hwc.shape[1]),
        size,
        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    return cv2.convertScaleAbs(out, alpha=float(brightness))
