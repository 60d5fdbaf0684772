"""The settings of the commands that use a trained run: `eval`, `svm`, `detect`, `export`. Each is a frozen owner
that checks its own values when made, with the remote pack's settings (`Remote`) composed in, as a run's are."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from crackio.errors import MOST_THREADS, ConfigError, is_number
from crackio.flags import field_types
from crackio.loading.options import BACKENDS, DEVICES
from crackio.storage.remote import check_location, is_remote
from crackio.writing.annotations import FORMATS
from crackio.writing.regions import MODES
from train.settings.base import Owner, check_non_negative, check_positive, check_within
from train.settings.data import Remote


class Command(Owner):
    """A command on a trained run: its `shards` (none = the run's own packs; several where the command reads a
    mixture, one where it reads one pack) and `remote` settings, which apply only when a pack is remote."""

    shards: tuple[str, ...] | str
    remote: Remote

    def __post_init__(self) -> None:
        if field_types(type(self))["shards"][0] is tuple:  # given once per pack: a tuple of locations
            given = (self.shards,) if isinstance(self.shards, str) else (self.shards or ())
            object.__setattr__(self, "shards", tuple(s for s in given if s))
        super().__post_init__()
        locations = [self.shards] if isinstance(self.shards, str) else list(self.shards)
        for location in locations:
            check_location(location, "--shards")
        if locations and not any(is_remote(s) for s in locations if s) and self.remote != Remote():
            raise ConfigError(
                f"--cache-dir, --cache-limit and --remote-timeout only apply with a remote --shards (s3://, "
                f"gs://, az://, http(s)://); {', '.join(locations)} "
                f"{'is a folder' if len(locations) == 1 else 'are folders'}, so this command would ignore them: "
                "drop them"
            )


@dataclass(frozen=True)
class EvalSettings(Command):
    group: ClassVar[str] = "evaluation"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"device": DEVICES, "backend": BACKENDS}

    checkpoint: str = ""  # RUN/best.pt or RUN/last.pt (required)
    shards: tuple[str, ...] = ()  # shards folder, once per pack; none = the run's own pack(s)
    split: str = "test"  # split to evaluate
    threshold: float = 0.5  # decision threshold on P(crack)
    batch_size: int = 64  # batch size
    device: str = "auto"  # where the model runs (auto: CUDA if present)
    backend: str = "auto"  # the loader's decoder (auto: DALI if installed)
    threads: int = 0  # torch CPU threads; 0 = torch's default (all cores)
    remote: Remote = field(default_factory=Remote)

    def check(self) -> None:
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required (RUN/best.pt or RUN/last.pt)")
        check_within(self, "threshold", 0, 1, note=" (a probability)")
        check_positive(self, "batch_size")
        check_non_negative(self, "threads", most=MOST_THREADS)


@dataclass(frozen=True)
class BboxSettings(Command):
    group: ClassVar[str] = "bounding-box regression"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"device": DEVICES, "backend": BACKENDS}

    checkpoint: str = ""  # RUN/best.pt of a run trained on a tools/propose.py pack (required)
    shards: tuple[str, ...] = ()  # shards folder, once per pack; none = the run's own pack(s)
    out: str = ""  # output folder; "" = RUN/bbox (where detect looks for it)
    min_iou: float = 0.6  # fit on proposals with at least this IoU with their ground truth (R-CNN)
    alphas: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0, 10000.0)  # ridge lambdas tried on validation (R-CNN: 1000)
    batch_size: int = 64  # batch size of the feature pass
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # auto | dali | torch
    remote: Remote = field(default_factory=Remote)

    def check(self) -> None:
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required (RUN/best.pt of a finished run)")
        check_within(self, "min_iou", 0, 1)
        if not self.alphas or not all(is_number(a) and a > 0 for a in self.alphas):
            raise ConfigError(f"--alphas must be positive numbers, e.g. 10,100,1000, got {self.alphas}")
        check_positive(self, "batch_size")


@dataclass(frozen=True)
class SvmSettings(Command):
    group: ClassVar[str] = "SVM stage"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"device": DEVICES, "backend": BACKENDS}

    checkpoint: str = ""  # RUN/best.pt of a finished run (required)
    shards: tuple[str, ...] = ()  # shards folder, once per pack; none = the run's own pack(s)
    out: str = ""  # output folder; "" = RUN/svm
    pos_iou: float = 0.7  # positives: IoU >= this (R-CNN)
    neg_iou: float = 0.3  # negatives: IoU < this (R-CNN); the band between is ignored
    rounds: int = 3  # hard-negative mining rounds
    negatives: int = 5000  # initial random negatives, and the most hard negatives added per round
    C: float = 1e-3  # LinearSVC C on standardized features
    target_recall: float = 0.0  # choose thresholds for this crack recall on validation; 0 = the highest F1
    seed: int = 0  # seeds the initial negative cache
    batch_size: int = 64  # batch size of the feature pass
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # auto | dali | torch
    remote: Remote = field(default_factory=Remote)

    def check(self) -> None:
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required (RUN/best.pt of a finished run)")
        check_within(self, "neg_iou", 0, 1)
        check_within(self, "pos_iou", 0, 1)
        if not self.neg_iou <= self.pos_iou:
            raise ConfigError(f"need 0 <= --neg-iou <= --pos-iou <= 1, got {self.neg_iou} and {self.pos_iou}")
        check_non_negative(self, "rounds", "seed")  # at most 2**40: a seed torch and numpy take
        check_positive(self, "negatives", "C", "batch_size")
        check_within(self, "target_recall", 0, 1)


@dataclass(frozen=True)
class DetectSettings(Command):
    """`photos` is the positional list; the proposal options (mode, max_proposals, context) are None unless given:
    a run trained on tools/propose.py shards uses the settings its pack recorded."""

    group: ClassVar[str] = "detection"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"device": DEVICES, "format": ("", *FORMATS), "mode": MODES}

    checkpoint: str = ""  # RUN/best.pt (or last.pt) of a run
    onnx: str = ""  # score with onnxruntime (CPU) a model written by `python -m train export`
    photos: tuple[str, ...] = ()  # photo files or folders (searched recursively); or --split
    split: str = ""  # instead of photos: the photos tools/propose.py put in this split of --shards (e.g. test)
    shards: tuple[str, ...] = ()  # the pack(s) --split reads, once per pack; none = the run's own
    strict: bool = False  # refuse photos the run trained or validated on (else: a warning)
    annotations: str = ""  # ground truth (a dataset folder or COCO file) for AP
    format: str = ""  # format of --annotations
    classes: str = ""  # positive class names in the annotations, comma-separated; "" = all
    svm: str = ""  # score with RUN/svm/svm_model.npz instead of the network head
    score_threshold: float | None = None  # keep boxes scoring at least this; none = 0.5, or the SVM's threshold
    nms_iou: float = 0.3  # NMS IoU (R-CNN's)
    nms_contained: float | None = None  # then drop a box this share inside a better one; none = off
    out: str = ""  # output folder; "" = RUN/detect
    batch_size: int = 64  # crops per forward pass
    device: str = "auto"  # where the model runs (auto: CUDA if present)
    threads: int = 0  # torch CPU threads; 0 = torch's default (all cores)
    mode: str | None = None  # runs on packed crop folders: selective search mode (default: fast, R-CNN's)
    max_proposals: int | None = None  # runs on packed crop folders: proposals per photo (default: 2000, R-CNN's)
    context: int | None = None  # runs on packed crop folders: context pixels at 224 (default: 16, R-CNN's)
    ray: str = ""  # score on a Ray cluster: auto, local or HOST:PORT (model and photos at the same paths on every node)
    no_bbox_reg: bool = False  # leave out RUN/bbox/bbox_regressor.npz (python -m train bbox) even where it exists
    remote: Remote = field(default_factory=Remote)

    def check(self) -> None:
        if self.ray:
            from crackio.writing.cluster import check_address

            check_address(self.ray)
        if bool(self.checkpoint) == bool(self.onnx):
            raise ConfigError("give the model as --checkpoint RUN/best.pt or as --onnx model.onnx (one of them)")
        if self.format and not (self.annotations or self.split):
            raise ConfigError("--format only applies with --annotations (the format of the ground truth): give both")
        check_within(self, "nms_iou", 0, 1, above=True)
        if self.nms_contained is not None:
            check_within(self, "nms_contained", 0, 1, above=True)
        check_positive(self, "batch_size")
        if not (self.score_threshold is None or is_number(self.score_threshold)):
            raise ConfigError(f"--score-threshold must be a finite number or none, got {self.score_threshold}")
        check_non_negative(self, "threads", most=MOST_THREADS)
        if self.max_proposals is not None:
            check_positive(self, "max_proposals")
        if self.context is not None:
            check_non_negative(self, "context")

    @property
    def class_names(self) -> list[str] | None:
        return [c for c in self.classes.split(",") if c] or None

    @property
    def proposals(self) -> dict:
        """The proposal options given (mode, max_proposals, context)."""
        return {k: getattr(self, k) for k in ("mode", "max_proposals", "context") if getattr(self, k) is not None}


@dataclass(frozen=True)
class ExportSettings(Command):
    group: ClassVar[str] = "export"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"backend": BACKENDS}

    checkpoint: str = ""  # RUN/best.pt or RUN/last.pt (required)
    out: str = ""  # the .onnx file to write; "" = RUN/model.onnx
    shards: tuple[str, ...] = ()  # shards folder of the check, once per pack; none = the run's own pack(s)
    split: str = "test"  # split the export is checked on
    tolerance: float = 1e-4  # largest |P_onnx - P_torch| accepted
    batch_size: int = 64  # batch size of the check and throughput
    backend: str = "auto"  # loader backend of the check
    remote: Remote = field(default_factory=Remote)

    def check(self) -> None:
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required (RUN/best.pt or RUN/last.pt)")
        check_non_negative(self, "tolerance")
        check_positive(self, "batch_size")
