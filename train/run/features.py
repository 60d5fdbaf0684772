"""Features of the frozen fine-tuned backbone over a split, for R-CNN's post-hoc stages (the SVM stage,
bounding-box regression): the input of the backbone's last Linear, taken through the eval loader in the same pass
as the network head's probabilities, and cached per split (reused while the checkpoint and the shards are
unchanged)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from crackio.cli import progress_bar
from crackio.fsio import make_dir, save_npz
from crackio.storage.packs import RemoteSettings, open_pack
from train.evaluation.predict import forward_batches
from train.run.checkpoint import file_sha256
from train.run.evaluate import eval_loader
from train.run.model import last_linear
from train.run.runtime import amp_dtype

FIELDS = ("features", "probs", "labels", "ious", "names")


def extract(model, loader, amp, split: str) -> dict[str, np.ndarray]:
    """Backbone features, head probabilities, labels, IoUs and names of a whole split, in loader order."""
    grabbed = []
    # A forward pre-hook on the last Linear works for every torchvision classifier; create_feature_extractor
    # would need a per-architecture node name.
    hook = last_linear(model.backbone)[2].register_forward_pre_hook(
        lambda _module, args: grabbed.append(args[0].float().flatten(1).cpu())
    )
    probs, labels, ious, names = [], [], [], []
    try:
        batches = progress_bar(
            forward_batches(model, loader, amp), total=len(loader), desc=f"features {split}", unit="batch", leave=False
        )
        for batch, logits in batches:
            probs.append(torch.sigmoid(logits).cpu())
            labels.append(batch.labels.cpu())
            ious.append(batch.ious.cpu())
            names += batch.names
    finally:
        hook.remove()
    return {
        "features": torch.cat(grabbed).numpy(),
        "probs": torch.cat(probs).numpy(),
        "labels": torch.cat(labels).numpy().astype(np.int64),
        "ious": torch.cat(ious).numpy(),
        "names": np.array(names),
    }


def features_of(model, cfg, split: str, args) -> dict[str, np.ndarray]:
    """`extract` over the split's eval loader (`args`: the command's SvmSettings or BboxSettings)."""
    loader = eval_loader(cfg, split, args)
    return extract(model.to(loader.device), loader, amp_dtype(loader.device), split)


def checkpoint_digest(checkpoint: Path, shards: list[str], remote: RemoteSettings | None = None):
    """The checkpoint file and the packs (each manifest's SHA-256: a folder or a URL), hashed once; cache_key adds
    the split."""
    digest = file_sha256(checkpoint)
    for location in shards:
        digest.update(open_pack(location, remote).sha256.encode())
    return digest


def cache_key(digest, split: str, iou_threshold: float | None) -> str:
    digest = digest.copy()
    digest.update(f"{split}:{iou_threshold}".encode())
    return digest.hexdigest()


def cached_features(folder: Path, key: str, split: str, compute) -> dict[str, np.ndarray]:
    """The split's features from folder/<split>.npz when its key matches, else compute() and store them
    (a cache file that cannot be read is computed again and replaced).

    Raises:
        WriteError: the features cannot be stored (full disk, I/O error).
    """
    path = folder / f"{split}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as saved:  # data only: never unpickled
                if str(saved["key"]) == key:
                    cached = {k: saved[k] for k in FIELDS}
                    print(f"features {split}: cached in {path}")
                    return cached
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            print(f"features {split}: {path} is unreadable ({e}); computing them again")
    data = compute()
    make_dir(folder)
    save_npz(path, key=np.array(key), **data)
    return data
