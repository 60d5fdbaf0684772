"""`python -m train export`: a trained classifier as one ONNX file, checked against PyTorch with onnxruntime,
and that file read back for `python -m train detect --onnx`.

The graph: input `images`, uint8 (batch, 3, 224, 224) RGB 0-255 (the loaders' `output="uint8"`, a decoded
crop as is); inside it ImageNet normalization, the network and its sigmoid; output `crack_probability`,
float32 (batch,) P(crack). The batch axis is dynamic. The file's metadata carries what detection needs
besides the weights (the run's config, its proposal settings) and where it came from, so `detect --onnx`
needs no checkpoint. A file is written only after onnxruntime's probabilities on a split matched PyTorch's.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crackio import make_loader
from crackio.errors import ConfigError, MissingFile
from crackio.format.manifest import check_split
from crackio.fsio import NotRegular, atomic_write, display_name, read_regular, write_json
from crackio.loading.augment import SIZE
from crackio.storage.packs import open_pack
from crackio.writing.regions import ProposalSettings
from train.run.checkpoint import file_sha256, load_checkpoint, trained
from train.run.model import CrackClassifier, model_from_checkpoint
from train.settings.commands import ExportSettings
from train.settings.run import RunSettings

INPUT, OUTPUT = "images", "crack_probability"
OPSET = 18  # the lowest the torch.export-based exporter writes; onnxruntime >= 1.14 runs it
FORMAT = "1"  # crackio.format in the metadata: what detect --onnx reads (bump when that changes)
INSTALL = "pip install 'crackio[export]'"
# torch's own default exporter. From 2.9 on that is the torch.export-based one (dynamo=True), the one PyTorch
# maintains: the TorchScript exporter warns there that it is deprecated and will be removed. Before 2.9 the
# TorchScript exporter (the default then) is used: torch 2.5's dynamo exporter fails on every torchvision
# classifier with a dynamic batch (aten.view of the symbolic batch size: "unhashable type: 'list'").
DYNAMO = torch.__version__ >= "2.9"  # a TorchVersion: compared as a version, not as text


class ExportError(ConfigError):
    """An export whose check failed, or an ONNX file that `detect --onnx` cannot use."""


def onnx_modules(need_onnx: bool = True):
    """(onnx or None, onnxruntime), imported on first use: they are an optional extra.

    Raises:
        ConfigError: one of them is not installed; says what to install.
    """
    try:
        import onnxruntime

        if not need_onnx:
            return None, onnxruntime
        import onnx

        if DYNAMO:
            import onnxscript  # noqa: F401  # the torch.export-based exporter's translator
    except ImportError as e:
        raise ConfigError(f"ONNX export and detect --onnx need {e.name or 'onnx'}, which is missing: {INSTALL}") from e
    return onnx, onnxruntime


class Probabilities(nn.Module):
    """What the graph computes: uint8 images -> P(crack) (the classifier normalizes uint8 input itself)."""

    def __init__(self, model: CrackClassifier):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(images))


def to_onnx(model: CrackClassifier):
    """The model as an onnx.ModelProto with a dynamic batch axis (exported on the CPU, in eval mode)."""
    onnx, _ = onnx_modules()
    wrapped = Probabilities(model).cpu().eval()
    example = torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8)  # 2, not 1: a batch of 1 would be specialized
    with torch.no_grad():
        if DYNAMO:
            try:
                program = torch.onnx.export(
                    wrapped,
                    (example,),
                    dynamo=True,
                    input_names=[INPUT],
                    output_names=[OUTPUT],
                    opset_version=OPSET,
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                    verbose=False,
                )
            except ImportError as e:  # e.g. torch 2.14 with onnxscript < 0.6: "No module named ...torch_2_11"
                import onnxscript

                raise ConfigError(
                    f"torch {torch.__version__}'s ONNX exporter needs a newer onnxscript than {onnxscript.__version__} "
                    f"({e}): pip install --upgrade onnxscript"
                ) from e
            assert program is not None  # dynamo=True returns the program
            proto = program.model_proto
        else:
            with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
                # normalization's mean and std become constants, as they should: not worth a warning
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                file = Path(folder) / "model.onnx"
                torch.onnx.export(
                    wrapped,
                    (example,),
                    file,
                    dynamo=False,
                    input_names=[INPUT],
                    output_names=[OUTPUT],
                    opset_version=OPSET,
                    dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                )
                proto = onnx.load(file)
    proto.doc_string = (
        f"crackio crack classifier: {INPUT} uint8 (batch, 3, {SIZE}, {SIZE}) RGB 0-255 -> {OUTPUT} float32 "
        f"(batch,) P(crack); ImageNet normalization and the sigmoid are inside the graph"
    )
    return proto


def set_metadata(proto, values: dict[str, str]) -> None:
    for key, value in values.items():
        entry = next((p for p in proto.metadata_props if p.key == key), None) or proto.metadata_props.add()
        entry.key, entry.value = key, value


def ort_errors(ort) -> tuple[type[BaseException], ...]:
    """What onnxruntime raises for a file it cannot load or run (its own classes derive from Exception only)."""
    state = ort.capi.onnxruntime_pybind11_state
    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "InvalidProtobuf", "InvalidGraph", "NotImplemented")
    return (RuntimeError, OSError, *(getattr(state, n) for n in (*names, "RuntimeException") if hasattr(state, n)))


def open_session(model: bytes | Path, source: str):
    """An onnxruntime CPU session of a serialized model or a file, its signature checked.

    Raises:
        ExportError: not an ONNX model onnxruntime can load, or one that does not take uint8
            (batch, 3, 224, 224) `images` and give float32 (batch,) `crack_probability`.
    """
    _, ort = onnx_modules(need_onnx=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites, not the user's input
    try:
        session = ort.InferenceSession(
            model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"]
        )
    except ort_errors(ort) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(
            f"{source} is not an ONNX model onnxruntime can load ({first}): export one with "
            f"`python -m train export --checkpoint RUN/best.pt --out model.onnx`"
        ) from e
    inputs, outputs = session.get_inputs(), session.get_outputs()
    want = f"uint8 {INPUT} of shape (batch, 3, {SIZE}, {SIZE}) and one float32 {OUTPUT} of shape (batch,)"
    shape = inputs[0].shape if len(inputs) == 1 else None
    if not (
        len(inputs) == 1
        and inputs[0].name == INPUT
        and inputs[0].type == "tensor(uint8)"
        and len(shape or ()) == 4
        and list(shape or ())[1:] == [3, SIZE, SIZE]
        and len(outputs) == 1
        and outputs[0].name == OUTPUT
        and outputs[0].type == "tensor(float)"
        and len(outputs[0].shape) == 1
    ):
        got = ", ".join(f"{a.name} {a.type} {a.shape}" for a in inputs) or "nothing"
        gives = ", ".join(f"{a.name} {a.type} {a.shape}" for a in outputs) or "nothing"
        raise ExportError(
            f"{source} takes {got} and gives {gives}; crackio needs one {want}: export the run with "
            f"`python -m train export --checkpoint RUN/best.pt --out model.onnx`"
        )
    return session


def probabilities(session, images: np.ndarray) -> np.ndarray:
    """P(crack) of uint8 N x 3 x 224 x 224 images, float32 (N,)."""
    return session.run([OUTPUT], {INPUT: np.ascontiguousarray(images, dtype=np.uint8)})[0]


@dataclass
class Exported:
    """An exported model read back: its onnxruntime session, the run's config and the checkpoint's fields
    detection reads (`config`, `proposals` when the checkpoint had them)."""

    session: object
    config: RunSettings
    record: dict
    metadata: dict[str, str]


def load_onnx(path: Path) -> Exported:
    """A file written by `python -m train export`, for detection.

    Raises:
        MissingFile: no such file.
        ExportError: not an ONNX model, another signature, or no crackio metadata (not exported by crackio).
    """
    if not path.exists():
        raise MissingFile(
            f"--onnx {display_name(path)} does not exist (write one with "
            f"`python -m train export --checkpoint RUN/best.pt --out {display_name(path)}`)"
        )
    try:
        read_regular(path, None)
    except (OSError, NotRegular) as e:
        raise ExportError(f"--onnx {display_name(path)} cannot be read ({e}): name the .onnx file itself") from e
    session = open_session(path, f"--onnx {display_name(path)}")
    meta = dict(session.get_modelmeta().custom_metadata_map)  # type: ignore[attr-defined]
    again = f"export the run again with `python -m train export --checkpoint RUN/best.pt --out {display_name(path)}`"
    if "crackio.format" not in meta:
        raise ExportError(
            f"--onnx {display_name(path)} was not written by `python -m train export` (no crackio metadata: the "
            f"run's config and proposal settings that detection needs): {again}"
        )
    if meta["crackio.format"] != FORMAT:
        raise ExportError(
            f"--onnx {display_name(path)} is in crackio's ONNX format {meta['crackio.format']!r}, this crackio "
            f"reads {FORMAT!r}: use the crackio that wrote it, or {again}"
        )
    try:
        record = {"config": json.loads(meta["crackio.config"])}
        if "crackio.proposals" in meta:
            record["proposals"] = recorded_proposals(json.loads(meta["crackio.proposals"]))
        config = RunSettings.from_flat(record["config"], source=f"--onnx {display_name(path)} (its config)")
    except (KeyError, ValueError) as e:  # json.JSONDecodeError and ConfigError are ValueErrors
        raise ExportError(
            f"--onnx {display_name(path)} has crackio metadata this crackio cannot read ({e}): {again}"
        ) from e
    return Exported(session, config, record, meta)


def recorded_proposals(value: object) -> dict | None:
    """An export's recorded proposal settings as detection reads them: None (a run on packed crops, which records
    none) or a table `ProposalSettings` takes (its own checks: every field's kind and range).

    Raises:
        ConfigError: naming the first setting of the wrong type or out of range, and its value as recorded.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"its proposal settings must be a table, got {value!r}")
    kinds = ProposalSettings.__dataclass_fields__
    try:
        ProposalSettings(**{k: v for k, v in value.items() if k in kinds})
    except ConfigError as e:
        raise ConfigError(f"its proposal settings are wrong: {e}") from None
    return value


def check_out(out: Path, checkpoint: Path) -> None:
    """Refuse an --out that cannot or must not be written, before anything slow runs: not a .onnx name, the
    checkpoint itself, something that is not a regular file (a device, a pipe), a folder, a missing folder."""
    if out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve():
        raise ConfigError(f"--out {display_name(out)} is the checkpoint itself: write the model elsewhere")
    if out.exists() and not out.is_dir() and not out.is_file():
        raise ConfigError(f"--out {display_name(out)} is not a regular file (a device or a pipe): name a file")
    if out.is_dir():
        raise ConfigError(f"--out {display_name(out)} is a folder: name the file to write, e.g. {out / 'model.onnx'}")
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"--out {display_name(out)}: name an .onnx file (e.g. {out.with_suffix('.onnx')})")
    if not out.parent.is_dir():
        raise MissingFile(
            f"--out {display_name(out)}: the folder {display_name(out.parent)} does not exist: create it "
            f"(mkdir -p {display_name(out.parent)}) or write elsewhere"
        )


def compare(model: CrackClassifier, session, loader) -> dict:
    """PyTorch's and onnxruntime's P(crack) on every image of the loader (uint8, CPU): the largest difference,
    and each one's images/s over the batches after the first (a warm-up: memory plans, thread pools)."""
    diffs, flipped, sizes = [], 0, []
    times: dict[str, list[float]] = {"onnxruntime": [], "torch": []}
    model.cpu().eval()
    with torch.no_grad():
        for batch in loader:
            images = batch.images.cpu()
            t0 = time.perf_counter()
            p_torch = torch.sigmoid(model(images)).numpy()
            t1 = time.perf_counter()
            p_onnx = probabilities(session, images.numpy())
            times["onnxruntime"].append(time.perf_counter() - t1)
            times["torch"].append(t1 - t0)
            diffs.append(np.abs(p_onnx.astype(np.float64) - p_torch))
            flipped += int(((p_onnx >= 0.5) != (p_torch >= 0.5)).sum())
            sizes.append(len(images))
    every = np.concatenate(diffs) if diffs else np.zeros(0)
    timed = slice(1 if len(sizes) > 1 else 0, None)
    return {
        "samples": len(every),
        "max_abs_diff": float(every.max()) if len(every) else float("nan"),
        "mean_abs_diff": float(every.mean()) if len(every) else float("nan"),
        "decisions_differ_at_0.5": flipped,
        "images_per_sec": {k: sum(sizes[timed]) / sum(t[timed]) if sizes else 0.0 for k, t in times.items()},
    }


def run_export(settings: ExportSettings) -> dict:
    """Export the checkpoint's classifier to `out` (default RUN/model.onnx), check it on `split` and write
    OUT's report beside it (`<stem>.export.json`); returns the report.

    Raises:
        MissingFile, CheckpointError, WeightsError: the checkpoint (or the shards of the check) cannot be used.
        ExportError: onnxruntime's probabilities differ from PyTorch's by more than `tolerance` (nothing written).
        ConfigError: onnx, onnxscript or onnxruntime is missing; bad settings.
        WriteError: an output cannot be written.
    """
    out, shards, split, batch_size = settings.out, settings.shards, settings.split, settings.batch_size
    tolerance = settings.tolerance
    path = Path(settings.checkpoint)
    target = Path(out) if out else path.parent / "model.onnx"
    check_out(target, path)
    ckpt = load_checkpoint(path, torch.device("cpu"))
    model, cfg = model_from_checkpoint(ckpt, path)
    model.eval()
    loader = check_loader(settings, cfg)
    onnx, ort = onnx_modules()  # after the user's inputs are checked: what is wrong with them comes first
    started = time.perf_counter()
    proto = to_onnx(model)
    export_seconds = time.perf_counter() - started
    check = compare(model, open_session(proto.SerializeToString(), f"the exported {path}"), loader)
    refuse_disagreement(check, " and ".join(shards or cfg.data.shards), split, tolerance, target, ort)
    recorded = {"split": split, "samples": check["samples"], "max_abs_diff": check["max_abs_diff"]}
    metadata = export_metadata(ckpt, path, {**recorded, "tolerance": tolerance})
    set_metadata(proto, metadata)
    data = proto.SerializeToString()  # < 2 GB: every torchvision classifier fits one file
    atomic_write(target, data)
    speed = check.pop("images_per_sec")
    report = {
        "onnx": str(target),
        "bytes": len(data),
        "checkpoint": str(path),
        "checkpoint_sha256": metadata["crackio.checkpoint_sha256"],
        "trained": trained(ckpt),
        "arch": cfg.model.arch,
        "head": cfg.model.head,
        "input": {
            "name": INPUT,
            "dtype": "uint8",
            "shape": ["batch", 3, SIZE, SIZE],
            "normalization": ckpt.get("normalization"),
        },  # fmt: skip
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch"], "meaning": "P(crack)"},
        "exporter": "torch.onnx.export(dynamo=True)" if DYNAMO else "torch.onnx.export(dynamo=False), TorchScript",
        "opset": OPSET,
        "versions": {"torch": str(torch.__version__), "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "export_seconds": export_seconds,
        "check": {**check, "split": split, "tolerance": tolerance, "batch_size": batch_size},
        "throughput": {
            "onnxruntime_images_per_sec": speed["onnxruntime"],
            "torch_images_per_sec": speed["torch"],
            "batch_size": batch_size,
            "cpu_cores": len(os.sched_getaffinity(0)),
        },
    }
    write_json(report_path(target), report)
    return report


def check_loader(settings: ExportSettings, cfg):
    """The loader of the crops the export is checked on (--shards, else the run's own), as uint8: what the graph
    takes, so that the check feeds PyTorch and onnxruntime the very same pixels.

    Raises:
        MissingFile: no such shards (with a hint at --shards when they were the run's own).
        ShardError: a split the pack does not hold (naming one it has).
    """
    try:
        packs = [open_pack(s, settings.remote.settings(), "--shards") for s in settings.shards or cfg.data.shards]
        for pack in packs:
            check_split(pack.manifest, pack.location, settings.split, "--split")  # named as this command's flag
        return make_loader(
            packs,
            settings.split,
            batch_size=settings.batch_size,
            train=False,
            iou_threshold=cfg.data.iou_threshold,
            seed=cfg.data.seed,
            device="cpu",
            backend=settings.backend,
            output="uint8",
        )
    except MissingFile as e:
        if settings.shards:
            raise
        raise MissingFile(
            f"{e}; or, if the run's shards moved, name them with --shards (the export is checked on them)"
        ) from e


def refuse_disagreement(check: dict, shards: str, split: str, tolerance: float, target: Path, ort) -> None:
    """Raises ExportError where the check compared nothing, or onnxruntime's P(crack) is more than `tolerance`
    from PyTorch's (NaN too): `target` is then not written."""
    if check["samples"] == 0:
        raise ExportError(f"split {split!r} of {shards} has no sample to check the export on: --split")
    if not check["max_abs_diff"] <= tolerance:  # NaN fails too
        raise ExportError(
            f"onnxruntime's P(crack) differs from PyTorch's by up to {check['max_abs_diff']:.3g} on the "
            f"{check['samples']} {split} crops (--tolerance {tolerance:g}); {display_name(target)} was not "
            f"written. Report it with the torch ({torch.__version__}) and onnxruntime ({ort.__version__}) versions"
        )


def export_metadata(ckpt: dict, path: Path, check: dict) -> dict[str, str]:
    """The model file's crackio metadata: the run's config and proposals, the checkpoint and the check passed."""
    metadata = {
        "crackio.format": FORMAT,
        "crackio.config": json.dumps(ckpt["config"]),
        "crackio.trained": trained(ckpt),
        "crackio.checkpoint": str(path),
        "crackio.checkpoint_sha256": file_sha256(path).hexdigest(),
        "crackio.check": json.dumps(check),
    }
    if "proposals" in ckpt:  # absent in older checkpoints: detection then reads the run's shards, as it does
        metadata["crackio.proposals"] = json.dumps(ckpt["proposals"])
    if "normalization" in ckpt:  # the graph applies it to its uint8 input; said here for other readers
        metadata["crackio.normalization"] = json.dumps(ckpt["normalization"])
    return metadata


def report_path(onnx_file: Path) -> Path:
    return onnx_file.with_name(onnx_file.stem + ".export.json")


def report_text(report: dict) -> str:
    check, speed = report["check"], report["throughput"]
    return (
        f"wrote {report['onnx']} ({report['bytes'] / 2**20:.1f} MiB, {report['arch']}/{report['head']}, "
        f"{report['trained']}; {report['exporter']}, opset {report['opset']}): {INPUT} uint8 "
        f"(batch, 3, {SIZE}, {SIZE}) -> {OUTPUT} float32 (batch,)\n"
        f"check on {check['samples']} {check['split']} crops: max |p_onnx - p_torch| {check['max_abs_diff']:.2e} "
        f"(mean {check['mean_abs_diff']:.2e}, tolerance {check['tolerance']:g}), "
        f"{check['decisions_differ_at_0.5']} decisions differ at 0.5\n"
        f"CPU throughput at batch {speed['batch_size']} on {speed['cpu_cores']} cores: onnxruntime "
        f"{speed['onnxruntime_images_per_sec']:.1f} images/s, PyTorch {speed['torch_images_per_sec']:.1f} images/s\n"
        f"report: {report_path(Path(report['onnx']))}"
    )
