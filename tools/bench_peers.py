"""The pipelines a user would write instead of crackio, for tools/bench.py: same cores, augmentation, samples.

seed-baseline    the original write-up's Dataset (PIL + torchvision v2 ColorJitter, flip, rotation,
                 normalize) in a DataLoader over the proposal folder
wds-dataloader   the `webdataset` library over the same shards (shard shuffle, a sample shuffle
                 buffer, PIL decode, the same v2 transforms) in a DataLoader, one worker per core
dali-reader      DALI's own `fn.readers.webdataset` with the `.idx` files, `random_shuffle=True`, and
                 the same decode / brightness / flip / rotation / normalize operators as crackio's
"""

from __future__ import annotations

import os
from pathlib import Path

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def original_transform():
    """The write-up's training transforms (torchvision v2)."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ColorJitter(brightness=0.5),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomRotation(180),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=MEAN, std=STD),
        ]
    )


def listing(folder: Path) -> list[str]:
    """The original's directory listing, as published: every regular file of the folder."""
    return [f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))]


def seed_baseline(folder: Path, files: list[str], batch_size: int, workers: int):
    """The original's Dataset and DataLoader over `files` of `folder`.

    The bench passes the file names the shards hold (the index), so a folder with bad files still
    gets a baseline; the original, fed its own listing, would stop at the first bad file.
    """
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    class CrackDataset(Dataset):
        def __init__(self, directory, image_files):
            self.directory, self.image_files = directory, image_files
            self.transform = original_transform()

        def __len__(self):
            return len(self.image_files)

        def __getitem__(self, idx):
            name = self.image_files[idx]
            parts = name.rsplit(".", 4)  # right to left, so dotted stems parse
            image = Image.open(os.path.join(self.directory, name)).convert("RGB")
            return self.transform(image), name, float(parts[2].replace("_", ".")), int(parts[3])

    return DataLoader(
        CrackDataset(folder, files),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def wds_dataloader(tars: list[str], batch_size: int, workers: int, buffer: int = 1000, resampled: bool = True):
    """The pipeline the `webdataset` documentation suggests, over crackio's shards.

    resampled=False: each worker reads its share of the tars once, in order (sequential reads, one pass).
    """
    import webdataset as wds
    from torch.utils.data import DataLoader

    transform = original_transform()
    # resampled=True: every worker draws shards at random, endlessly (webdataset's setting for training streams).
    # Split by worker instead, a split with fewer tars than workers (3,520 crops fit one 10,000-sample shard)
    # would leave all workers but one idle: not what a user who read the docs would measure.
    source = (
        wds.WebDataset(tars, resampled=True, nodesplitter=wds.single_node_only, empty_check=False)
        if resampled
        else wds.WebDataset(tars, shardshuffle=False, nodesplitter=wds.single_node_only, empty_check=False)
    )
    dataset = (
        source.shuffle(buffer)
        .decode("pil")  # images with PIL; .json with json (nothing is unpickled: no .pyd/.pickle members)
        .to_tuple("jpg", "json")
        .map_tuple(transform, lambda meta: meta["label"])
        .batched(batch_size, partial=False)
    )
    return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def dali_reader(
    tars: list[str],
    batch_size: int,
    threads: int,
    seed: int = 0,
    shuffle: bool = True,
    device: str = "cpu",
    tensors: bool = False,
):
    """DALI's webdataset reader with crackio's augmentation operators (random draws inside DALI), on the CPU or
    (device="gpu") with the mixed decoder and GPU operators. Yields each batch's length, or with `tensors` the
    batch as a float32 N x 3 x 224 x 224 torch tensor on that device (to feed a model).

    shuffle=False: the tars in order, sequential reads."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device == "gpu"

    @pipeline_def(
        batch_size=batch_size, num_threads=threads, device_id=0 if gpu else None, seed=seed, prefetch_queue_depth=2
    )
    def pipeline():
        jpegs = fn.readers.webdataset(
            paths=tars,
            index_paths=[t[:-4] + ".idx" for t in tars],
            ext=["jpg"],
            random_shuffle=shuffle,
            initial_fill=1024,
            name="reader",
        )
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.brightness(images, brightness=fn.random.uniform(range=(0.5, 1.5)))
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
        images = fn.rotate(
            images,
            angle=fn.random.uniform(range=(-180.0, 180.0)),
            keep_size=True,
            fill_value=0,
            interp_type=types.INTERP_NN,
        )
        return fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD]
        )

    pipe = pipeline()
    pipe.build()

    def batches():
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        while True:
            (images,) = pipe.run()
            if not tensors:
                yield len(images)
                continue
            batch = images.as_tensor()
            out = torch.empty(batch.shape(), dtype=torch.float32, device="cuda" if gpu else "cpu")
            feed_ndarray(batch, out, cuda_stream=torch.cuda.current_stream() if gpu else None)
            yield out

    return batches()
