"""Losses on logits: BCE (the original's Sigmoid + BCELoss, stable) and sigmoid focal loss."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from train.settings.learning import Bce, Focal


def make_loss(loss: Bce | Focal, device: torch.device):
    """A callable (logits, targets) -> mean loss, computed in float32 (safe under autocast)."""
    if isinstance(loss, Bce):
        weight = torch.tensor(loss.pos_weight, device=device) if loss.pos_weight > 0 else None
        bce = nn.BCEWithLogitsLoss(pos_weight=weight)
        return lambda logits, targets: bce(logits.float(), targets)
    # torchvision: alpha < 0 turns the class weighting off (the original's best run used -1).
    return lambda logits, targets: sigmoid_focal_loss(
        logits.float(), targets, alpha=loss.focal_alpha, gamma=loss.focal_gamma, reduction="mean"
    )
