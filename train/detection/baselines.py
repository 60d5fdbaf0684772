"""Detectors without the network, scored with the model's own AP: the floor a trained detector must clear.

On real photos a short training can rank crack regions worse than box size does, and a lone whole-photo box can
score well where one crack network spans most of a photo. Without these figures beside the model's AP, a report
cannot say whether the network learned anything. Each baseline keeps the model's photos, proposals, NMS and cap
(`train.detection.report.suppress`), so only the scores differ:

- `area`: each proposal scored by its box area (larger first);
- `whole_photo`: one box covering the photo, score 1;
- `random`: seeded uniform scores (the photo's position and the run's seed), the chance level of this ranking.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from train.detection.report import Nms, ap_figures, suppress

BASELINES = ("area", "whole_photo", "random")


def baseline(results: list, kind: str, rule: Nms, seed: int) -> list:
    """The annotated photos of `results` (train.detection.detect.PhotoDetections) with the boxes and scores
    baseline `kind` gives them: float64 (N, 4) x0 y0 x1 y1 photo pixels and (N,) scores, best first,
    after the model's suppression `rule`."""
    out = []
    for position, r in enumerate(results):
        if kind == "whole_photo":
            boxes = np.array([[0.0, 0.0, r.size[0], r.size[1]]], dtype=np.float64)
            scores = np.ones(1)
        else:
            boxes = np.asarray(r.proposals).reshape(-1, 4)  # the proposals' own dtype, as the model's NMS had them
            if kind == "area":
                scores = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float64)
            else:
                scores = np.random.default_rng([seed, position]).random(len(boxes))
            keep = suppress(boxes, scores, rule)
            boxes, scores = boxes[keep], scores[keep]
        out.append(dataclasses.replace(r, boxes=boxes, scores=scores))
    return out


def baseline_aps(results: list, rule: Nms, seed: int) -> dict[str, dict[str, float]]:
    """Each baseline's AP figures (`ap50_voc`, `ap_coco`, `ap50_coco`) on the annotated photos of `results`."""
    annotated = [r for r in results if r.gt is not None]
    return {kind: ap_figures(baseline(annotated, kind, rule, seed)) for kind in BASELINES}
