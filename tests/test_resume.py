"""Stop anywhere, resume anywhere (crackio.loading.loader.Loader.state_dict / load_state_dict): for every
sampler and both orders, global batches (samples and their augmented pixels) do not depend on the number of
ranks, and a state saved at one world size resumes at another with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from crackio import make_loader
from crackio.loading.mixture import pack_names
from tests.conftest import BACKENDS, DEVICES, needs_cuda
from tests.helpers import TINY_ARGS, StopPoint, tiny, torchrun, without_timing
from train.run.checkpoint import STEP
from train.run.resume import resume_settings

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

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


def loaders(shards, world, sampler, options, order, backend="torch", device="cpu", **kw):
    return [
        make_loader(
            shards,
            "train",
            batch_size=GLOBAL // world,
            train=True,
            sampler=sampler,
            seed=5,
            device=device,
            backend=backend,
            rank=r,
            world_size=world,
            workers=1,
            output="uint8",
            order=order,
            **({"block_size": 6, "window": 2} if order == "block" else {}),  # what block order reads by
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
        step = [(n, x.tobytes()) for batch in batches for n, x in zip(batch.names, batch.images.cpu().numpy())]
        out.append(sorted(step))
        if count is not None and len(out) == count:
            break
    return out


# The block order also in test_loader (fast); here with every sampler at three world sizes: slow.
@pytest.mark.parametrize("order", ["random", pytest.param("block", marks=pytest.mark.slow)])
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resumed_epoch_on_each_backend_continues_the_uninterrupted_one(demo_shards, backend, device):
    (whole,) = loaders(demo_shards, 1, "shuffle", {}, "random", backend, device)
    expected = steps([whole])
    (stopped,) = loaders(demo_shards, 1, "shuffle", {}, "random", backend, device)
    it = iter(stopped)
    next(it)
    state = stopped.state_dict()  # mid-iteration: the batch handed out counts
    assert state["samples"] == GLOBAL
    (resumed,) = loaders(demo_shards, 1, "shuffle", {}, "random", backend, device)
    resumed.load_state_dict(state)
    assert steps([resumed]) == expected[1:]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["random", "block"])
def test_global_batches_on_the_gpu_do_not_depend_on_the_world_size(demo_shards, backend, order):
    """On CUDA the pixels may differ from the CPU's (nvJPEG), but not between world sizes on the same device."""
    (single,) = loaders(demo_shards, 1, "weighted", {"replacement": True}, order, backend, "cuda")
    whole = steps([single])
    pair = loaders(demo_shards, 2, "weighted", {"replacement": True}, order, backend, "cuda")
    assert steps(pair, STOP) == whole[:STOP]
    resumed = loaders(demo_shards, 4, "weighted", {"replacement": True}, order, backend, "cuda")
    for loader in resumed:
        loader.load_state_dict(pair[0].state_dict())
    assert steps(resumed) == whole[STOP:]


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
        ({"iou_threshold": 0.3}, r"other labels \(iou_threshold\)"),
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
    bad_states = [
        None,
        {},
        {k: v for k, v in state.items() if k != "iou_threshold"},  # a missing key is not read as None
        {**state, "epoch": "1"},
        {**state, "epoch": -1},
        {**state, "epoch": True},
        {**state, "epoch": 10**30},
        {**state, "samples": 3},
    ]
    for bad in bad_states:
        with pytest.raises(ValueError, match="loader state") as e:
            loader.load_state_dict(bad)
        assert "\n" not in str(e.value)
    loader.load_state_dict({**state, "epoch": np.int64(1), "samples": np.int64(GLOBAL)})  # numpy integers are integers
    assert (loader.epoch, loader.step) == (1, 1)
    loader.epoch = 1  # the epoch it stands in: a set_epoch at the top of each epoch keeps the position
    assert loader.step == 1
    loader.epoch = 2
    assert loader.step == 0


# ---- the trainer: mid-epoch checkpoints, SIGTERM, --resume RUN or RUN/<checkpoint>, 2 ranks -> 1 ------------------


def train_cmd(shards, out, *extra):
    packs = [a for p in (shards if isinstance(shards, list) else [shards]) for a in ("--shards", str(p))]
    return [
        sys.executable, "-m", "train", *packs, "--out", str(out), *TINY_ARGS, "--head", "linear",
        "--epochs", "2", "--batch-size", "8", "--workers", "1", *extra,
    ]  # fmt: skip


def run_ok(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def stop_after_a_checkpoint(cmd, out, code=128 + signal.SIGTERM):
    """Start `cmd`, SIGTERM it once it has written out/step.pt (stopped there, every process of it: it cannot end
    first); returns its stderr (exit code `code`)."""
    stop = StopPoint(out.parent / f"stop-{out.name}", file=STEP, root=out)
    proc = stop.start(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop.signal(signal.SIGTERM)
    stop.resume()
    try:
        _, err = proc.communicate(timeout=300)  # a hang guard only
    finally:
        stop.kill()
    assert proc.returncode == code, err[-3000:]
    return err


def final(out):
    ckpt = torch.load(out / "last.pt", weights_only=True)
    history = without_timing(ckpt["history"])
    return ckpt["model"], history


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_resumes_bit_identical(demo_shards, tmp_path, capsys):
    from train.__main__ import main as cli

    run_ok(train_cmd(demo_shards, tmp_path / "whole", "--checkpoint-every", "0"))
    out = tmp_path / "stopped"
    err = stop_after_a_checkpoint(train_cmd(demo_shards, out, "--checkpoint-every", "3"), out)
    assert f"{out / STEP} holds epoch 1 after" in err and f"--resume {out}" in err
    assert not (out / "last.pt").exists()  # stopped within the first epoch
    state = torch.load(out / STEP, weights_only=True)["progress"]["loader"]
    assert state["epoch"] == 0 and 0 < state["samples"] < 160 and state["samples"] % 8 == 0
    resume = [sys.executable, "-m", "train", "--resume"]
    for extra, message in (
        ([str(out / "nope.pt")], f"--resume {out / 'nope.pt'}: no such checkpoint; {out} holds step.pt"),
        ([str(out), "--order", "block"], f"{out / STEP} cannot continue its epoch with these settings"),
    ):
        code, err = cli(["--resume", *extra]), capsys.readouterr().err  # refused before anything runs: in-process
        assert code == 2 and message in err, err[-2000:]
        assert "--order" in err or "nope" in extra[0]
    done = run_ok([*resume, str(out / STEP)])  # a checkpoint file, as timm takes it
    assert f"resuming {out / STEP}: epoch 1 after {state['samples']} samples" in done.stdout
    weights, history = final(out)
    whole_weights, whole_history = final(tmp_path / "whole")
    assert history == whole_history and [r["train_samples"] for r in history] == [160, 160]
    assert all(torch.equal(weights[k], whole_weights[k]) for k in whole_weights)
    assert not (out / STEP).exists()  # older than last.pt once an epoch ends


def test_resume_takes_a_run_folder_or_a_checkpoint_in_it(demo_shards, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    tiny(demo_shards, run).for_world(2).save(run / "config.json", "0" * 32)  # as a 2-rank run saves it: 16 per rank
    for name in ("last.pt", "best.pt", STEP):
        (run / name).write_bytes(b"")
    for given in (run, run / "last.pt", run / "best.pt", run / STEP):
        cfg = resume_settings(given, epochs=3)
        assert (cfg.checkpoints.out, cfg.checkpoints.resume, cfg.optim.epochs, cfg.optim.global_batch_size) == (
            str(run),
            str(given),
            3,
            32,
        )
    with pytest.raises(ValueError, match="keeps the run's global batch of 32 .* --batch-size 16 x 1 rank"):
        resume_settings(run, batch_size=16)
    assert resume_settings(run, batch_size=32).for_world(1).optim.batch_size == 32
    assert resume_settings(run).for_world(4).optim.batch_size == 8
    with pytest.raises(ValueError, match="cannot be shared equally by 3 ranks"):
        resume_settings(run).for_world(3)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resume_settings(run, batch_size=8).optim.batch_size == 8


@pytest.mark.slow
def test_a_run_stopped_at_two_ranks_resumes_at_one_with_the_same_global_batch(demo_shards, coded_shards, tmp_path):
    """On a mixture of two packs (crackio.loading.mixture): its epochs are global too."""
    packs, mix = [demo_shards, coded_shards], ("--mix", "0.3,0.7")
    out = tmp_path / "elastic"
    two = train_cmd(packs, out, "--checkpoint-every", "3", "--global-batch-size", "8", "--epochs", "1", *mix)
    two[two.index("--batch-size") : two.index("--batch-size") + 2] = []
    err = stop_after_a_checkpoint(
        [*torchrun(2), *two[1:]], out, code=1
    )  # torchrun's own exit code after forwarding SIGTERM
    assert err.count(f"interrupted by SIGTERM: {out / STEP} holds epoch 1 after") == 1  # rank 0's line
    saved = torch.load(out / STEP, weights_only=True)
    assert saved["progress"]["loader"]["world_size"] == 2 and saved["progress"]["loader"]["global_batch_size"] == 8
    assert json.loads((out / "config.json").read_text())["batch_size"] == 4
    run_ok([sys.executable, "-m", "train", "--resume", str(out)])  # one rank: 8 per rank
    assert json.loads((out / "config.json").read_text())["batch_size"] == 8
    run_ok(train_cmd(packs, tmp_path / "one", "--epochs", "1", *mix))
    weights, history = final(out)
    reference, reference_history = final(tmp_path / "one")
    assert history[0]["train_samples"] == reference_history[0]["train_samples"] == 256  # 32 steps of 260 samples
    names = pack_names([str(p) for p in packs])
    shares = [history[0][f"{name}/train_samples"] for name in names]
    assert shares == [reference_history[0][f"{name}/train_samples"] for name in names]
    assert abs(shares[0] - 0.3 * 256) <= 8  # 78 of 260 drawn from the first pack, 76-80 of them in full steps
    assert history[0]["train_digest"] == reference_history[0]["train_digest"]  # the same samples in each step
    # The same samples in the same global batches (tests above); BatchNorm sees 4 per rank instead of 8 for
    # the steps taken at two ranks, and gradients are summed in another order: the weights differ a little.
    a = torch.cat([weights[k].float().ravel() for k in reference if "running" not in k and "num_batches" not in k])
    b = torch.cat([reference[k].float().ravel() for k in reference if "running" not in k and "num_batches" not in k])
    relative = ((a - b).norm() / b.norm()).item()
    print(f"2 -> 1 ranks: weights differ by {relative:.3g} (relative L2), at most {(a - b).abs().max().item():.3g}")
    assert 0 < relative < 0.2


def test_the_global_batch_and_the_per_rank_batch_are_one_setting(demo_shards, capsys, monkeypatch):
    from tests.helpers import config
    from train.__main__ import main as cli

    args = ["--shards", str(demo_shards), *TINY_ARGS]
    assert cli([*args, "--batch-size", "8", "--global-batch-size", "12"]) == 2
    assert "--batch-size 8 (per rank) x 1 rank(s) is not --global-batch-size 12" in capsys.readouterr().err
    assert cli([*args, "--global-batch-size", "-1"]) == 2
    assert "--global-batch-size must be >= 0" in capsys.readouterr().err
    assert cli([*args, "--checkpoint-every", "-5"]) == 2
    assert "--checkpoint-every must be >= 0" in capsys.readouterr().err
    assert config(batch_size=8).for_world(4).optim.global_batch_size == 32
    assert config(batch_size=8, global_batch_size=12).for_world(3).optim.batch_size == 4  # the global batch rules
    monkeypatch.setenv("WORLD_SIZE", "2")
    import train.run.main

    monkeypatch.setattr(train.run.main, "main", lambda cfg: None)
    assert cli([*args, "--batch-size", "6", "--global-batch-size", "12"]) == 0  # 6 x 2 ranks


@pytest.mark.slow
def test_a_sweep_stopped_mid_epoch_resumes_its_variant_there(demo_shards, tmp_path):
    variants = tmp_path / "v.toml"
    variants.write_text('[[variant]]\nname = "a"\ntitle = "A"\n')

    def sweep(out, *extra):
        return [
            sys.executable, "-m", "train", "sweep", "--shards", str(demo_shards), "--variants", str(variants),
            "--out", str(out), *TINY_ARGS, "--head", "linear", "--epochs", "1", "--batch-size", "8",
            "--workers", "1", *extra,
        ]  # fmt: skip

    run_ok(sweep(tmp_path / "whole", "--checkpoint-every", "0"))
    stopped = tmp_path / "stopped"
    stop_after_a_checkpoint(sweep(stopped, "--checkpoint-every", "3"), stopped / "a")
    done = run_ok(sweep(stopped, "--checkpoint-every", "3"))  # the same command again
    assert f"resuming {stopped / 'a' / STEP}: epoch 1 after" in done.stdout
    weights, history = final(stopped / "a")
    reference, reference_history = final(tmp_path / "whole" / "a")
    assert history == reference_history and all(torch.equal(weights[k], reference[k]) for k in reference)
