"""
The synthetic "shapes world": a tiny, fully checkable stand-in for GenEval.

Three pieces live in this file:
1) a renderer that draws coloured circles / squares / triangles on a 4x4 grid
   of a 48x48 canvas (one object per cell),
2) prompt sets in GenEval's jsonl metadata format (the six GenEval tags plus
   five GenEval++-style mixed tags), and a sampler that builds a random scene
   satisfying any metadata line (used to make caption/image training pairs),
3) a pixel oracle (pure numpy, no learned model) that plays the role of
   GenEval's detector + rules: palette segmentation, connected components,
   shape-by-fill-ratio, then GenEval's counting / colour / position rules.

Write the prompt files with:
    python shapes.py prompts --out prompts --seed 0
"""

import argparse
import json
import os
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# the world

SHAPES = ("circle", "square", "triangle")
PLURALS = {s: s + "s" for s in SHAPES}
COLORS = {  # far apart in RGB: the closest pair (yellow/orange, red/orange) is ~86 apart
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 120, 20),
}
BACKGROUND = (255, 255, 255)
SIZES = ("small", "large")
IMAGE_SIZE = 48
GRID = 4
CELL = IMAGE_SIZE // GRID          # 12 px cells
SIZE_PX = {"small": 5, "large": 9}  # odd sizes keep the triangle's apex on a pixel
MAX_JITTER = 1                     # 9 px + 2*1 px jitter still leaves a 1 px gap between cells

NUMBERS = ("zero", "one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")    # GenEval "position"
REGIONS = ("left", "right", "above", "below")            # GenEval++ "region" (image halves)
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}

# the tiny model's tokenizer knows exactly these words ("," and "." are split off)
PROMPT_WORDS = tuple(
    "a an photo of and , . circle circles square squares triangle triangles "
    "red green blue yellow purple orange one two three four "
    "left right above below small large smaller larger on the".split())

# prompt sets
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_PLUS_TAGS = ("color_count_attr", "color_spatial_attr", "spatial_count_attr",
                     "size_spatial_attr", "multi_object_count_attr")
TRAIN_ONLY_TAGS = ("size",)              # plain small/large, so the model learns those words
GENEVAL_CAP, GENEVAL_PLUS_CAP = 50, 40   # max eval prompts per tag
EVAL_FRACTION = 0.5                      # at most this share of a tag's prompt space is held out
TRAIN_PER_TAG = 300                      # train prompts per tag (cycled with repeats if needed)

# oracle settings
COLOR_TOL = 70.0          # max RGB distance to a palette colour for a pixel to be "ink"
MIN_AREA = 8              # components smaller than this are specks (noise), dropped
LARGE_MIN_EXTENT = 7      # bbox extent (px) at or above which an object is "large"
SQUARE_MIN_FILL = 0.92    # row-span fill of the bbox: square 1.0, circle ~0.75-0.84,
CIRCLE_MIN_FILL = 0.65    # triangle ~0.51
POSITION_THRESHOLD = 0.1  # GenEval's margin factor on box dimensions

@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    row: int
    col: int

@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    size: str
    box: tuple   # (x0, y0, x1, y1), x1/y1 exclusive, so width = x1 - x0
    area: int    # number of pixels in the component

    @property
    def center(self):
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def cell(self):
        cx, cy = self.center
        return int(cy // CELL), int(cx // CELL)

# -----------------------------------------------------------------------------
# renderer

def obj_box(o, dx=0, dy=0):
    """Inclusive PIL box (x0, y0, x1, y1) of an object, centred in its cell."""
    s = SIZE_PX[o.size]
    x0 = o.col * CELL + (CELL - s) // 2 + dx
    y0 = o.row * CELL + (CELL - s) // 2 + dy
    return x0, y0, x0 + s - 1, y0 + s - 1

def render(objects, jitter=0, noise=0.0, rng=None):
    """Draw objects on a white 48x48 RGB canvas; optional +-jitter px and pixel noise std."""
    assert 0 <= jitter <= MAX_JITTER, "more jitter could make neighbouring objects touch"
    rng = np.random.default_rng() if rng is None else rng
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        dx, dy = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2)) if jitter else (0, 0)
        x0, y0, x1, y1 = obj_box(o, dx, dy)
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # upward isosceles triangle
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    if noise > 0:
        a = np.asarray(img, dtype=np.float32) + rng.normal(0.0, noise, (IMAGE_SIZE, IMAGE_SIZE, 3))
        img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
    return img

# -----------------------------------------------------------------------------
# scenes that satisfy a metadata line

def region_ok(region, row, col):
    """Is cell (row, col) in the given half of the image?"""
    half = GRID // 2
    return {"left": col < half, "right": col >= half, "above": row < half, "below": row >= half}[region]

def cell_relation_ok(rel, a, b):
    """Cell a is robustly `rel` of cell b: its main-axis offset dominates, so GenEval's rule holds
    even with jitter (exact diagonals are avoided: they sit right at the rule's 0.5 boundary)."""
    dr, dc = a[0] - b[0], a[1] - b[1]
    return {"left of": dc < 0 and abs(dr) < abs(dc), "right of": dc > 0 and abs(dr) < abs(dc),
            "above": dr < 0 and abs(dc) < abs(dr), "below": dr > 0 and abs(dc) < abs(dr)}[rel]

def sample_scene(meta, rng, extra=0, max_tries=1000):
    """A random list of Obj satisfying a GenEval metadata line (rejection sampling on positions).
    Unspecified colours/sizes/cells are random. The `extra` distractors only use shapes that the
    metadata never mentions, so they can't break counts, excludes or positions."""
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    color_names = list(COLORS)
    for _ in range(max_tries):
        free = [cells[i] for i in rng.permutation(len(cells))]
        groups = []
        for req in meta["include"]:
            size = {"larger": "large", "smaller": "small"}.get(req.get("size"), req.get("size"))
            group = []
            for _ in range(req["count"]):  # a half-image has 8 cells, we never ask for more
                rc = next(rc for rc in free if "region" not in req or region_ok(req["region"], *rc))
                free.remove(rc)
                group.append(Obj(req["class"], req.get("color") or str(rng.choice(color_names)),
                                 size or str(rng.choice(SIZES)), *rc))
            groups.append(group)
        if all(cell_relation_ok(req["position"][0], (a.row, a.col), (b.row, b.col))
               for req, group in zip(meta["include"], groups) if "position" in req
               for a in group for b in groups[req["position"][1]]):
            mentioned = {r["class"] for r in meta["include"] + meta.get("exclude", [])}
            others = [s for s in SHAPES if s not in mentioned]
            distractors = [Obj(str(rng.choice(others)), str(rng.choice(color_names)),
                               str(rng.choice(SIZES)), *rc) for rc in free[:extra]] if others else []
            return [o for group in groups for o in group] + distractors
    raise ValueError(f"could not sample a scene for {meta}")

# -----------------------------------------------------------------------------
# prompts with GenEval metadata

def item(shape, count=1, **attrs):
    """One include/exclude entry: {"class", "count", then color / position / size / region}."""
    return {"class": shape, "count": count, **attrs}

def phrase(req, numbered=False):
    """'a red circle', 'an orange square', 'three red circles', 'a larger circle on the above'."""
    n = req["count"]
    noun = " ".join([w for w in (req.get("size"), req.get("color")) if w]
                    + [req["class"] if n == 1 else PLURALS[req["class"]]])
    det = NUMBERS[n] if numbered else ("an" if noun[0] in "aeiou" else "a")
    return f"{det} {noun}" + (f" on the {req['region']}" if "region" in req else "")

def meta_line(tag, include, text, counted=False):
    """A GenEval jsonl line. Counting-style tags forbid more objects of a class than asked for."""
    meta = {"tag": tag, "include": include}
    if counted:
        totals = {}
        for req in include:
            totals[req["class"]] = totals.get(req["class"], 0) + req["count"]
        meta["exclude"] = [item(s, n + 1) for s, n in totals.items()]
    meta["prompt"] = "a photo of " + text
    return meta

SHAPE_PAIRS = [(a, b) for a in SHAPES for b in SHAPES if a != b]   # two distinct classes
COLOR_PAIRS = [(a, b) for a in COLORS for b in COLORS if a != b]
COUNT_PAIRS = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 1)]     # two groups, <= 4 objects
REGION_PAIRS = [(r, OPPOSITE[r]) for r in REGIONS]

def pair_lines(tag, attr_pairs, counted=False):
    """'a photo of <A> and <B>' for two distinct shapes, for each (attrs of A, attrs of B)."""
    lines = []
    for a, b in SHAPE_PAIRS:
        for attrs_a, attrs_b in attr_pairs:
            A, B = item(a, **attrs_a), item(b, **attrs_b)
            lines.append(meta_line(tag, [A, B], f"{phrase(A, counted)} and {phrase(B, counted)}", counted))
    return lines

def enumerate_tag(tag):
    """Every possible metadata line of a tag (the prompt spaces are small and finite)."""
    if tag == "single_object":
        return [meta_line(tag, [item(s)], phrase(item(s))) for s in SHAPES]
    if tag == "two_object":
        return pair_lines(tag, [({}, {})])
    if tag == "counting":
        return [meta_line(tag, [item(s, n)], phrase(item(s, n), True), True) for s in SHAPES for n in (2, 3, 4)]
    if tag == "colors":
        return [meta_line(tag, [item(s, color=c)], phrase(item(s, color=c))) for s in SHAPES for c in COLORS]
    if tag == "position":  # include[0] is the reference, include[1] is `rel` of it
        return [meta_line(tag, [item(b), item(a, position=[rel, 0])], f"{phrase(item(a))} {rel} {phrase(item(b))}")
                for a, b in SHAPE_PAIRS for rel in RELATIONS]
    if tag == "color_attr":
        return pair_lines(tag, [({"color": ca}, {"color": cb}) for ca, cb in COLOR_PAIRS])
    if tag == "color_count_attr":
        return pair_lines(tag, [({"count": na, "color": ca}, {"count": nb, "color": cb})
                                for ca, cb in COLOR_PAIRS for na, nb in COUNT_PAIRS], counted=True)
    if tag == "color_spatial_attr":
        return pair_lines(tag, [({"color": ca, "region": ra}, {"color": cb, "region": rb})
                                for ca, cb in COLOR_PAIRS for ra, rb in REGION_PAIRS])
    if tag == "spatial_count_attr":
        return pair_lines(tag, [({"count": na, "region": ra}, {"count": nb, "region": rb})
                                for na, nb in COUNT_PAIRS for ra, rb in REGION_PAIRS], counted=True)
    if tag == "size_spatial_attr":  # GenEval++'s phrasing, "on the above" included
        return pair_lines(tag, [({"size": sa, "region": ra}, {"size": sb, "region": rb})
                                for sa, sb in (("larger", "smaller"), ("smaller", "larger"))
                                for ra, rb in REGION_PAIRS])
    if tag == "multi_object_count_attr":  # all three shapes, 3..5 objects
        lines = []
        for order in [(a, b, c) for a, b in SHAPE_PAIRS for c in SHAPES if c not in (a, b)]:
            for ns in [(x, y, z) for x in (1, 2, 3) for y in (1, 2, 3) for z in (1, 2, 3) if x + y + z <= 5]:
                inc = [item(s, n) for s, n in zip(order, ns)]
                text = f"{phrase(inc[0], True)}, {phrase(inc[1], True)}, and {phrase(inc[2], True)}"
                lines.append(meta_line(tag, inc, text, counted=True))
        return lines
    if tag == "size":  # train-only: plain small/large, so the model learns those words
        colors = [{}] + [{"color": c} for c in COLORS]
        reqs = [item(s, size=z, **col) for s in SHAPES for z in SIZES for col in colors]
        return [meta_line(tag, [r], phrase(r)) for r in reqs]
    raise ValueError(f"unknown tag {tag}")

def hold_out(space, n_eval):
    """Greedily move up to n_eval prompts to eval, but only while every word of a held-out
    prompt still occurs in the tag's remaining train pool (e.g. "four" stays trainable)."""
    held, pool = [], list(space)
    for m in space:
        if len(held) == n_eval:
            break
        rest = [p for p in pool if p is not m]
        if set(m["prompt"].split()) <= {w for p in rest for w in p["prompt"].split()}:
            held.append(m)
            pool = rest
    return held, pool

def split_tag(tag, cap, rng):
    """(eval, train) lines of one tag: up to `cap` held-out eval prompts (never repeated), and
    TRAIN_PER_TAG train lines cycling through the rest (so small tags repeat, big ones don't)."""
    space = enumerate_tag(tag)
    space = [space[i] for i in rng.permutation(len(space))]
    if tag == "single_object":  # only 3 prompts exist: all of them go to eval
        return space, []
    held, pool = hold_out(space, min(cap, int(len(space) * EVAL_FRACTION)))
    return held, [pool[i % len(pool)] for i in range(TRAIN_PER_TAG)]

def make_prompt_sets(seed=0):
    """(train, geneval, geneval_plus) lists of metadata dicts, deterministic in the seed.
    Eval prompt texts are held out per tag and never appear in train."""
    rng = np.random.default_rng(seed)
    train, geneval, plus = [], [], []
    for tags, cap, evals in ((GENEVAL_TAGS, GENEVAL_CAP, geneval),
                             (GENEVAL_PLUS_TAGS, GENEVAL_PLUS_CAP, plus), (TRAIN_ONLY_TAGS, 0, [])):
        for tag in tags:
            held, lines = split_tag(tag, cap, rng)
            evals += held
            train += lines
    train = [train[i] for i in rng.permutation(len(train))]  # interleave the tags
    return train, geneval, plus

def write_prompt_files(out_dir, seed=0):
    """Write train.txt, train.jsonl, shapes_geneval.jsonl, shapes_geneval_plus.jsonl."""
    train, geneval, plus = make_prompt_sets(seed)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "train.txt"), "w") as f:
        f.writelines(m["prompt"] + "\n" for m in train)
    for name, metas in (("train", train), ("shapes_geneval", geneval), ("shapes_geneval_plus", plus)):
        with open(os.path.join(out_dir, name + ".jsonl"), "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in metas)

# -----------------------------------------------------------------------------
# pixel oracle

PALETTE_NAMES = ["background"] + list(COLORS)
PALETTE = np.array([BACKGROUND] + list(COLORS.values()), dtype=np.float32)

def segment_colors(image):
    """Per-pixel palette index (0 = background, i = PALETTE_NAMES[i]) by nearest colour."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):  # e.g. an upscaled sample: back to the 48 px world
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    dist = np.linalg.norm(a[:, :, None, :] - PALETTE[None, None], axis=-1)  # (H, W, 7)
    label = dist.argmin(-1)
    label[dist.min(-1) > COLOR_TOL] = 0  # far from every colour: not ink
    return label

def connected_components(mask):
    """Lists of (y, x) pixels of the 4-connected components of a boolean mask (BFS)."""
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, comp = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(comp)
    return comps

def span_fill(ys, xs, box):
    """Fill ratio of the bbox, counting each row's run from its leftmost to its rightmost
    pixel (so interior holes from pixel noise don't matter): square 1, circle ~0.8, triangle ~0.5."""
    spans = {}
    for y, x in zip(ys.tolist(), xs.tolist()):
        lo, hi = spans.get(y, (x, x))
        spans[y] = (min(lo, x), max(hi, x))
    filled = sum(hi - lo + 1 for lo, hi in spans.values())
    return filled / ((box[2] - box[0]) * (box[3] - box[1]))

def classify_shape(fill):
    """Shape from the (span) fill ratio of the bounding box."""
    return "square" if fill >= SQUARE_MIN_FILL else "circle" if fill >= CIRCLE_MIN_FILL else "triangle"

def detect(image):
    """All objects in an image: one Detection per same-colour connected component."""
    label = segment_colors(image)
    dets = []
    for ci in range(1, len(PALETTE_NAMES)):
        for comp in connected_components(label == ci):
            if len(comp) < MIN_AREA:
                continue
            ys, xs = np.array(comp).T
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            w, h = box[2] - box[0], box[3] - box[1]
            size = "large" if max(w, h) >= LARGE_MIN_EXTENT else "small"
            dets.append(Detection(classify_shape(span_fill(ys, xs, box)), PALETTE_NAMES[ci],
                                  size, box, len(comp)))
    return dets

def relative_position(box_a, box_b):
    """GenEval's rule: the set of relations of box A w.r.t. box B (boxes as x0, y0, x1, y1)."""
    boxes = np.array([box_a, box_b], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5: rels.add("left of")
    if dx > 0.5: rels.add("right of")
    if dy < -0.5: rels.add("above")
    if dy > 0.5: rels.add("below")
    return rels

def in_region(det, region):
    """GenEval++ region: is the box centre in that half of the image?"""
    cx, cy = det.center
    half = IMAGE_SIZE / 2
    return {"left": cx < half, "right": cx > half, "above": cy < half, "below": cy > half}[region]

def matches(det, req):
    """Does a detection fit an include/exclude item's class, colour, plain size and region?"""
    return (det.shape == req["class"] and req.get("color", det.color) == det.color
            and (req.get("size") not in SIZES or det.size == req["size"])
            and ("region" not in req or in_region(det, req["region"])))

def describe(req):
    """'small red circle on the left': an item's filters, for reason strings."""
    size = req.get("size") if req.get("size") in SIZES else None
    words = [w for w in (size, req.get("color"), req["class"]) if w]
    return " ".join(words) + (f" on the {req['region']}" if "region" in req else "")

def bbox_area(det):
    """Box area, used for GenEval++'s larger/smaller comparison."""
    return (det.box[2] - det.box[0]) * (det.box[3] - det.box[1])

def oracle(image, meta):
    """GenEval's rules on our detections -> (correct, reason); reason is "ok" when correct.
    include: >= count detections of the class (and colour / small-large size / region if given);
    position: some candidate is `rel` of some candidate of include[idx] (GenEval's box rule);
    larger/smaller: some candidate's box is bigger than some candidate of the "smaller" item;
    exclude: fail if >= count detections of the class. Other objects are ignored, as in GenEval."""
    dets = detect(image)
    include = meta["include"]
    cands = [[d for d in dets if matches(d, req)] for req in include]
    reasons = []
    for i, req in enumerate(include):
        if len(cands[i]) < req["count"]:
            reasons.append(f"expected {req['count']} {describe(req)}, found {len(cands[i])}")
            continue
        if "position" in req:
            rel, j = req["position"]
            if not any(rel in relative_position(a.box, b.box) for a in cands[i] for b in cands[j]):
                reasons.append(f"expected {req['class']} {rel} {include[j]['class']}")
        if req.get("size") == "larger":  # compare with the item that should be smaller
            j = next(k for k, r in enumerate(include) if r.get("size") == "smaller")
            if not any(bbox_area(a) > bbox_area(b) for a in cands[i] for b in cands[j]):
                reasons.append(f"expected {req['class']} larger than {include[j]['class']}")
    for req in meta.get("exclude", []):
        n = sum(matches(d, req) for d in dets)
        if n >= req["count"]:
            reasons.append(f"expected fewer than {req['count']} {describe(req)}, found {n}")
    return (not reasons), ("; ".join(reasons) or "ok")

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts", help="write the prompt files")
    p.add_argument("--out", default="prompts")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.cmd == "prompts":
        write_prompt_files(args.out, args.seed)
        print(f"wrote prompt files to {args.out}/")
