"""GenEval's scoring rules, as pure functions over detections: the one rule engine of this repo.

Two detectors feed it: eval_geneval.py's Mask2Former + CLIP scorer (real images, COCO classes)
and world/shapes.py's pixel detector (the synthetic shapes world). Both produce `Detection` records;
`select_detections` groups them by class, best first, and `evaluate` applies GenEval's rules:

- include: the top-`count` detections of the class must exist; if a colour is asked for, the
  colour of each of those top-`count` detections is checked (all must match);
- position [rel, j]: each of those detections must be `rel` of every detection of include j;
- exclude: fail if at least `count` detections of the class exist.

GenEval++ fields have no official rule; they are scored by proxies here: `region` (the box centre's
half of the image), comparative `size` (mean box areas). The shapes world's absolute sizes
("small"/"large") are checked like colours, on each detection's `size`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

# GenEval's
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]


@dataclass
class Detection:
    """One detected object: class name, confidence, box (x1, y1, x2, y2), optional mask, colour
    and size."""

    cls: str
    score: float
    box: tuple
    mask: np.ndarray | None = None
    color: str | None = None
    size: str | None = None  # "small"/"large": only the shapes world's detector sets it


def select_detections(
    raw: list[Detection], tag: str, threshold=0.3, counting_threshold=0.9, max_per_class=16
) -> dict[str, list[Detection]]:
    """Group detections by class, best first: score > threshold (0.9 for 'counting'), <= 16 each,
    no NMS. Ties keep the input order (Python's sort is stable)."""
    thr = counting_threshold if tag == "counting" else threshold
    groups: dict[str, list[Detection]] = {}
    for det in sorted(raw, key=lambda d: -d.score):
        kept = groups.setdefault(det.cls, [])
        if det.score > thr and len(kept) < max_per_class:
            kept.append(det)
    return {cls: dets for cls, dets in groups.items() if dets}


def relative_position(box_a, box_b, margin=0.1) -> set[str]:
    """Relations of box A to box B (GenEval rule): centre offset shrunk by margin*(sum of sizes)."""
    a, b = np.asarray(box_a[:4], float), np.asarray(box_b[:4], float)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - margin * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = {"left of"} if dx < -0.5 else {"right of"} if dx > 0.5 else set()
    return rels | ({"above"} if dy < -0.5 else {"below"} if dy > 0.5 else set())


def image_regions(box, image_size) -> set[str]:
    """GenEval++ proxy: which halves of the image (width, height) contain the box centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    w, h = image_size
    horiz = {"left"} if cx < w / 2 else {"right"} if cx > w / 2 else set()
    return horiz | ({"above"} if cy < h / 2 else {"below"} if cy > h / 2 else set())


def mean_area(group: list[Detection]) -> float:
    """Mean (x1, y1, x2, y2) box area of a group of detections."""
    return float(np.mean([(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) for d in group]))


def lacks_an_object(reason: str) -> bool:
    """Did `evaluate` fail an image because a named class has fewer detections than the prompt
    asks for?"""
    return any(re.fullmatch(r"expected .+>=\d+, found \d+", r) for r in reason.split("; "))


def evaluate(
    meta: dict,
    detected: dict[str, list[Detection]],
    image_size,
    color_fn: Callable | None = None,
    margin=0.1,
) -> tuple[bool, str]:
    """Apply GenEval's rules (+ GenEval++ proxies) to grouped detections -> (correct, reason).

    `color_fn(objects, class_name) -> list[colour]` names the objects' colours;
    by default each Detection's own `.color` is used.
    """
    color_fn = color_fn or (lambda objs, cls: [d.color for d in objs])
    reasons, groups = [], []
    for req in meta["include"]:
        cls, n = req["class"], req["count"]
        found = detected.get(cls, [])[:n]
        ok = len(found) >= n
        if not ok:
            # read back by `lacks_an_object`
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        if ok and "color" in req:
            colors = color_fn(found, cls)
            if colors.count(req["color"]) < n:
                ok = False
                seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                reasons.append(f"expected {req['color']} {cls}>={n}, found {seen}")
        if ok and req.get("size") in ("small", "large"):  # the shapes world's absolute sizes
            if any(d.size != req["size"] for d in found):
                ok = False
                sizes = ", ".join(str(d.size) for d in found)
                reasons.append(f"expected {req['size']} {cls}>={n}, found {sizes}")
        if ok and "position" in req:
            rel, target = req["position"]
            if target >= len(groups) or groups[target] is None:
                ok = False
                reasons.append(f"no target for {cls} to be {rel}")
            else:
                for obj in found:
                    wrong = [relative_position(obj.box, t.box, margin) for t in groups[target]]
                    wrong = [r for r in wrong if rel not in r]
                    if wrong:
                        ok = False
                        reasons.append(
                            f"expected {cls} {rel} target, found "
                            f"{' and '.join(sorted(wrong[0])) or 'no relation'}"
                        )
                        break
        if ok and "region" in req:  # GenEval++ proxy
            if any(req["region"] not in image_regions(d.box, image_size) for d in found):
                ok = False
                reasons.append(f"expected {cls} in the {req['region']} half (proxy)")
        groups.append(found if ok else None)
    # GenEval++ proxy: a "larger" group's mean box area must beat every other comparative group's.
    sized = [i for i, r in enumerate(meta["include"]) if r.get("size") in ("larger", "smaller")]
    for i in sized:
        req, others = meta["include"][i], [j for j in sized if j != i]
        if groups[i] is None or not others:
            continue
        if any(groups[j] is None for j in others):
            reasons.append(f"no size reference for {req['class']} (proxy)")
            continue
        area, refs = mean_area(groups[i]), [mean_area(groups[j]) for j in others]
        if not (area > max(refs) if req["size"] == "larger" else area < min(refs)):
            reasons.append(f"expected {req['class']} {req['size']} (box area {area:.0f}, proxy)")
    for req in meta.get("exclude", []):
        found = len(detected.get(req["class"], []))
        if found >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {found}")
    return not reasons, "; ".join(reasons)
