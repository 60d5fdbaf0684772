"""`python -m train detect`: boxes around cracks in whole photos, and how good they are.

R-CNN at test time (Girshick et al. 2014, section 2.2): selective-search proposals on the photo,
each warped exactly as the training crops were (the settings recorded in the training shards'
manifest by tools/propose.py, the same functions, even the JPEG round trip), scored by the
fine-tuned network's sigmoid (in PyTorch, or with onnxruntime from a model written by `python -m train
export`) or by the SVM stage on the same forward's features, then greedy
non-maximum suppression per photo (`torchvision.ops.nms`). With annotations, detection average
precision is measured (train/detection/report.py).
"""

from __future__ import annotations

import contextlib
import os
import time
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from crackio.cli import progress_bar
from crackio.errors import ConfigError, CrackioError, MissingFile, OutOfRange
from crackio.flags import flag
from crackio.format.manifest import check_split, photo_sets, recorded_photos
from crackio.fsio import display_name
from crackio.loading.augment import augment_normalize
from crackio.loading.loader import resolve_device
from crackio.storage.packs import RemoteSettings, open_pack
from crackio.writing.annotations import FORMATS, PHOTO_EXTENSIONS, read_annotations, resolve_boxes
from crackio.writing.append import same_photo
from crackio.writing.cluster import RayCluster
from crackio.writing.proposal_stage import load_photo
from crackio.writing.regions import ProposalSettings, encode_jpeg, proposals_of, warp
from train.detection.baselines import baseline_aps
from train.detection.bbox import REGRESSOR, Regressor, load_regressor
from train.detection.export import Exported, load_onnx, probabilities
from train.detection.report import Detections, Nms, suppress, write_outputs
from train.run.checkpoint import file_sha256, load_checkpoint
from train.run.model import CrackClassifier, last_linear, model_from_checkpoint
from train.run.runtime import amp_dtype, use_threads
from train.settings.commands import DetectSettings
from train.settings.run import RunSettings

CPU = torch.device("cpu")


@dataclass
class PhotoDetections:
    path: Path
    stem: str
    size: tuple[int, int] = (0, 0)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # after NMS, best first, <= KEEP
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    proposals: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    gt: np.ndarray | None = None  # ground truth when annotated
    image_id: int | str | None = None  # the annotation file's image id (COCO), for detections.json
    category_id: int | str | None = None  # the crack category's id there, when the photo's file has exactly one
    seconds: dict = field(default_factory=dict)
    problem: str = ""  # why the photo was skipped, or a note on its annotation
    # With bounding-box regression: `boxes` are the moved ones; these, the proposals' own after their NMS (for the
    # AP without it)
    plain_boxes: np.ndarray | None = None
    plain_scores: np.ndarray | None = None


def proposal_settings(
    ckpt: dict, shards: str, checkpoint: Path, given: dict | None = None, remote: RemoteSettings | None = None
) -> tuple[ProposalSettings, str]:
    """The proposal and warp settings the run's training crops were made with: saved in the checkpoint (from its
    shards' manifest at training time), or for older checkpoints read from those shards. A run trained on crops
    packed by tools/pack.py has none: it detects with `given` (the command line's --mode, --max-proposals,
    --context) over R-CNN's (Girshick et al. 2014, section 2.2: selective search fast mode, ~2,000 proposals,
    16 pixels of context). Returns the settings and where they came from, in words for the report.

    Raises:
        ConfigError: `given` for a run whose crops were made with recorded settings (they must match), or an
            older checkpoint whose shards folder is gone.
    """
    if "proposals" in ckpt:
        recorded = ckpt["proposals"]
    else:
        try:
            recorded = open_pack(shards, remote).manifest.get("proposals")
        except CrackioError as e:
            raise ConfigError(
                f"{checkpoint} does not carry its proposal settings (an older crackio) and its "
                f"training shards cannot be read ({e}); detection needs them"
            ) from e
    names = ProposalSettings.__dataclass_fields__
    if not isinstance(recorded, dict):  # a crop folder: the proposals are the user's to choose
        chosen = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in (given or {}).items())
        source = (
            f"the command line ({chosen}), R-CNN's otherwise"
            if chosen
            else "R-CNN's (selective search fast, 2000 proposals, 16 px context)"
        )
        try:
            chosen_settings = ProposalSettings(**{k: v for k, v in (given or {}).items() if k in names})
        except OutOfRange as e:  # in the command line's words
            raise ConfigError(e.named(flag)) from None
        return chosen_settings, f"{source}: the run trained on packed crops, whose proposals crackio never saw"
    if given:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in given)
        raise ConfigError(
            f"{checkpoint} was trained on crops made by tools/propose.py with recorded settings; detection makes "
            f"its crops the same way: drop {flags}"
        )
    return ProposalSettings(**{k: v for k, v in recorded.items() if k in names}), "the training crops' own"


def recorded_split(
    shards: str, split: str, remote: RemoteSettings | None = None
) -> list[tuple[list[Path], str, str, list[str] | None]]:
    """The photos of `split` as tools/propose.py recorded them in SHARDS/manifest.json, with what their ground truth
    was read from: (photo paths, annotations source, format, positive classes) per photo set (the pack's own, then
    each --append's) that has photos in the split.

    Raises:
        ShardError, MissingFile: no readable pack; ConfigError: no such split, or a pack that records no photos
            (packed from a crop folder, whose photos crackio never saw).
    """
    manifest = open_pack(shards, remote).manifest
    check_split(manifest, shards, split, "--split")
    sets = photo_sets(manifest)
    if not sets:
        raise ConfigError(
            f"{shards} records no photos per split (crops packed by tools/pack.py, or an older tools/propose.py): "
            f"give the photos and --annotations, --format instead of --split"
        )
    found = []
    for photo_set in sets:
        listed = photo_set["photos"]["splits"].get(split)
        if not isinstance(listed, list) or not listed:
            continue
        root, source = Path(photo_set["photos"]["root"]), str(photo_set["source"])
        if not root.is_dir() or not Path(source).exists():
            raise ConfigError(
                f"--split {split}: the photos of {shards} are where tools/propose.py read them, {root} and "
                f"{source}, which this machine does not have: copy them there, or give the photos and "
                f"--annotations, --format instead of --split"
            )
        fmt = photo_set["annotations"]["format"]
        positive = None if fmt == "mask" else photo_set["annotations"]["positive"]  # masks: one class, no option
        found.append(([root / str(rel) for rel in listed], source, fmt, positive))
    return found


def seen_in_training(
    files: list[Path], cfg, remote: RemoteSettings | None = None, split_given: bool = False
) -> list[tuple[str, str]]:
    """(photo, why) for each photo whose stem names crops of the train or validation split of one of the run's
    packs: its detections would be scored on what the model learned from, inflating AP. Where that pack records
    its photos (tools/propose.py) and the photo of that name is there, it counts only when its bytes are the same:
    two datasets of a mixture may name different photos alike. `split_given`: the photos are a --split's.

    Raises:
        CrackioError: a pack of the run cannot be read (the caller then says the check was skipped).
    """
    stems: dict[str, list[tuple[str, str, Path | None]]] = {}
    for shards in cfg.data.shards:
        pack = open_pack(shards, remote)
        recorded = recorded_photos(pack.manifest)
        for split in (cfg.data.train_split, cfg.data.val_split):
            for stem in np.unique(pack.index(split).rows["stem"]):
                name = bytes(stem).decode("utf-8", "surrogateescape")
                stems.setdefault(name, []).append((split, shards, recorded.get(name)))
    found = []
    hint = "photos the run never saw" if split_given else "use --split test, or photos the run never saw"
    for file in files:
        same = [(split, shards) for split, shards, path in stems.get(file.stem, []) if same_photo(file, path)]
        if same:
            split, shards = same[0]
            found.append(
                (
                    display_name(file),
                    f"in the {split} split of the run's pack {shards}: its AP is not held out ({hint})",
                )
            )
    return found


class Scorer:
    """Scores JPEG crops in batches: the network's P(crack), or the saved SVM's margin on its features."""

    def __init__(
        self,
        model: CrackClassifier,
        device: torch.device,
        batch_size: int,
        svm: Path | None,
        checkpoint: Path | None = None,
        regressor: Regressor | None = None,
    ):
        self.model, self.device, self.batch_size = model, device, batch_size
        self.regressor = regressor
        self.features: np.ndarray = np.zeros((0, 0))  # the last call's crops' features, with a regressor
        self.amp = amp_dtype(device)
        self.svm = None
        if svm is not None:
            if not svm.is_file():
                raise MissingFile(f"--svm {svm} does not exist (python -m train svm writes RUN/svm/svm_model.npz)")
            try:
                with np.load(svm, allow_pickle=False) as arrays:
                    self.svm = {
                        k: arrays[k].astype(np.float64) for k in ("mean", "scale", "coef", "intercept", "threshold")
                    }
                    made_from = str(arrays["checkpoint_sha256"]) if "checkpoint_sha256" in arrays else None
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                raise ConfigError(f"--svm {svm} is not an SVM saved by `python -m train svm` ({e})") from e
            if made_from and checkpoint is not None:
                if file_sha256(checkpoint).hexdigest() != made_from:
                    raise ConfigError(
                        f"--svm {svm} was trained on another checkpoint's features (SHA-256 "
                        f"{made_from[:12]}..., not {checkpoint}'s): run `python -m train svm "
                        f"--checkpoint {checkpoint}` for an SVM of this one"
                    )
            dim = last_linear(model.backbone)[2].in_features
            if any(self.svm[k].shape != (dim,) for k in ("mean", "scale", "coef")):
                raise ConfigError(
                    f"--svm {svm} was trained on {self.svm['coef'].shape[0]}-d features; this "
                    f"checkpoint's backbone gives {dim}-d: use the SVM of this run"
                )
        self._features: list[torch.Tensor] = []
        if self.svm is not None or regressor is not None:  # the input of the last Linear: the SVM's, the regressor's
            last_linear(model.backbone)[2].register_forward_pre_hook(
                lambda _m, args: self._features.append(args[0].float().flatten(1))
            )
        self.threshold = float(self.svm["threshold"]) if self.svm is not None else 0.5

    @torch.no_grad()
    def __call__(self, jpegs: list[bytes], boxes: np.ndarray | None = None) -> np.ndarray:
        """Scores of the crops (float, one per crop); `boxes` (their proposals) are for stand-in scorers."""
        scores, features = [], []  # features: with a regressor only
        for start in range(0, len(jpegs), self.batch_size):
            gpu = self.device.type == "cuda"
            images = decode_crops(jpegs[start : start + self.batch_size], self.device)
            x = augment_normalize(images, None)  # the eval pipeline of the loaders
            if gpu:
                x = x.contiguous(memory_format=torch.channels_last)
            self._features = []  # the hook appends this batch's features (the SVM's input)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = self.model(x).float()
            f = self._features[-1].cpu().numpy().astype(np.float64) if self._features else np.zeros((len(logits), 0))
            if self.regressor is not None:
                features.append(f)
            if self.svm is None:
                scores.append(torch.sigmoid(logits).cpu().numpy())
            else:
                s = self.svm
                scores.append(((f - s["mean"]) / s["scale"]) @ s["coef"] + s["intercept"])
        if self.regressor is not None:
            self.features = np.concatenate(features) if features else np.zeros((0, self.regressor.mean.shape[0]))
        return np.concatenate(scores) if scores else np.zeros(0)


def decode_crops(jpegs: list[bytes], device: torch.device) -> torch.Tensor:
    """uint8 N x 3 x H x W RGB on `device` (nvJPEG on CUDA)."""
    raw = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    gpu = device.type == "cuda"
    return torch.stack(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device if gpu else "cpu")).to(device)


class OnnxScorer:
    """The network's P(crack) from a model written by `python -m train export`, with onnxruntime on the CPU:
    the same crops, decoded the same way, as uint8 (the graph normalizes them)."""

    threshold = 0.5

    def __init__(self, session, batch_size: int):
        self.session, self.batch_size = session, batch_size

    def __call__(self, jpegs: list[bytes], boxes: np.ndarray | None = None) -> np.ndarray:
        scores = [
            probabilities(self.session, decode_crops(jpegs[start : start + self.batch_size], CPU).numpy())
            for start in range(0, len(jpegs), self.batch_size)
        ]
        return np.concatenate(scores) if scores else np.zeros(0)


def photo_files(inputs: list[str]) -> list[Path]:
    """Photo files named or found (recursively) in the folders named, sorted; hidden files skipped."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += [
                p
                for p in sorted(path.rglob("*"))
                if p.is_file()
                and p.suffix.lower() in PHOTO_EXTENSIONS
                and not any(part.startswith(".") or part == "__MACOSX" for part in p.parts)
            ]
        elif path.is_file():
            files.append(path)
        else:
            raise MissingFile(f"photo or folder {display_name(path)} does not exist")
    if not files:
        raise ConfigError(f"no photo ({', '.join(PHOTO_EXTENSIONS)}) in {', '.join(inputs)}")
    return files


def nms_rule(settings: DetectSettings) -> Nms:
    """The suppression --nms-iou and --nms-contained ask for."""
    return Nms(settings.nms_iou, settings.nms_contained)


def detect_photo(
    path: Path,
    settings: ProposalSettings,
    scorer: Scorer | OnnxScorer,
    rule: Nms,
    seed: int,
    pool: ThreadPoolExecutor,
) -> PhotoDetections:
    """Proposals, warped crops, scores and NMS for one photo (coordinates in photo pixels)."""
    result = PhotoDetections(path, path.stem)
    try:
        rgb = load_photo(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        result.problem = f"unreadable photo ({e})"
        return result
    result.size = (rgb.shape[1], rgb.shape[0])
    t0 = time.perf_counter()
    # The stem seeds the cap exactly as tools/propose.py seeds it, so a photo gets the same proposals.
    boxes = proposals_of(rgb, settings, [seed, zlib.crc32(path.stem.encode())])[0]
    t1 = time.perf_counter()
    fill = rgb.reshape(-1, 3).mean(0)
    make = lambda box: encode_jpeg(warp(rgb, box, settings.context, settings.size, fill), settings.quality)  # noqa: E731
    jpegs = list(pool.map(make, boxes))  # OpenCV and Pillow release the GIL
    t2 = time.perf_counter()
    scores = scorer(jpegs, boxes)
    t3 = time.perf_counter()
    if isinstance(scorer, Scorer) and scorer.regressor is not None:  # R-CNN: every proposal moved once, then NMS
        moved = scorer.regressor.move(boxes, scorer.features, np.array(result.size))
        plain = suppress(boxes, scores, rule)
        result.plain_boxes, result.plain_scores = boxes[plain], scores[plain]
        keep = suppress(moved, scores, rule)
        result.boxes, result.scores, result.proposals = moved[keep], scores[keep], boxes
    else:
        keep = suppress(boxes, scores, rule)
        result.boxes, result.scores, result.proposals = boxes[keep], scores[keep], boxes
    result.seconds = {"proposals": t1 - t0, "warping": t2 - t1, "scoring": t3 - t2, "nms": time.perf_counter() - t3}
    return result


def ground_truth(
    annotations: str, fmt: str, classes: list[str] | None, shards: list[str], remote: RemoteSettings | None = None
) -> tuple[dict, list[tuple[str, str]]]:
    """The photos' ground truth by stem, and the annotations' problems. Mask ground truth follows the rule the
    run's pack was labelled with (the manifest's mask_piece and mask_crack_label of the first of `shards` made
    from masks), so AP counts the boxes the model learned to find."""
    recorded: dict = {}
    for location in shards if fmt == "mask" else []:
        with contextlib.suppress(CrackioError):
            ann = open_pack(location, remote).manifest.get("annotations")
            if isinstance(ann, dict) and ann.get("format") == "mask":
                recorded = {k: ann[k] for k in ("mask_piece", "mask_crack_label") if k in ann}
                break
    data = read_annotations(annotations, fmt, classes, **recorded)
    return {p.stem: p for p in data.photos}, list(data.problems)


@dataclass(frozen=True)
class Truth:
    """Where some photos' ground truth is: `annotations` (a dataset folder or COCO file) of `fmt`, the positive
    `classes`, and the packs whose recorded mask rule it follows (`shards`: the pack it was recorded in)."""

    annotations: str
    fmt: str
    classes: list[str] | None
    shards: list[str]
    photos: frozenset[str] = frozenset()  # every photo stem the pack records (all splits), when it records them


def photos_to_detect(cfg, settings: DetectSettings) -> tuple[list[Path], list[Truth], list[tuple[str, str]]]:
    """(photo files, where their ground truth is, problems): the recorded split of each pack --shards names (the
    run's own packs by default), or the photos given, checked against the run's training and validation photos.

    Raises:
        ConfigError: both or neither of photos and --split; with --strict, photos the run trained or validated on.
    """
    photos, split, annotations, fmt = settings.photos, settings.split, settings.annotations, settings.format
    truths: list[Truth] = []
    if split:
        if photos or annotations or fmt:
            raise ConfigError(
                "--split SPLIT detects on the photos and ground truth the pack recorded: give no photos, "
                "--annotations or --format with it"
            )
        files = []
        packs = settings.shards or cfg.data.shards
        for shards in packs:  # each pack's photos of the split, packs in order
            try:
                sets = recorded_split(shards, split, settings.remote.settings())
            except ConfigError as e:
                if len(packs) == 1:
                    raise
                raise ConfigError(
                    f"{e}; or give --shards once for each of the run's packs made by tools/propose.py whose {split} "
                    f"photos to detect on"
                ) from None
            recorded = frozenset(recorded_photos(open_pack(shards, settings.remote.settings()).manifest))
            for found, annotations, fmt, classes in sets:
                files += found
                truths.append(Truth(annotations, fmt, classes, [shards], recorded))
    elif not photos:
        raise ConfigError("give photos (files or folders), or --split SPLIT for a split of the pack (e.g. test)")
    elif annotations and not fmt:
        raise ConfigError(f"--annotations needs --format ({', '.join(FORMATS)})")
    else:
        files = photo_files(list(photos))
        if annotations:
            truths.append(Truth(annotations, fmt, settings.class_names, list(settings.shards or cfg.data.shards)))
    try:  # whichever way the photos came: another pack's split, or --split train, may hold the run's own
        seen = seen_in_training(files, cfg, settings.remote.settings(), bool(split))
    except CrackioError as e:
        seen = []
        print(
            f"note: the run's pack {' or '.join(cfg.data.shards)} cannot be read ({e}): the photos are not checked "
            "against it"
        )
    if seen and settings.strict:
        raise ConfigError(
            f"--strict: {len(seen)} of the photos were in the run's training or validation split (e.g. "
            f"{seen[0][0]}: {seen[0][1]})"
        )
    if seen:
        print(f"warning: {len(seen)} of the photos were in the run's training or validation split: AP is not "
              f"held out (listed in report.txt; --split test detects on the held-out photos)")  # fmt: skip
    return files, truths, seen


def all_truth(truths: list[Truth], remote: RemoteSettings | None) -> tuple[dict, list[tuple[str, str]]]:
    """The ground truth of every source by photo stem, and the annotations' problems; a stem already given by an
    earlier pack keeps that pack's (detection keeps the first photo of a stem too: one_per_stem)."""
    truth: dict = {}
    problems: list[tuple[str, str]] = []
    for source in truths:
        found, notes = ground_truth(source.annotations, source.fmt, source.classes, source.shards, remote)
        truth |= {stem: photo for stem, photo in found.items() if stem not in truth}
        problems += notes
    return truth, problems


def of_these_photos(
    problems: list[tuple[str, str]], inputs: list[Path], known: set[str], split: bool
) -> list[tuple[str, str]]:
    """The annotations' problems that concern this run: those of the photos it detects on and of the dataset's own
    files (an annotation file the reader could not use), not those of the dataset's other photos (`known`: the
    photo stems the annotations and packs describe). With `split` (a pack's split: its photos are the run's whole
    scope) a problem of any other photo is left out too (an image or mask file is a photo's): another split's
    missing photo is not this run's; photos given by hand keep the annotations' missing photos, which the user
    may have meant to give."""
    mine = {p.stem for p in inputs}
    kept = []
    for name, why in problems:
        path = Path(name)
        other = path.stem in known or (split and path.suffix.lower() in PHOTO_FILES)
        if path.stem in mine or not other:
            kept.append((name, why))
    return kept


PHOTO_FILES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".mat")  # a photo's, or its mask's


def one_per_stem(inputs: list[Path]) -> list[tuple[Path, str]]:
    """(photo, why it is skipped or "") for each input: outputs and annotations go by stem, so a stem names one
    photo, the first."""
    files: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}
    for file in inputs:
        if file.stem in seen:
            note = f"a second photo named {file.stem!r} (the first: {display_name(seen[file.stem])}): skipped"
            files.append((file, note))
        else:
            seen[file.stem] = file
            files.append((file, ""))
    return files


def attach_truth(r: PhotoDetections, photo) -> list[tuple[str, str]]:
    """Give `r` its annotation (`photo`, None where the annotations have none): its ground truth in photo pixels
    and ids, or the problem that leaves it out of AP. Returns the annotation's notes, (photo, note)."""
    if photo is None:
        r.problem = "not in the annotations: detected, left out of AP"
        return []
    gt, notes, errors = resolve_boxes(photo, *r.size)
    if errors:  # incomplete ground truth would count true detections as false positives
        r.problem = f"left out of AP, its ground truth is incomplete: {'; '.join(errors)}"
    else:
        r.gt = gt
    r.image_id = photo.image_id
    r.category_id = photo.category_ids[0] if len(photo.category_ids) == 1 else None
    return [(display_name(r.path), n) for n in notes]


def run_detect(settings: DetectSettings, overview: int = 16) -> Path:
    """Detect cracks in `photos` with the run's model (`checkpoint`, or `onnx`: a model written by
    `python -m train export`, which carries the run's settings); write detections, pictures and (with
    annotations) AP.

    `split` instead of photos: the photos tools/propose.py put in that split of `shards` (default: the run's own
    pack), with the ground truth they were read from. Explicit photos that were in the run's train or validation
    split are listed as problems, and refused with `strict`. `proposals` (mode, max_proposals, context) are for a
    run trained on packed crop folders, which records none.

    Raises:
        MissingFile, ConfigError, WeightsError: a missing or unsuitable checkpoint, ONNX model, photo, SVM or
            annotation; with `strict`, photos the run trained or validated on.
        CheckpointError: a checkpoint that is refused (not crackio's, or needs unpickling beyond tensors).
        WriteError: an output cannot be written (full disk, I/O error).
    """
    use_threads(settings.threads)
    path, ckpt, cfg, model = load_model(settings)
    proposals, proposals_from = proposal_settings(
        ckpt, cfg.data.shards[0], path, settings.proposals, settings.remote.settings()
    )
    inputs, truths, problems = photos_to_detect(cfg, settings)
    scorer = make_scorer(settings, model, path)
    threshold = scorer.threshold if settings.score_threshold is None else settings.score_threshold
    truth, annotation_problems = all_truth(truths, settings.remote.settings())
    known = set(truth).union(*(t.photos for t in truths))
    problems += of_these_photos(annotation_problems, inputs, known, bool(settings.split))
    start = time.perf_counter()
    annotated = truth if truths else None
    files = one_per_stem(inputs)
    if settings.ray:
        with RayCluster(settings.ray) as cluster:
            scored = detect_on_ray(cluster, settings, files, proposals, cfg.data.seed)
            results = detect_photos(files, scored, annotated, problems)
    else:
        pool = ThreadPoolExecutor(len(os.sched_getaffinity(0)))
        with pool:
            here = (
                detect_photo(f, proposals, scorer, nms_rule(settings), cfg.data.seed, pool) for f, d in files if not d
            )
            results = detect_photos(files, here, annotated, problems)
    seconds = time.perf_counter() - start
    # The same photos, proposals and NMS ranked without the network: the floor the model's AP must clear.
    done = [r for r in results if r.size != (0, 0)]
    floors = baseline_aps(done, nms_rule(settings), cfg.data.seed) if annotations else None
    found = Detections(
        results,
        problems,
        threshold=threshold,
        nms=nms_rule(settings),
        settings=proposals,
        scored_by="svm" if settings.svm else "network (onnxruntime)" if settings.onnx else "network",
        annotated=bool(truths),
        seconds=seconds,
        baselines=floors,
        settings_from=proposals_from,
    )
    out_dir = Path(settings.out) if settings.out else path.parent / "detect"
    write_outputs(out_dir, found, overview)
    return out_dir


def load_model(settings: DetectSettings) -> tuple[Path, dict, RunSettings, CrackClassifier | Exported]:
    """What detection scores with: (its file, the checkpoint's fields detection reads, the run's settings, the
    model: a classifier from --checkpoint or an onnxruntime session from --onnx).

    Raises:
        ConfigError: --onnx with --svm or --device cuda.
    """
    if not settings.onnx:
        path = Path(settings.checkpoint)
        ckpt = load_checkpoint(path, torch.device("cpu"))
        model, cfg = model_from_checkpoint(ckpt, path)
        return path, ckpt, cfg, model
    if settings.svm:
        raise ConfigError(
            "--svm scores the network's features, which an ONNX model does not output: "
            "use --checkpoint RUN/best.pt with --svm"
        )
    if settings.device == "cuda":
        raise ConfigError("--onnx scores with onnxruntime on the CPU: leave out --device cuda")
    path = Path(settings.onnx)
    exported = load_onnx(path)
    return path, exported.record, exported.config, exported


def make_scorer(settings: DetectSettings, model: CrackClassifier | Exported, path: Path) -> Scorer | OnnxScorer:
    """The scorer of crops: onnxruntime's for an export, else the network (or --svm on its features) on the
    device."""
    if isinstance(model, Exported):
        return OnnxScorer(model.session, settings.batch_size)
    dev = resolve_device(settings.device, "--device")
    model.to(dev).eval()  # in place: nn.Module.to moves the module itself
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    regressor = None
    found = path.parent / "bbox" / REGRESSOR
    if not settings.no_bbox_reg and found.is_file():
        regressor = load_regressor(found, path, last_linear(model.backbone)[2].in_features)
    return Scorer(model, dev, settings.batch_size, Path(settings.svm) if settings.svm else None, path, regressor)


def detect_photos(
    files: list[tuple[Path, str]],
    scored: Iterator[PhotoDetections],
    truth: dict | None,
    problems: list[tuple[str, str]],
) -> list[PhotoDetections]:
    """Each photo's detections (`scored`: those of the photos without a duplicate stem, in order; a duplicate's
    only its problem), with its ground truth from `truth` (None: no annotations); problems are added to
    `problems`. Shows progress."""
    results: list[PhotoDetections] = []
    crops = 0
    start = time.perf_counter()
    bar = progress_bar(files, unit="photo", desc="detect")
    for file, duplicate in bar:
        r = PhotoDetections(file, file.stem, problem=duplicate) if duplicate else next(scored)
        if truth is not None and not r.problem:
            problems += attach_truth(r, truth.get(r.stem))
        if r.problem:
            problems.append((display_name(file), r.problem))
        results.append(r)
        crops += len(r.proposals)
        elapsed = time.perf_counter() - start
        bar.set_postfix(photos_s=f"{len(results) / elapsed:.2f}", crops_s=f"{crops / elapsed:.0f}", refresh=False)
    return results


class PhotoScorer:
    """A Ray actor: the model loaded once (from the path every node reads), then photos detected one by one as in
    one process (`detect_photo`), on its GPU or with `--threads` CPU threads (1 when not given)."""

    def __init__(self, settings: DetectSettings, proposals: ProposalSettings, seed: int, gpu: bool):
        if not gpu:
            # torch's CPU results depend on its thread count (in the last bits): the same --threads as a one-process
            # run gives the same scores, byte for byte.
            torch.set_num_threads(settings.threads or 1)
        settings = replace(settings, device="cuda" if gpu else "cpu", ray="")
        path, _, _, model = load_model(settings)
        self.scorer = make_scorer(settings, model, path)
        self.proposals, self.seed, self.nms = proposals, seed, nms_rule(settings)
        self.pool = ThreadPoolExecutor(1)

    def detect(self, path: str) -> PhotoDetections:
        return detect_photo(Path(path), self.proposals, self.scorer, self.nms, self.seed, self.pool)


def detect_on_ray(
    cluster: RayCluster, settings: DetectSettings, files: list[tuple[Path, str]], proposals: ProposalSettings,
    seed: int,
) -> Iterator[PhotoDetections]:  # fmt: skip
    """The photos' detections in order, scored by model actors on the cluster: one per GPU when it has GPUs (and
    --device is not cpu), else one per `--threads` CPUs (1 when not given): the same --threads as a one-process
    run gives the same scores, byte for byte. Photos, checkpoint, ONNX model and SVM are read by the actors at
    their absolute paths, so every node must have them there (a shared folder).

    Raises:
        ConfigError: --device cuda on a cluster without GPUs; --threads more than any node's CPUs.
    """
    ray = cluster.ray
    gpus = int(ray.cluster_resources().get("GPU", 0)) if settings.device != "cpu" and not settings.onnx else 0
    if settings.device == "cuda" and not gpus:
        raise ConfigError(f"--device cuda with --ray {settings.ray}: the cluster has no GPU; leave out --device")

    def absolute(path: str) -> str:
        return str(Path(path).resolve()) if path else ""

    settings = replace(
        settings, checkpoint=absolute(settings.checkpoint), onnx=absolute(settings.onnx), svm=absolute(settings.svm)
    )
    threads = settings.threads or 1
    largest = cluster.largest_node_cpus()
    if not gpus and threads > largest:
        raise ConfigError(
            f"--threads {threads} with --ray {settings.ray}: each model actor needs {threads} CPUs of one node, and "
            f"the largest node has {largest}: give --threads {largest} or fewer"
        )
    actors = gpus or max(1, cluster.cpus() // threads)
    todo = [str(f.resolve()) for f, duplicate in files if not duplicate]
    make = ray.remote(num_gpus=1, num_cpus=0)(PhotoScorer) if gpus else ray.remote(num_cpus=threads)(PhotoScorer)
    pool = ray.util.ActorPool(
        [make.options(max_restarts=2, max_task_retries=2).remote(settings, proposals, seed, bool(gpus))
         for _ in range(min(actors, len(todo)) or 1)]
    )  # fmt: skip
    return iter(pool.map(lambda actor, path: actor.detect.remote(path), todo))
