"""The pipelines a user would write instead of crackio, for tools/bench.py: same cores, augmentation, samples.

seed-baseline    the original write-up's Dataset (PIL + torchvision v2 ColorJitter, flip, rotation,
                 normalize) in a DataLoader over the proposal folder
wds-dataloader   the `webdataset` library over the same shards (shard shuffle, a sample shuffle
                 buffer, PIL decode, the same v2 transforms) in a DataLoader, one worker per core
dali-reader      DALI's own `fn.readers.webdataset` with the `.idx` files, `random_shuffle=True`, and
                 the same decode / brightness / flip / rotation / normalize operators as crackio's
spdl             Meta's SPDL: `spdl.pipeline` over the proposal folder, PIL decode and the v2 transforms in
                 its thread pool (spdl.io decodes with FFmpeg's shared libraries, absent where FFmpeg is not
                 installed: PIL is what runs everywhere)
torchdata-nodes  torchdata.nodes over the proposal folder: a shuffling sampler, ParallelMapper with
                 threads (PIL decode + the v2 transforms), Batcher, Prefetcher, Loader
litdata          Lightning's LitData: `litdata.optimize` converts the folder into its chunks (the JPEG
                 bytes as they are), StreamingDataset(shuffle=True) + StreamingDataLoader with workers
mosaic-streaming Mosaic Streaming: `MDSWriter` converts the folder into MDS shards ('jpeg' column: the
                 JPEG bytes as they are), a StreamingDataset(shuffle=True) subclass in a DataLoader
Each peer but the original also runs with uint8 output (`-uint8`: the same augmentation, no float
conversion or normalization), as crackio's `-uint8` rows hand over.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


# Each peer beyond the original: the module it needs and the command that installs it (a row whose import fails
# is a skipped row that says this).
PEER_PACKAGES = {
    "spdl": ("spdl.pipeline", "pip install spdl"),
    "torchdata-nodes": ("torchdata.nodes", "pip install 'torchdata>=0.10'"),
    "litdata": ("litdata", "pip install litdata"),
    "mosaic-streaming": ("streaming", "pip install mosaicml-streaming"),
}
CONVERTED = ("litdata", "mosaic-streaming")  # the peers that read their own format, converted by their own tool


def original_transform(output: str = "float32"):
    """The write-up's training transforms (torchvision v2); output="uint8": the same augmentation, handed over as
    a uint8 3 x H x W tensor (no float conversion, no normalization)."""
    import torch
    from torchvision.transforms import v2

    augment = [v2.ColorJitter(brightness=0.5), v2.RandomHorizontalFlip(p=0.5), v2.RandomRotation(180), v2.ToImage()]
    if output == "uint8":
        return v2.Compose(augment)
    return v2.Compose([*augment, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=MEAN, std=STD)])


def missing(peer: str) -> str | None:
    """None when `peer`'s package imports here; else why not and the command that installs it."""
    return not_importable(*PEER_PACKAGES[peer])


def not_importable(module: str, command: str) -> str | None:
    """None when `module` imports here; else why not and `command`, which installs it."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken install (a dependency's import error) is a skipped row too
        return f"{type(e).__name__}: {e}; install with: {command}"
    return None


def label_of(name: str) -> int:
    """The label field of a proposal file name `<stem>.<proposal>.<iou>.<label>.<ext>` (right to left: dotted
    stems parse), as the original's Dataset reads it."""
    return int(name.rsplit(".", 4)[3])


def load_sample(folder: str, transform, name: str):
    """One proposal file: PIL decode, the transform, and its label."""
    from PIL import Image

    with Image.open(os.path.join(folder, name)) as image:
        return transform(image.convert("RGB")), label_of(name)


def collate(samples):
    """(images N x 3 x H x W, labels N) from a list of (image, label)."""
    import torch

    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])


def shuffled_forever(items: list, seed: int):
    """`items` in a new random order per pass, endlessly (an epoch per pass)."""
    rng = random.Random(seed)
    while True:
        order = list(items)
        rng.shuffle(order)
        yield from order


def spdl_loader(folder: Path, files: list[str], batch_size: int, threads: int, output: str, seed: int = 0):
    """SPDL's pipeline over the proposal folder: `threads` concurrent load+augment tasks, batches, a sink.
    Yields (images, labels) batches endlessly; the pipeline's thread stops when the process exits."""
    import atexit

    from spdl.pipeline import PipelineBuilder

    load = functools.partial(load_sample, str(folder), original_transform(output))
    pipeline: Any = (
        PipelineBuilder()
        .add_source(shuffled_forever(files, seed))
        .pipe(load, concurrency=threads)
        .aggregate(batch_size, drop_last=True)
        .pipe(collate)
        .add_sink(3)
        .build(num_threads=threads, max_failures=0)  # a file that fails stops the row (SPDL's default skips it)
    )
    pipeline.start()
    atexit.register(pipeline.stop)
    return pipeline.get_iterator()


def nodes_loader(folder: Path, files: list[str], batch_size: int, threads: int, output: str, seed: int = 0):
    """torchdata.nodes as its docs compose it: sampler -> ParallelMapper (threads) -> Batcher -> collate ->
    Prefetcher -> Loader. One pass per epoch; re-iterate for the next."""
    import torch
    import torchdata.nodes as tn
    from torch.utils.data import RandomSampler

    load = functools.partial(load_sample, str(folder), original_transform(output))
    sampler = RandomSampler(files, generator=torch.Generator().manual_seed(seed))
    node = tn.SamplerWrapper(sampler)
    node = tn.ParallelMapper(node, map_fn=lambda i: load(files[i]), num_workers=threads, method="thread")
    node = tn.Batcher(node, batch_size=batch_size, drop_last=True)
    node = tn.Mapper(node, collate)
    node = tn.Prefetcher(node, prefetch_factor=2)
    return tn.Loader(node)


def _litdata_item(path: str) -> dict:
    """What the LitData docs' image example stores: the opened image (a JPEG keeps its bytes) and the label."""
    from PIL import Image

    return {"image": Image.open(path), "label": label_of(os.path.basename(path))}


def convert_litdata(folder: Path, files: list[str], out: Path, workers: int) -> float:
    """`litdata.optimize` of the folder's `files` into `out`; returns the seconds it took."""
    import litdata

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    litdata.optimize(
        fn=_litdata_item,
        inputs=[str(folder / f) for f in files],
        output_dir=str(out),
        chunk_bytes="64MB",
        num_workers=workers,
        verbose=False,
    )
    return time.perf_counter() - start


def _litdata_transform(transform, item: dict):
    return transform(item["image"]), item["label"]


def litdata_loader(converted: Path, batch_size: int, workers: int, output: str, seed: int = 0):
    """LitData's StreamingDataset (shuffle) + StreamingDataLoader over the converted chunks (a local dir: no
    download). Its JPEG serializer decodes with torchvision where installed, so the transform gets a tensor."""
    import litdata

    transform = functools.partial(_litdata_transform, original_transform(output))
    dataset = litdata.StreamingDataset(str(converted), shuffle=True, drop_last=True, seed=seed, transform=transform)
    return litdata.StreamingDataLoader(
        dataset, batch_size=batch_size, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )


def convert_mosaic(folder: Path, files: list[str], out: Path) -> float:
    """Mosaic's `MDSWriter` (one process, as its docs write a dataset) of `files` into `out`; returns seconds."""
    from PIL import Image
    from streaming import MDSWriter

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with MDSWriter(out=str(out), columns={"image": "jpeg", "label": "int"}, size_limit="64mb") as writer:
        for name in files:
            with Image.open(folder / name) as image:
                writer.write({"image": image, "label": label_of(name)})
    return time.perf_counter() - start


def mosaic_loader(converted: Path, batch_size: int, workers: int, output: str, seed: int = 0):
    """A StreamingDataset subclass applying the transform (Mosaic's documented pattern) in a DataLoader."""
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    transform = original_transform(output)

    class Crops(StreamingDataset):
        def __getitem__(self, idx):
            item = super().__getitem__(idx)
            return transform(item["image"]), item["label"]

    dataset = Crops(local=str(converted), shuffle=True, shuffle_seed=seed, batch_size=batch_size)
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, drop_last=True, persistent_workers=workers > 0
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


def wds_dataloader(
    tars: list[str], batch_size: int, workers: int, buffer: int = 1000, resampled: bool = True, output: str = "float32"
):
    """The pipeline the `webdataset` documentation suggests, over crackio's shards.

    resampled=False: each worker reads its share of the tars once, in order (sequential reads, one pass).
    """
    import webdataset as wds
    from torch.utils.data import DataLoader

    transform = original_transform(output)
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
    output: str = "float32",
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
        if output == "uint8":  # the same augmentation handed over as uint8 CHW
            return fn.transpose(images, perm=[2, 0, 1])
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
            dtype = torch.uint8 if output == "uint8" else torch.float32
            out = torch.empty(batch.shape(), dtype=dtype, device="cuda" if gpu else "cpu")
            feed_ndarray(batch, out, cuda_stream=torch.cuda.current_stream() if gpu else None)
            yield out

    return batches()
