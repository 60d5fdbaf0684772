"""Crack masks to ground-truth boxes: which pixels are crack (a PNG's values, a BSDS/CrackForest .mat's
`groundTruth.Segmentation` labels), joined into cracks, one box per crack or (`piece`) boxes of about L pixels
along a long crack's skeleton. The readers of the dataset layouts are in crackio.writing.annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Masks: crack pixels are those above half the mask's maximum (0/1 and 0/255 masks alike; a JPEG-saved mask's
# compression noise stays below). One crack drawn or predicted as fragments is joined by a dilation
# with a MASK_JOIN x MASK_JOIN ellipse (gaps up to ~MASK_JOIN - 1 pixels); components with fewer than
# MASK_MIN_PIXELS crack pixels are specks and dropped. The box spans the component's own crack pixels.
MASK_JOIN = 9
# A .mat's Segmentation numbered from 1 (BSDS, CrackForest: 1 background, 2 crack; some CrackForest photos also
# label other marks 3 and 4, which half the maximum would take for the crack and drop the crack itself).
MAT_CRACK_LABEL = 2
MASK_MIN_PIXELS = 20
# --mask-piece L: each component's skeleton (Zhang-Suen thinning of the joined component) is cut into
# round(length / L) stretches of equal length along its longest path (geodesic distance from one end),
# branches becoming their own pieces; a piece under L / 2 of skeleton or MASK_MIN_PIXELS crack pixels is
# merged into a neighbour. Each crack pixel goes to its nearest skeleton pixel's piece, so a box spans
# the crack's width. Under MASK_MIN_PIECE pixels a piece is narrower than the smallest proposal.
MASK_MIN_PIECE = 8


def crack_pixels(mask: np.ndarray, label: int | None = None) -> np.ndarray:
    """Bool H x W: pixels equal to `label`, or (None) above half the mask's maximum (see MASK_JOIN above)."""
    if label is not None:
        return np.asarray(mask == label, bool)
    top = float(mask.max()) if mask.size else 0.0
    return mask > top / 2 if top > 0 else np.zeros(mask.shape, bool)


def read_crack(path: Path, label: int | None = None) -> np.ndarray:
    """Bool H x W crack pixels of a mask image (EXIF orientation applied) or a BSDS ground-truth .mat.

    A .mat holds `groundTruth`, a struct (or cell of structs, one per annotator) with a `Segmentation`
    label image (CrackForest: 1 background, 2 crack, and in some photos 3 and 4 for other marks); several
    annotators: crack where any says so. By default a label image whose labels start at 1 (BSDS's and
    CrackForest's numbering) has its crack at label MAT_CRACK_LABEL, whatever else it labels; one whose
    labels start at 0 is read as a PNG mask is; an image of one label has no crack (a crack-free
    CrackForest photo is all 1). `label` overrides both (--mask-crack-label).

    Raises:
        ValueError: an unreadable file or no such structure, with the fix.
    """
    if path.suffix.lower() == ".mat":
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError

        try:
            doc = loadmat(path)
        except NotImplementedError:  # scipy reads MATLAB files up to v7; v7.3 is HDF5
            raise ValueError("a MATLAB v7.3 (HDF5) file: save it with -v7, or as a PNG mask") from None
        except (MatReadError, OSError, ValueError, TypeError) as e:
            raise ValueError(f"not a readable MATLAB file ({e})") from None
        segmentations = _segmentations(doc.get("groundTruth"))
        if not segmentations:
            has = ", ".join(k for k in doc if not k.startswith("__")) or "nothing"
            raise ValueError(
                f"no groundTruth.Segmentation label image (it has: {has}); a BSDS ground-truth file holds "
                "groundTruth{k}.Segmentation, else give a PNG mask"
            )
        if len({s.shape for s in segmentations}) > 1:
            raise ValueError(f"its annotators' Segmentation sizes differ: {sorted({s.shape for s in segmentations})}")
        # Labels start at 1: one label over the whole image is all background (a PNG's all-zero mask).
        uniform = [label is None and s.min() == s.max() for s in segmentations]
        chosen = [label if label is not None or s.min() < 1 else MAT_CRACK_LABEL for s in segmentations]
        return np.logical_or.reduce([crack_pixels(s, c) & (not u) for s, c, u in zip(segmentations, chosen, uniform)])
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            m = ImageOps.exif_transpose(opened)
            # A chosen label is a raw value (a palette PNG's index); the default rule reads grey levels.
            raw = label is not None and m.mode in ("P", "L", "I", "I;16", "1")
            return crack_pixels(np.asarray(m if raw else m.convert("L")), label)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(str(e)) from None


def _segmentations(value) -> list[np.ndarray]:
    """Every 2-D `Segmentation` field under a loadmat value: a struct array, or cells of them."""
    if isinstance(value, np.ndarray) and value.dtype.names:
        found = [np.asarray(v) for v in value["Segmentation"].ravel()] if "Segmentation" in value.dtype.names else []
        return [v for v in found if v.ndim == 2 and v.dtype.kind in "biuf" and v.size]
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [s for v in value.ravel() for s in _segmentations(v)]
    return []


def mask_boxes(mask: np.ndarray, piece: int = 0, label: int | None = None) -> np.ndarray:
    """Ground-truth boxes (N, 4) of a crack mask (H x W; bool = the crack pixels themselves): one per joined
    crack (see MASK_JOIN and MASK_MIN_PIXELS above), or with `piece` > 0 pieces of about `piece` pixels along it."""
    import cv2

    crack = crack_pixels(mask, label).astype(np.uint8)
    joined = cv2.dilate(crack, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (MASK_JOIN, MASK_JOIN)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
    boxes = []
    for k in range(1, count):
        x, y, w, h = stats[k, :4]
        component = labels[y : y + h, x : x + w] == k
        ys, xs = np.nonzero(component & (crack[y : y + h, x : x + w] > 0))
        if len(xs) < MASK_MIN_PIXELS:
            continue
        groups = _pieces(component, ys, xs, piece) if piece else [np.arange(len(xs))]
        boxes += [[x + xs[g].min(), y + ys[g].min(), x + xs[g].max() + 1, y + ys[g].max() + 1] for g in groups]
    return np.array(boxes, np.float64).reshape(-1, 4)


def _pieces(component: np.ndarray, ys: np.ndarray, xs: np.ndarray, piece: int) -> list[np.ndarray]:
    """The crack pixels (ys, xs) of one joined component, grouped into pieces: see MASK_MIN_PIECE above."""
    import cv2
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components, dijkstra
    from scipy.spatial import cKDTree

    sy, sx = np.nonzero(cv2.ximgproc.thinning(component.astype(np.uint8) * 255))
    n = len(sy)
    if n < 2:
        return [np.arange(len(xs))]
    # The skeleton as a graph of 8-neighbours. Steps of 0.948 and 1.343 pixels (Kulpa's estimator, 1977):
    # 1 and sqrt(2) overstate a digital line's length by up to 8% (slanted cracks: too many pieces).
    node = np.full(component.shape, -1)
    node[sy, sx] = np.arange(n)
    rows, cols, steps = [], [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        ny, nx = sy + dy, sx + dx
        inside = (ny < component.shape[0]) & (nx >= 0) & (nx < component.shape[1])
        j = np.full(n, -1)
        j[inside] = node[ny[inside], nx[inside]]
        rows.append(np.nonzero(j >= 0)[0])
        cols.append(j[j >= 0])
        steps.append(np.full(len(rows[-1]), 1.343 if dy and dx else 0.948))
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = csr_matrix((np.concatenate(steps), (r, c)), shape=(n, n))
    parts, part = connected_components(graph, directed=False)
    band = np.zeros(n, np.int64)
    for k in range(parts):  # per skeleton part: equal stretches of its longest path, from one end
        members = np.nonzero(part == k)[0]
        far = members[np.argmax(dijkstra(graph, directed=False, indices=members[0])[members])]
        distance = dijkstra(graph, directed=False, indices=far)[members]
        stretches = max(1, round(distance.max() / piece))
        band[members] = np.minimum(distance * stretches // max(distance.max(), 1e-9), stretches - 1)
    same = band[r] == band[c]  # a piece: skeleton pixels of one stretch joined by the skeleton
    pieces, of = connected_components(csr_matrix((np.ones(same.sum()), (r[same], c[same])), shape=(n, n)), False)
    nearest = of[cKDTree(np.c_[sy, sx]).query(np.c_[ys, xs])[1]]  # each crack pixel's piece
    # Short pieces (branch stubs, a gap's bridge) join a neighbouring piece, smallest first.
    length = np.bincount(of, minlength=pieces).astype(float)
    pixels = np.bincount(nearest, minlength=pieces).astype(float)
    owner = np.arange(pieces)
    touching = {(a, b) for a, b in zip(of[r], of[c]) if a != b}
    for p in np.argsort(length, kind="stable"):
        if owner[p] != p or (length[p] >= piece / 2 and pixels[p] >= MASK_MIN_PIXELS):
            continue
        near = sorted(
            {owner[b] for a, b in touching if owner[a] == p} | {owner[a] for a, b in touching if owner[b] == p}
        )
        near = [q for q in near if q != p]
        if near:
            q = near[0]
            owner[owner == p] = q
            length[q] += length[p]
            pixels[q] += pixels[p]
    groups = owner[nearest]
    return [np.nonzero(groups == g)[0] for g in np.unique(groups)]
