"""Stop anywhere, resume anywhere (crackio.loading.loader.Loader.state_dict / load_state_dict): for every
sampler and both orders, global batches (samples and their augmented pixels) do not depend on the number of
ranks, and a state saved at one world size resumes at another with the same global batch."""

from __future__ import annotations

import json

import pytest

from crackio import make_loader
from tests.conftest import BACKENDS

SAMPLERS = [
    ("shuffle", {}),
    ("hard-negatives", {"negatives": 40}),
    ("iou-strata", {"per_bin": 6}),
    ("weighted", {"class_weights": {0: 1, 1: 3}, "replacement": True}),
    ("weighted", {"class_weights": {0: 1, 1: 3}, "replacement": False}),
    ("balanced", {"class_weights": {0: 1, 1: 1}}),
]
GLOBAL = 8  # the global batch: 8 x 1, 4 x 2, 2 x 4
STOP = 2  # global batches consumed before the state is saved


def loaders(shards, world, sampler, options, order, backend="torch", **kw):
    return [
        make_loader(
            shards,
            "train",
            batch_size=GLOBAL // world,
            train=True,
            sampler=sampler,
            seed=5,
            device="cpu",
            backend=backend,
            rank=r,
            world_size=world,
            workers=1,
            output="uint8",
            order=order,
            block_size=6,
            window=2,
            **options,
            **kw,
        )
        for r in range(world)
    ]


def steps(ranks, count=None):
    """Global batches from the ranks' loaders iterated in step: the sorted (sample name, uint8 image bytes) of
    each step (a list: weighting with replacement may draw a sample twice in one global batch)."""
    out = []
    for batches in zip(*ranks):
        step = [(n, x.tobytes()) for batch in batches for n, x in zip(batch.names, batch.images.numpy())]
        out.append(sorted(step))
        if count is not None and len(out) == count:
            break
    return out


@pytest.mark.parametrize("order", ["random", "block"])
@pytest.mark.parametrize("sampler, options", SAMPLERS, ids=lambda x: str(x) if isinstance(x, str) else "")
def test_a_state_saved_at_two_ranks_resumes_at_one_and_four(demo_shards, sampler, options, order):
    (single,) = loaders(demo_shards, 1, sampler, options, order)
    epochs = [steps([single]), steps([single])]  # an uninterrupted run: two epochs at one rank
    assert len(epochs[0]) > STOP

    pair = loaders(demo_shards, 2, sampler, options, order)
    first = steps(pair, STOP)
    assert first == epochs[0][:STOP]  # the same global batches and pixels at two ranks
    state = pair[0].state_dict()
    assert state == pair[1].state_dict()  # every rank's state is the same
    state = json.loads(json.dumps(state))  # plain data
    assert (state["epoch"], state["samples"], state["global_batch_size"]) == (0, STOP * GLOBAL, GLOBAL)

    for world in (1, 4):
        resumed = loaders(demo_shards, world, sampler, options, order)
        for loader in resumed:
            loader.load_state_dict(state)
        assert resumed[0].step == STOP and len(resumed[0]) == len(epochs[0])
        assert steps(resumed) == epochs[0][STOP:], f"world size {world}: the rest of epoch 0"
        assert steps(resumed) == epochs[1], f"world size {world}: epoch 1"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resumed_epoch_on_each_backend_continues_the_uninterrupted_one(demo_shards, backend):
    (whole,) = loaders(demo_shards, 1, "shuffle", {}, "random", backend)
    expected = steps([whole])
    (stopped,) = loaders(demo_shards, 1, "shuffle", {}, "random", backend)
    it = iter(stopped)
    next(it)
    state = stopped.state_dict()  # mid-iteration: the batch handed out counts
    assert state["samples"] == GLOBAL
    (resumed,) = loaders(demo_shards, 1, "shuffle", {}, "random", backend)
    resumed.load_state_dict(state)
    assert steps([resumed]) == expected[1:]


def test_the_end_of_an_epoch_reads_as_the_next_epoch(demo_shards):
    (loader,) = loaders(demo_shards, 1, "shuffle", {}, "random")
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["samples"] == 0
    for _ in loader:
        pass
    assert (loader.state_dict()["epoch"], loader.state_dict()["samples"]) == (1, 0)
    (other,) = loaders(demo_shards, 1, "shuffle", {}, "random")
    other.load_state_dict(loader.state_dict())
    assert other.epoch == 1 and other.step == 0


def test_an_evaluation_pass_resumes_at_its_own_world_size(demo_shards):
    def evals(world, batch=5):
        return [
            make_loader(
                demo_shards,
                "valid",
                batch_size=batch,
                train=False,
                device="cpu",
                backend="torch",
                rank=r,
                world_size=world,
                workers=1,
            )
            for r in range(world)
        ]

    whole = sorted(n for b in evals(1)[0] for n in b.names)
    ranks = evals(2)
    first = [n for x in ranks for n in next(iter(x)).names]
    state = ranks[0].state_dict()
    assert state["samples"] == len(first) == 10
    again = evals(2)
    for x in again:
        x.load_state_dict(state)
    rest = [n for x in again for b in x for n in b.names]
    assert sorted(first + rest) == whole  # every sample exactly once
    with pytest.raises(ValueError, match="evaluation resumes with its own batch size"):
        evals(1, 7)[0].load_state_dict(state)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seed": 6}, "another seed: seed 5 then, 6 now"),
        ({"split": "valid"}, "another split"),
        ({"sampler": "hard-negatives", "options": {"negatives": 10}}, "another sampler or sampler options"),
        ({"iou_threshold": 0.3}, r"other labels \(--iou-threshold\)"),
        ({"batch_size": 3}, "global batch of 8 .* this loader's is 3 .* make the per-rank batch 8"),
        ({"world_size": 3, "batch_size": 2}, "resume on a number of ranks that divides 8"),
        ({"order": "block"}, "keep the order until the epoch ends"),
    ],
)
def test_a_state_of_something_else_is_refused_in_one_line(demo_shards, change, message):
    (loader,) = loaders(demo_shards, 1, "shuffle", {}, "random")
    next(iter(loader))
    state = loader.state_dict()
    kw = dict(
        batch_size=change.get("batch_size", GLOBAL),
        train=True,
        seed=change.get("seed", 5),
        device="cpu",
        backend="torch",
        world_size=change.get("world_size", 1),
        workers=1,
        order=change.get("order", "random"),
        sampler=change.get("sampler", "shuffle"),
        iou_threshold=change.get("iou_threshold"),
        **change.get("options", {}),
    )
    other = make_loader(demo_shards, change.get("split", "train"), **kw)
    with pytest.raises(ValueError, match=message) as e:
        other.load_state_dict(state)
    assert "\n" not in str(e.value)


def test_another_pack_and_damaged_states_are_refused(demo_shards, coded_shards):
    (loader,) = loaders(demo_shards, 1, "shuffle", {}, "random")
    state = loader.state_dict()
    other = make_loader(coded_shards, "train", batch_size=GLOBAL, train=True, seed=5, device="cpu", backend="torch")
    with pytest.raises(ValueError, match="another pack"):
        other.load_state_dict(state)
    for bad in (None, {}, {"epoch": "1", "samples": 0}, {"epoch": -1, "samples": 0}, {**state, "samples": 3}):
        with pytest.raises(ValueError, match="loader state"):
            loader.load_state_dict(bad)
