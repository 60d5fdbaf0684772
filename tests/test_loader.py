"""make_loader on CPU, DALI CPU mode and the torch backend: attachment, exact epochs, order, ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crackio import Batch, ShardError, make_loader
from crackio.format.index import load_index
from crackio.loading.augment import MEAN, STD, augment_into, brighten_into, normalize
from crackio.loading.readers import BlockReader, ByteReader
from crackio.writing.filenames import parse_name
from tests.conftest import BACKENDS, DEVICES, code_color, decode_id, needs_cuda, needs_dali
from tests.helpers import record_index


def center_rgb(images: torch.Tensor) -> np.ndarray:
    """Mean colour (0-255) of the central 8x8 patch of each image, normalization undone."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    raw = (images.cpu() * std + mean) * 255
    return raw[:, :, 108:116, 108:116].mean(dim=(2, 3)).numpy()


def collect(loader) -> list[Batch]:
    return list(loader)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_epoch_every_sample_once_with_its_label_iou_and_pixels(coded_shards, backend, device):
    loader = make_loader(coded_shards, "valid", batch_size=8, train=False, backend=backend, device=device)
    batches = collect(loader)
    assert len(batches) == len(loader) == 5  # 37 samples: every one, no padding
    names = [n for b in batches for n in b.names]
    assert len(names) == len(set(names)) == 37
    for b in batches:
        assert b.images.shape[1:] == (3, 224, 224) and b.images.dtype == torch.float32
        assert b.images.device.type == device and b.labels.device.type == device
        for name, label, iou, rgb in zip(b.names, b.labels, b.ious, center_rgb(b.images)):
            p = parse_name(name)
            assert decode_id(rgb) == p.proposal, "image detached from its name"
            assert abs(float(iou) - p.iou) < 1e-6
            assert float(label) == float(p.iou > 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_epoch_keeps_images_attached_under_augmentation(coded_shards, backend, device):
    loader = make_loader(coded_shards, "train", batch_size=16, train=True, backend=backend, device=device, seed=5)
    ids, params = loader.plan(0)
    batches = collect(loader)
    assert len(batches) == 100 // 16  # the partial last batch is dropped in training
    for b, p in zip(batches, params):
        got = center_rgb(b.images)
        for name, rgb, factor in zip(b.names, got, p.brightness):
            expected = np.clip(np.round(np.array(code_color(parse_name(name).proposal)) * factor), 0, 255)
            assert np.abs(rgb - expected).max() < 4, (name, rgb, expected)
    # Rotation leaves black (normalized: -mean/std) corners on most images.
    corner = batches[0].images[:, :, :4, :4].mean(dim=(1, 2, 3)).cpu()
    black = float(np.mean(-np.array(MEAN) / np.array(STD)))
    assert (corner - black).abs().lt(0.1).float().mean() > 0.3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train, output", [(True, "float32"), (True, "uint8"), (False, "float32")])
def test_the_loader_times_each_stage_of_its_epoch(coded_shards, backend, train, output):
    loader = make_loader(coded_shards, "train", batch_size=16, train=train, backend=backend, output=output, workers=2)
    batches = collect(loader)
    stats = loader.stage_stats
    assert stats.images == sum(len(b.labels) for b in batches) and stats.batches == len(batches) == len(loader)
    ran = stats.per_image_ms()
    if backend == "torch":  # every stage a CPU batch goes through, timed in its thread
        expected = (
            {"read", "decode"} | ({"augment"} if train else set()) | ({"normalize"} if output == "float32" else set())
        )
        assert set(ran) == expected  # uint8 output has no normalize stage
    else:  # DALI's decode, augmentation and normalization are one pipeline
        assert set(ran) <= {"read", "pipeline"} and "read" in ran
    assert all(v > 0 for v in ran.values()) and stats.slowest() in ran
    row = stats.row()
    assert row["slowest_stage"] == stats.slowest() and row["handover_wait_ms"] >= 0
    assert {f"stage_{s}_ms" for s in ran} <= set(row)
    assert f"slowest stage {stats.slowest()}" in stats.describe()
    if backend == "torch":  # its own queue: batches in flight, and of them ready, at each hand-over
        assert row["batches_in_flight"] >= 1 and 0 <= row["batches_ready"] <= row["batches_in_flight"]
        assert "batches in flight ready at a hand-over" in stats.describe()
    else:  # DALI's queue is its own: nothing made up
        assert "batches_in_flight" not in row and "batches_ready" not in row
        if stats.slowest() == "pipeline":
            assert "the consumer's wait" in stats.describe()
    collect(loader)  # the next epoch starts its own figures
    assert loader.stage_stats is not stats and loader.stage_stats.batches == len(loader)


def test_stage_figures_of_known_batches():
    from crackio.loading.stages import StageStats

    stats = StageStats(workers=2)
    assert stats.describe() == "no batch yet" and stats.row() == {}
    stats.add({"read": 0.01, "decode": 0.04, "augment": 0.02}, 10, 0.5, in_flight=4, ready=0)  # starved
    stats.add({"read": 0.01, "decode": 0.04, "augment": 0.02}, 10, 0.0, in_flight=4, ready=3)
    row = stats.row()
    assert row == {
        "stage_read_ms": 1.0,
        "stage_decode_ms": 4.0,
        "stage_augment_ms": 2.0,
        "handover_wait_ms": 250.0,
        "batches_in_flight": 4.0,
        "batches_ready": 1.5,
        "slowest_stage": "decode",
    }
    assert stats.describe() == (
        "slowest stage decode (4.00 ms per image, over 2 threads; ms per image: read 1.00, decode 4.00, "
        "augment 2.00; 1.5 of 4.0 batches in flight ready at a hand-over)"
    )
    dali = StageStats(workers=2)
    dali.add({"read": 0.001, "pipeline": 0.03}, 10, 0.03)  # a backend whose queue is its own
    assert "batches_in_flight" not in dali.row() and "in flight" not in dali.describe()
    assert dali.describe().startswith("slowest stage pipeline (3.00 ms per image, the consumer's wait;")


@needs_dali
@pytest.mark.parametrize("device", DEVICES)
def test_backends_agree_on_eval_and_on_train_given_the_same_parameters(coded_shards, demo_shards, device):
    for split, train in (("valid", False), ("train", True)):
        a = collect(make_loader(demo_shards, split, batch_size=8, train=train, backend="dali", device=device))
        b = collect(make_loader(demo_shards, split, batch_size=8, train=train, backend="torch", device=device))
        assert [x.names for x in a] == [x.names for x in b]
        for x, y in zip(a, b):
            diff = (x.images - y.images).abs()
            # CPU: the same libjpeg-turbo decode, so eval is exact and train differs only where nearest-neighbour
            # rotation rounds a pixel centre the other way. CUDA: DALI's nvJPEG (or the hardware decoder) and
            # torchvision's nvJPEG may round the IDCT apart: within 0.02 of a normalized unit on average.
            assert diff.mean() < ((1e-6 if not train else 1e-3) if device == "cpu" else 0.02)
            assert torch.equal(x.labels, y.labels) and torch.equal(x.ious, y.ious)


def test_order_is_a_pure_function_of_seed_epoch_rank(demo_shards):
    def order(seed, epoch, **kw):
        loader = make_loader(
            demo_shards, "train", batch_size=4, train=True, seed=seed, backend="torch", device="cpu", **kw
        )
        return np.concatenate(loader.batches(epoch))

    assert np.array_equal(order(0, 0), order(0, 0))
    assert not np.array_equal(order(0, 0), order(0, 1))
    assert not np.array_equal(order(0, 0), order(1, 0))
    # Epochs are exact: a shuffle epoch is a permutation (minus the dropped tail).
    n = len(load_index(demo_shards, "train"))
    assert len(set(order(0, 0))) == len(order(0, 0)) == n - n % 4


def test_iteration_advances_the_epoch_and_epoch_can_be_set(demo_shards):
    kw = dict(batch_size=16, train=True, seed=2, backend="auto", device="cpu")
    loader = make_loader(demo_shards, "train", **kw)
    first = [b.names for b in loader]
    second = [b.names for b in loader]
    assert first != second and loader.epoch == 2
    resumed = make_loader(demo_shards, "train", **kw)
    resumed.epoch = 1
    assert [b.names for b in resumed] == second
    # An abandoned epoch still counts, and the next one starts clean.
    partial = make_loader(demo_shards, "train", **kw)
    next(iter(partial))
    assert [b.names for b in partial] == second


@pytest.mark.parametrize("train", [True, False])
def test_ranks_are_disjoint_complete_and_equal(demo_shards, train):
    world = 3
    loaders = [
        make_loader(
            demo_shards, "valid", batch_size=5, train=train, rank=r, world_size=world, backend="torch", device="cpu"
        )
        for r in range(world)
    ]
    per_rank = [loaders[r].batches(4) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1, "every rank needs the same number of batches"
    ids = [i for batches in per_rank for b in batches for i in b]
    n = len(load_index(demo_shards, "valid"))
    assert len(ids) == len(set(ids))
    if train:
        assert len(ids) == n - n % (5 * world)
    else:
        assert sorted(ids) == list(range(n))
        assert max(len(b) for batches in per_rank for b in batches) <= 5


def test_relabel_by_threshold(coded_shards):
    loader = make_loader(
        coded_shards, "valid", batch_size=64, train=False, iou_threshold=0.35, backend="torch", device="cpu"
    )
    (batch,) = collect(loader)
    assert torch.equal(batch.labels, (batch.ious > 0.35).float())
    assert batch.labels.sum() > sum(parse_name(n).label for n in batch.names)


def test_hard_negatives_loader_selects_like_the_original(demo_shards):
    loader = make_loader(
        demo_shards,
        "train",
        batch_size=1,
        train=False,
        sampler="hard-negatives",
        negatives=20,
        backend="torch",
        device="cpu",
    )
    names = [n for b in loader for n in b.names]
    index = load_index(demo_shards, "train")
    labels = index.labels
    assert sum(1 for n in names if parse_name(n).label == 0) == 20
    assert sum(1 for n in names if parse_name(n).label == 1) == int(labels.sum())


def test_bad_arguments_and_mismatched_index(demo_shards, tmp_path):
    with pytest.raises(ValueError, match="unknown sampler"):
        make_loader(demo_shards, "train", batch_size=4, train=True, sampler="nope", device="cpu")
    with pytest.raises(ValueError, match="takes"):
        make_loader(demo_shards, "train", batch_size=4, train=True, sampler="shuffle", negatives=3, device="cpu")
    with pytest.raises(ValueError, match="backend must be"):
        make_loader(demo_shards, "train", batch_size=4, train=True, backend="tf", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            make_loader(demo_shards, "train", batch_size=4, train=True, device="cuda")
    with pytest.raises(ValueError, match="cannot fill one batch"):
        make_loader(demo_shards, "valid", batch_size=10_000, train=True, device="cpu").batches(0)

    import shutil

    broken = tmp_path / "s"
    shutil.copytree(demo_shards, broken)
    index = np.load(broken / "train" / "index.npy")
    index["offset"] += 512  # points at the wrong bytes, tar sizes still match the manifest
    np.save(broken / "train" / "index.npy", index)
    with pytest.raises(
        ShardError,
        match=r"index.npy is not the index .*manifest.json records .*write the pack again with `python tools/pack",
    ):
        make_loader(broken, "train", batch_size=4, train=True, device="cpu")
    record_index(broken)  # recorded too (a writer's bug): every sample's CRC32 still catches it
    with pytest.raises(ShardError, match=r"does not match its checksum.*write the pack again with `python tools/pack"):
        make_loader(broken, "train", batch_size=4, train=True, device="cpu")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_backends_match_cpu(demo_shards, backend, train):
    """DALI's mixed decoder and GPU operators, or nvJPEG through torchvision and the batched augmentation on the
    device, against the same backend on the CPU (libjpeg-turbo, OpenCV): the same samples, and pixels within
    0.02 of a normalized unit on average (about 1 grey level; nvJPEG's IDCT and the GPU rotation's rounding
    differ from the CPU's), at most 1% of pixels off by more than 0.1."""
    kw = dict(batch_size=8, train=train, backend=backend, seed=3, output="uint8")
    gpu = collect(make_loader(demo_shards, "valid", device="cuda", **kw))
    cpu = collect(make_loader(demo_shards, "valid", device="cpu", **kw))
    assert len(gpu) == len(cpu)
    for g, c in zip(gpu, cpu):
        assert g.images.device.type == "cuda" and g.names == c.names
        diff = (g.images.cpu().float() - c.images.float()).abs() / 255 / 0.226  # in normalized units
        assert diff.mean() < 0.02 and (diff > 0.1).float().mean() < 0.01


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_batches_are_ready_on_the_consumers_stream(demo_shards, backend):
    """Batches handed over on a side stream (the trainer's, when it overlaps copies) equal those on the default
    stream: DALI's feed_ndarray and the torch backend copy on the current stream."""
    kw = dict(batch_size=8, train=True, backend=backend, seed=3, device="cuda", output="uint8")
    default = [b.images.cpu() for b in make_loader(demo_shards, "train", **kw)]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = [b.images.sum(dtype=torch.int64).item() for b in make_loader(demo_shards, "train", **kw)]
    assert got == [int(x.sum(dtype=torch.int64)) for x in default]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True])
def test_uint8_output_is_the_float_output_before_normalization(coded_shards, backend, train, device):
    from crackio.loading.augment import normalize

    kw = dict(batch_size=16, train=train, backend=backend, device=device, seed=4)
    floats = next(iter(make_loader(coded_shards, "train", **kw)))
    raw = next(iter(make_loader(coded_shards, "train", output="uint8", **kw)))
    assert raw.images.dtype == torch.uint8 and raw.names == floats.names
    assert torch.allclose(normalize(raw.images), floats.images, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_cpu_augmentation_equals_the_batched_reference(device):
    """OpenCV's one-warp flip + rotation + brightness (the CPU path) against the batched torch augmentation (the
    CUDA path), run on each device."""
    from crackio.loading.augment import augment, draw_params

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (32, 3, 224, 224), dtype=np.uint8))
    params = draw_params(32, seed=1, epoch=0, step=0)
    reference = augment(images.to(device), params).cpu()
    out = np.empty((32, 224, 224, 3), np.uint8)  # the CPU path writes H x W x 3 crops into the batch's buffer
    for i in range(32):
        augment_into(images[i].permute(1, 2, 0).numpy(), params.brightness[i], params.flip[i], params.angle[i], out[i])
    mine = torch.from_numpy(out).permute(0, 3, 1, 2)
    differ = (mine.int() - reference.int()).abs() > 0
    assert differ.float().mean() < 0.002  # only where a rotated pixel centre lies on a rounding boundary
    # float32 output: brightness and normalization in one lookup equal normalizing the uint8 result, bit for bit
    floats = np.empty((32, 224, 224, 3), np.float32)
    for i in range(32):
        augment_into(
            images[i].permute(1, 2, 0).numpy(), params.brightness[i], params.flip[i], params.angle[i], floats[i]
        )
    assert torch.equal(torch.from_numpy(floats).permute(0, 3, 1, 2), normalize(mine))


def test_the_cpu_paths_normalizing_lookup_is_normalize_bit_for_bit():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    images[0, :2, :, 0] = np.arange(448).reshape(2, 224) % 256  # every value of one channel at least once
    out = np.empty(images.shape, np.float32)
    for image, into in zip(images, out):
        brighten_into(image, 1.0, into)  # brightness 1: the lookup is the normalization alone
    expected = normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(torch.from_numpy(out).permute(0, 3, 1, 2), expected)
    scaled = images.copy()
    brighten_into(scaled, 1.37, scaled)  # uint8 in place: convertScaleAbs, saturating, half to even
    assert np.array_equal(scaled, np.clip(np.rint(images * np.float32(1.37)), 0, 255).astype(np.uint8))


def test_augmentation_parameters_follow_the_originals_distribution():
    from crackio.loading.augment import draw_params

    p = draw_params(200_000, seed=0, epoch=0, step=0)
    assert 0.5 <= p.brightness.min() and p.brightness.max() <= 1.5 and abs(p.brightness.mean() - 1) < 0.01
    assert abs(p.flip.mean() - 0.5) < 0.01 and set(np.unique(p.flip)) == {0, 1}
    assert -180 <= p.angle.min() and p.angle.max() <= 180 and abs(p.angle.mean()) < 1.5
    assert abs(np.histogram(p.angle, bins=8, range=(-180, 180))[0] / len(p.angle) - 1 / 8).max() < 0.01


def test_simplejpeg_and_torchvision_decode_the_same_pixels(demo_shards):
    """The torch backend decodes train images with simplejpeg and eval ones with torchvision: one libjpeg-turbo."""
    import simplejpeg
    from torchvision.io import decode_jpeg

    index = load_index(demo_shards, "train")
    from crackio.loading.readers import ByteReader

    for data in ByteReader(index).read(np.arange(min(64, len(index)))):
        tv = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0).numpy()
        assert np.array_equal(simplejpeg.decode_jpeg(data, colorspace="RGB"), tv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_order_keeps_images_attached_and_reads_every_planned_sample(coded_shards, backend, device):
    loader = make_loader(
        coded_shards,
        "train",
        batch_size=8,
        train=True,
        backend=backend,
        device=device,
        seed=2,
        order="block",
        block_size=7,
        window=2,
    )
    assert isinstance(loader.reader, BlockReader)
    ids, params = loader.plan(0)
    assert sorted(np.concatenate(ids)) == sorted(set(np.concatenate(ids)))  # shuffle: each row at most once
    assert len(ids) == 100 // 8  # the same steps as random order
    for b, p, planned in zip(collect(loader), params, ids):
        assert b.names == loader.index.filenames(planned)
        for name, rgb, factor in zip(b.names, center_rgb(b.images), p.brightness):
            expected = np.clip(np.round(np.array(code_color(parse_name(name).proposal)) * factor), 0, 255)
            assert np.abs(rgb - expected).max() < 4, (name, rgb, expected)
    assert loader.reader._held == 0 and not loader.reader._buffers  # every block freed after its last read


def test_block_order_is_the_same_on_both_backends_and_on_resume(demo_shards):
    def names(backend, epoch):
        loader = make_loader(
            demo_shards, "train", batch_size=8, train=True, backend=backend, device="cpu", order="block", block_size=16
        )
        loader.epoch = epoch  # resume at this epoch
        return [b.names for b in collect(loader)]

    assert names("torch", 1) == names(BACKENDS[-1], 1) != names("torch", 0)
    eval_block = make_loader(demo_shards, "valid", batch_size=8, train=False, device="cpu", order="block")
    eval_random = make_loader(demo_shards, "valid", batch_size=8, train=False, device="cpu")
    assert [b.names for b in collect(eval_block)] == [b.names for b in collect(eval_random)]


def test_block_reader_serves_a_sample_from_an_unbuffered_block_directly(coded_shards):
    from crackio.format.index import load_index

    reader = BlockReader(load_index(coded_shards, "train"), block_size=5, budget=1)  # buffers one block at most
    plan = [np.arange(100)[::-1].copy()]  # the reverse of the read-ahead's order of first use
    reader.prefetch(plan)
    assert reader.read(np.arange(100)) == ByteReader(load_index(coded_shards, "train")).read(np.arange(100))


def test_order_options_are_checked(demo_shards):
    for bad in ({"order": "sequential"}, {"block_size": 0}, {"window": 0}, {"block_size": 2.5}):
        with pytest.raises(ValueError, match="order must be|(block_size|window) must be an integer"):
            make_loader(demo_shards, "train", batch_size=8, train=True, device="cpu", **bad)


@needs_dali
def test_a_dali_loader_refuses_a_second_concurrent_epoch(demo_shards):
    loader = make_loader(demo_shards, "train", batch_size=8, train=True, backend="dali", device="cpu")
    first = iter(loader)
    next(first)
    with pytest.raises(ValueError, match="already iterating an epoch"):
        next(iter(loader))
    first.close()
    assert len(list(loader)) == len(loader)  # after close, the next epoch runs whole


def test_block_order_messages_and_integer_types(demo_shards):
    with pytest.raises(ValueError, match="cannot fill one batch of 16 on 40 rank"):
        make_loader(
            demo_shards, "valid", batch_size=16, train=True, device="cpu", order="block", rank=0, world_size=40
        ).batches(0)
    loader = make_loader(
        demo_shards, "train", batch_size=8, train=True, device="cpu", order="block", block_size=np.int64(32)
    )
    assert loader.traversal.block_size == 32 and type(loader.traversal.block_size) is int
    with pytest.raises(ValueError, match="block_size must be an integer"):
        make_loader(demo_shards, "train", batch_size=8, train=True, device="cpu", block_size=True)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"batch_size": 32.0}, "batch_size must be an integer >= 1"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"seed": True}, "seed must be an integer"),
        ({"world_size": True, "rank": False}, "rank must be an integer"),
        ({"block_size": np.uint64(2**64 - 1)}, "block_size must be an integer"),
    ],
)
def test_loader_arguments_are_integers_or_one_clear_error(demo_shards, kw, message):
    with pytest.raises(ValueError, match=message):
        make_loader(demo_shards, "train", **{"batch_size": 8, **kw}, train=True, device="cpu")


def test_sampler_options_take_numpy_integers(demo_shards):
    loader = make_loader(
        demo_shards, "train", batch_size=8, train=True, device="cpu", sampler="hard-negatives", negatives=np.int64(50)
    )
    assert loader.sampler.negatives == 50 and type(loader.sampler.negatives) is int
