"""
The synthetic "shapes world": a tiny, fully checkable stand-in for GenEval.

Three pieces live in this file:
1) a renderer that draws 8 shape classes in GenEval's 10 colour names, small or large, on a 4x4
   grid of a 64x64 mid-grey canvas (one object per 16 px cell),
2) prompt sets in GenEval's jsonl metadata format: GenEval's six tags (`shapes_geneval.jsonl`,
   GenEval's tag proportions) and GenEval++'s seven (`shapes_geneval_plus.jsonl`, 40 per tag),
   held out at random per tag, and a sampler that builds a random scene satisfying any metadata
   line (used to make caption/image training pairs),
3) a pixel oracle (pure numpy, no learned model) that plays the role of GenEval's detector:
   palette segmentation, connected components, shape and size by template matching; its
   detections are scored by GenEval's own rules, `geneval_rules.evaluate`, the same rule engine
   as eval_geneval.py's Mask2Former scorer.

Write the prompt files with:
    python -m world.shapes prompts --out prompts --seed 0
"""

import argparse
import itertools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from world import geneval_rules as rules

# -----------------------------------------------------------------------------
# the world

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "heart")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}  # GenEval's plural: crosses
# GenEval's 10 names; nearest pair (orange/yellow) 87 apart in RGB, each >= 92 from the background
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (250, 150, 200),
    "brown": (130, 75, 30),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
assert list(COLORS) == rules.COLORS, "the world's colour names are GenEval's"
BACKGROUND = (128, 128, 128)  # mid-grey: black and white objects both show
SIZES = ("small", "large")
IMAGE_SIZE = 64
GRID = 4
CELL = IMAGE_SIZE // GRID  # 16 px cells
SIZE_PX = {"small": 9, "large": 13}  # odd sizes keep apexes and bars centred on a pixel
MAX_JITTER = 1  # 13 px + 2*1 px jitter still leaves a 1 px gap between cells

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven")
MAX_OBJECTS = len(NUMBERS) - 1  # GenEval's tags ask for <= 4 objects, GenEval++'s for <= 7
RELATIONS = ("left of", "right of", "above", "below")  # GenEval "position"
REGIONS = ("left", "right", "above", "below")  # GenEval++ "region" (image halves)
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}

# the tiny model's tokenizer knows exactly these words ("," and "." are split off)
PROMPT_WORDS = tuple(
    "a an photo of and , . on the left right above below small large smaller larger".split()
    + list(SHAPES)
    + list(PLURALS.values())
    + list(COLORS)
    + list(NUMBERS[1:])
)

# oracle settings
COLOR_TOL = 70.0  # max RGB distance to a palette colour for a pixel to be "ink"
MIN_AREA = 8  # components smaller than this are specks (noise), dropped
MIN_IOU = 0.5  # a component matching no template this well is not an object
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
    box: tuple  # (x0, y0, x1, y1), x1/y1 exclusive, so width = x1 - x0
    area: int  # number of pixels in the component

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


def draw_shape(draw, shape, box, fill):
    """Draw one shape filling the inclusive square box (odd side s); integer vertices only, so a
    shifted box gives exactly the shifted pixels."""
    x0, y0, x1, y1 = box
    s = x1 - x0 + 1
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":  # upward isosceles
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":  # two 3 px bars
        h = s // 8
        draw.rectangle((x0, cy - h, x1, cy + h), fill=fill)
        draw.rectangle((cx - h, y0, cx + h, y1), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, s // 4))
    elif shape == "star":  # five points, inner radius 0.45 of the outer
        R = (s - 1) / 2
        draw.polygon(
            [
                (
                    cx + round(r * math.sin(k * math.pi / 5)),
                    y0 + round(R - r * math.cos(k * math.pi / 5)),
                )
                for k in range(10)
                for r in [R if k % 2 == 0 else 0.45 * R]
            ],
            fill=fill,
        )
    elif shape == "heart":  # two discs and a downward triangle
        q = s // 2
        draw.ellipse((x0, y0, x0 + q, y0 + q), fill=fill)
        draw.ellipse((x1 - q, y0, x1, y0 + q), fill=fill)
        draw.polygon([(x0, y0 + q // 2 + 1), (x1, y0 + q // 2 + 1), (cx, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape}")


def render(objects, jitter=0, noise=0.0, rng=None):
    """Draw objects on a mid-grey 64x64 RGB canvas; optional +-jitter px and pixel noise std."""
    assert 0 <= jitter <= MAX_JITTER, "more jitter could make neighbouring objects touch"
    rng = np.random.default_rng() if rng is None else rng
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        dx, dy = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2)) if jitter else (0, 0)
        draw_shape(draw, o.shape, obj_box(o, dx, dy), COLORS[o.color])
    if noise > 0:
        a = np.asarray(img, dtype=np.float32) + rng.normal(0.0, noise, (IMAGE_SIZE, IMAGE_SIZE, 3))
        img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
    return img


# -----------------------------------------------------------------------------
# scenes that satisfy a metadata line


def region_ok(region, row, col):
    """Is cell (row, col) in the given half of the image?"""
    half = GRID // 2
    return {"left": col < half, "right": col >= half, "above": row < half, "below": row >= half}[
        region
    ]


def cell_relation_ok(rel, a, b):
    """Cell a is robustly `rel` of cell b: its main-axis offset dominates, so GenEval's rule holds
    even with jitter (exact diagonals are avoided: they sit right at the rule's 0.5 boundary)."""
    dr, dc = a[0] - b[0], a[1] - b[1]
    return {
        "left of": dc < 0 and abs(dr) < abs(dc),
        "right of": dc > 0 and abs(dr) < abs(dc),
        "above": dr < 0 and abs(dc) < abs(dr),
        "below": dr > 0 and abs(dc) < abs(dr),
    }[rel]


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
                group.append(
                    Obj(
                        req["class"],
                        req.get("color") or str(rng.choice(color_names)),
                        size or str(rng.choice(SIZES)),
                        *rc,
                    )
                )
            groups.append(group)
        if all(
            cell_relation_ok(req["position"][0], (a.row, a.col), (b.row, b.col))
            for req, group in zip(meta["include"], groups)
            if "position" in req
            for a in group
            for b in groups[req["position"][1]]
        ):
            mentioned = {r["class"] for r in meta["include"] + meta.get("exclude", [])}
            others = [s for s in SHAPES if s not in mentioned]
            distractors = (
                [
                    Obj(
                        str(rng.choice(others)),
                        str(rng.choice(color_names)),
                        str(rng.choice(SIZES)),
                        *rc,
                    )
                    for rc in free[:extra]
                ]
                if others
                else []
            )
            return [o for group in groups for o in group] + distractors
    raise ValueError(f"could not sample a scene for {meta}")


# -----------------------------------------------------------------------------
# prompts with GenEval metadata

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_PLUS_TAGS = (
    "color_attr",
    "color_count_attr",
    "color_spatial_attr",
    "counting",  # GenEval++'s 7
    "multi_object_count_attr",
    "size_spatial_attr",
    "spatial_count_attr",
)
TRAIN_ONLY_TAGS = ("size",)  # plain small/large, so the model learns those words
BENCHMARKS = {
    "geneval": GENEVAL_TAGS,
    "geneval_plus": GENEVAL_PLUS_TAGS,
    "train_only": TRAIN_ONLY_TAGS,
}
GENEVAL_PER_TAG = {
    "single_object": len(SHAPES),
    "two_object": 99,
    "counting": 80,  # GenEval's own
    "colors": 94,
    "position": 100,
    "color_attr": 100,
}  # 553 prompts in all
GENEVAL_PLUS_PER_TAG = 40  # GenEval++: 7 tags x 40
EVAL_FRACTION = 0.75  # at most this share of a tag's prompt space is held out
TRAIN_PER_TAG = 300  # train lines per tag (repeats when the space is small)
NUMBERED_TAGS = ("counting", "color_count_attr", "spatial_count_attr", "multi_object_count_attr")
EXCLUDE_TAGS = ("counting",)  # as in GenEval and GenEval++, only counting forbids extras


def item(shape, count=1, **attrs):
    """One include/exclude entry: {"class", "count", then color / position / size / region}."""
    return {"class": shape, "count": count, **attrs}


def phrase(req, numbered=False):
    """'a red circle', 'an orange square', 'three red circles', 'a larger circle on the above'."""
    n = req["count"]
    noun = " ".join(
        [w for w in (req.get("size"), req.get("color")) if w]
        + [req["class"] if n == 1 else PLURALS[req["class"]]]
    )
    det = NUMBERS[n] if numbered else ("an" if noun[0] in "aeiou" else "a")
    return f"{det} {noun}" + (f" on the {req['region']}" if "region" in req else "")


def join_list(parts):
    """'A', 'A and B', 'A, B, and C' (GenEval++'s lists)."""
    return (
        parts[0]
        if len(parts) == 1
        else " and ".join(parts)
        if len(parts) == 2
        else ", ".join(parts[:-1]) + ", and " + parts[-1]
    )


def make_line(tag, include):
    """The GenEval metadata line of a tag's include list: GenEval's phrasing ("a photo of ..."),
    numbers for counting-style tags, and for counting an exclude of one more object."""
    if tag == "position":  # include[1] is `rel` of include[0]
        text = f"{phrase(include[1])} {include[1]['position'][0]} {phrase(include[0])}"
    else:
        text = join_list([phrase(r, tag in NUMBERED_TAGS) for r in include])
    meta = {"tag": tag, "include": include}
    if tag in EXCLUDE_TAGS:
        meta["exclude"] = [item(r["class"], r["count"] + 1) for r in include]
    meta["prompt"] = "a photo of " + text
    return meta


def perms(options, k):
    """All ordered k-tuples of distinct options."""
    return list(itertools.permutations(options, k))


# GenEval++: 2..6 objects
COUNT_PAIRS = [(a, b) for a in range(1, 5) for b in range(1, 5) if a + b <= 6]
COUNT_TRIPLES = [
    (a, b, c) for a in range(1, 4) for b in range(1, 4) for c in range(1, 4) if a + b + c <= 7
]
REGION_PAIRS = [(r, OPPOSITE[r]) for r in REGIONS]
SIZE_PAIRS = [("larger", "smaller"), ("smaller", "larger")]


def tag_space(bench, tag):
    """A tag's prompt space as sub-spaces (weight, axes, build): a line is `build` of one option
    per axis; a sub-space is drawn with probability proportional to its weight."""
    two, colors = perms(SHAPES, 2), [(c,) for c in COLORS]
    geneval = {
        "single_object": [(1, [perms(SHAPES, 1)], lambda s: [item(*s)])],
        "two_object": [(1, [two], lambda s: [item(s[0]), item(s[1])])],
        "counting": [(1, [perms(SHAPES, 1), (2, 3, 4)], lambda s, n: [item(s[0], n)])],
        "colors": [(1, [perms(SHAPES, 1), colors], lambda s, c: [item(s[0], color=c[0])])],
        "position": [
            (1, [two, RELATIONS], lambda s, rel: [item(s[1]), item(s[0], position=[rel, 0])])
        ],
        "color_attr": [
            (1, [two, perms(COLORS, 2)], lambda s, c: [item(a, color=ca) for a, ca in zip(s, c)])
        ],
    }
    plus = {  # GenEval++: the colour lists are 3 or 4 objects (30:10 in GenEval++), counts as there
        "color_attr": [
            (
                3,
                [perms(SHAPES, 3), perms(COLORS, 3)],
                lambda s, c: [item(a, color=ca) for a, ca in zip(s, c)],
            ),
            (
                1,
                [perms(SHAPES, 4), perms(COLORS, 4)],
                lambda s, c: [item(a, color=ca) for a, ca in zip(s, c)],
            ),
        ],
        "color_count_attr": [
            (
                1,
                [two, perms(COLORS, 2), COUNT_PAIRS],
                lambda s, c, n: [item(a, k, color=ca) for a, ca, k in zip(s, c, n)],
            )
        ],
        "color_spatial_attr": [
            (
                1,
                [two, perms(COLORS, 2), REGION_PAIRS],
                lambda s, c, g: [item(a, color=ca, region=ga) for a, ca, ga in zip(s, c, g)],
            )
        ],
        "counting": [(1, [perms(SHAPES, 1), (4, 5, 6, 7)], lambda s, n: [item(s[0], n)])],
        "multi_object_count_attr": [
            (19, [two, COUNT_PAIRS], lambda s, n: [item(a, k) for a, k in zip(s, n)]),
            (
                21,
                [perms(SHAPES, 3), COUNT_TRIPLES],
                lambda s, n: [item(a, k) for a, k in zip(s, n)],
            ),
        ],
        "size_spatial_attr": [
            (
                1,
                [two, SIZE_PAIRS, REGION_PAIRS],
                lambda s, z, g: [item(a, size=za, region=ga) for a, za, ga in zip(s, z, g)],
            )
        ],
        "spatial_count_attr": [
            (
                1,
                [two, COUNT_PAIRS, REGION_PAIRS],
                lambda s, n, g: [item(a, k, region=ga) for a, k, ga in zip(s, n, g)],
            )
        ],
    }
    train_only = {
        "size": [
            (
                1,
                [perms(SHAPES, 1), SIZES, [None] + list(COLORS)],
                lambda s, z, c: [item(s[0], size=z, **({"color": c} if c else {}))],
            )
        ]
    }
    return {"geneval": geneval, "geneval_plus": plus, "train_only": train_only}[bench][tag]


def space_size(bench, tag):
    """Number of distinct lines of a tag."""
    return sum(math.prod(len(ax) for ax in axes) for _, axes, _ in tag_space(bench, tag))


def sample_line(bench, tag, rng):
    """A uniformly random line of one weighted sub-space of a tag."""
    subs = tag_space(bench, tag)
    w = np.array([s[0] for s in subs], dtype=float)
    _, axes, build = subs[int(rng.choice(len(subs), p=w / w.sum()))]
    return make_line(tag, build(*[ax[int(rng.integers(len(ax)))] for ax in axes]))


def enumerate_tag(bench, tag):
    """Every line of a tag (only for the small spaces; the large ones are sampled)."""
    return [
        make_line(tag, build(*choice))
        for _, axes, build in tag_space(bench, tag)
        for choice in itertools.product(*axes)
    ]


# spaces up to this size are listed to draw train lines; larger ones are sampled
ENUMERATE_MAX = 50_000


def draw_eval(bench, tag, n_max, rng):
    """Up to n_max distinct held-out lines of a tag, drawn at random (i.i.d. over the tag's weighted
    space), never more than EVAL_FRACTION of the space (all of single_object's). In the listable
    spaces a draw is skipped if one of its words would be left in no remaining line of the tag,
    so that every eval word stays trainable (e.g. "six" only occurs in GenEval++ counting)."""
    size = space_size(bench, tag)
    n = size if tag == "single_object" else min(n_max, int(size * EVAL_FRACTION))
    words = None
    if tag != "single_object" and size <= ENUMERATE_MAX:
        words = Counter(w for m in enumerate_tag(bench, tag) for w in set(m["prompt"].split()))
    held = {}
    for _ in range(100 * n):
        if len(held) == n:
            break
        m = sample_line(bench, tag, rng)
        if m["prompt"] in held:
            continue
        if words is not None:
            mine = set(m["prompt"].split())
            if any(words[w] <= 1 for w in mine):
                continue
            words.subtract(mine)
        held[m["prompt"]] = m
    return list(held.values())


def draw_train(bench, tag, n, rng, held_out):
    """n train lines of a tag whose texts are not in held_out (cycling when the space is small)."""
    if space_size(bench, tag) <= ENUMERATE_MAX:
        pool = [m for m in enumerate_tag(bench, tag) if m["prompt"] not in held_out]
        pool = [pool[i] for i in rng.permutation(len(pool))]
        return [pool[i % len(pool)] for i in range(n)] if pool else []
    lines = []
    while len(lines) < n:
        m = sample_line(bench, tag, rng)
        if m["prompt"] not in held_out:
            lines.append(m)
    return lines


def make_prompt_sets(seed=0):
    """(train, geneval, geneval_plus) lists of metadata dicts, deterministic in the seed.
    Eval lines are drawn at random per tag; no eval text (of either set) is a train line."""
    rng = np.random.default_rng(seed)
    geneval = [m for t in GENEVAL_TAGS for m in draw_eval("geneval", t, GENEVAL_PER_TAG[t], rng)]
    plus = [
        m
        for t in GENEVAL_PLUS_TAGS
        for m in draw_eval("geneval_plus", t, GENEVAL_PLUS_PER_TAG, rng)
    ]
    held_out = {m["prompt"] for m in geneval + plus}
    train = [
        m
        for bench, tags in BENCHMARKS.items()
        for t in tags
        for m in draw_train(bench, t, TRAIN_PER_TAG, rng, held_out)
    ]
    train = [train[i] for i in rng.permutation(len(train))]  # interleave the tags
    return train, geneval, plus


def write_prompt_files(out_dir, seed=0):
    """Write train.txt, train.jsonl, shapes_geneval.jsonl, shapes_geneval_plus.jsonl."""
    train, geneval, plus = make_prompt_sets(seed)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "train.txt"), "w") as f:
        f.writelines(m["prompt"] + "\n" for m in train)
    for name, metas in (
        ("train", train),
        ("shapes_geneval", geneval),
        ("shapes_geneval_plus", plus),
    ):
        with open(os.path.join(out_dir, name + ".jsonl"), "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in metas)


# -----------------------------------------------------------------------------
# pixel oracle: a detector for the shapes world, scored by geneval_rules

PALETTE_NAMES = ["background"] + list(COLORS)
PALETTE = np.array([BACKGROUND] + list(COLORS.values()), dtype=np.float32)


def segment_colors(image):
    """Per-pixel palette index (0 = background, i = PALETTE_NAMES[i]) by nearest colour."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):  # e.g. an upscaled sample: back to the 64 px world
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)
    a = np.asarray(image.convert("RGB"), dtype=np.int32)
    key = (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
    colors, inverse = np.unique(key, return_inverse=True)  # label each distinct colour once
    rgb = np.stack([colors >> 16, (colors >> 8) & 255, colors & 255], -1).astype(np.float32)
    dist2 = ((rgb[:, None, :] - PALETTE[None]) ** 2).sum(-1)  # (colours, 11) squared distances
    label = dist2.argmin(-1)
    label[dist2.min(-1) > COLOR_TOL**2] = 0  # far from every colour: not ink
    return label[inverse].reshape(key.shape)


def shape_mask(shape, size):
    """The boolean mask of one rendered shape, cropped to its bounding box."""
    s = SIZE_PX[size]
    img = Image.new("L", (s + 2, s + 2), 0)
    draw_shape(ImageDraw.Draw(img), shape, (1, 1, s, s), 255)
    a = np.asarray(img) > 0
    ys, xs = np.nonzero(a)
    return a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


TEMPLATE_KEYS = [(shape, size) for shape in SHAPES for size in SIZES]
CANVAS = CELL + 2  # a component is matched on a (CELL+2)^2 canvas: an object never exceeds its cell


def shifted_templates():
    """(len(TEMPLATE_KEYS) * 9, CANVAS, CANVAS) masks: each template at offsets 0..2 px down and
    right, so that matching a component placed at offset (1, 1) tries shifts of -1..1 px (a
    decoded shape may be a pixel off)."""
    out = []
    for key in TEMPLATE_KEYS:
        t = shape_mask(*key)
        for dy in range(3):
            for dx in range(3):
                canvas = np.zeros((CANVAS, CANVAS), bool)
                canvas[dy : dy + t.shape[0], dx : dx + t.shape[1]] = t
                out.append(canvas)
    return np.stack(out)


TEMPLATES = shifted_templates()


def classify(mask):
    """(shape, size, iou) of the template that best matches a component's bbox-cropped mask, over
    shifts of -1..1 px. Noise holes and specks lower every template's IoU alike; the nearest other
    template is at most 0.77 IoU from an exact render (measured over all pairs, both sizes).
    A component bigger than a cell matches nothing (iou 0)."""
    if max(mask.shape) > CELL:
        return None, None, 0.0
    canvas = np.zeros((CANVAS, CANVAS), bool)
    canvas[1 : 1 + mask.shape[0], 1 : 1 + mask.shape[1]] = mask
    iou = (TEMPLATES & canvas).sum((1, 2)) / (TEMPLATES | canvas).sum((1, 2))
    best = int(iou.argmax())
    return (*TEMPLATE_KEYS[best // 9], float(iou[best]))


def detect(image):
    """All objects in an image, in reading order (top-left cell first): one Detection per
    same-colour 4-connected component that matches some (shape, size) template with
    IoU >= MIN_IOU."""
    label = segment_colors(image)
    dets = []
    for ci in np.unique(label[label > 0]).tolist():  # the colours present
        comps, _ = ndimage.label(label == ci)  # default structure: 4-connectivity
        for k, sl in enumerate(ndimage.find_objects(comps), start=1):
            mask = comps[sl] == k
            area = int(mask.sum())
            if area < MIN_AREA:
                continue
            box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
            shape, size, iou = classify(mask)
            if iou >= MIN_IOU:
                dets.append(Detection(shape, PALETTE_NAMES[ci], size, box, area))
    return sorted(dets, key=lambda d: (d.cell, d.box))


def rule_detections(dets):
    """The pixel detector's objects as geneval_rules detections. It is certain of every object
    (score 1), so GenEval's "best first" order among a class is the reading order of `detect`."""
    return [rules.Detection(d.shape, 1.0, d.box, color=d.color, size=d.size) for d in dets]


def judge(dets, meta):
    """GenEval's rules (geneval_rules.evaluate, the same engine as eval_geneval.py's Mask2Former
    scorer) on `detect`'s objects -> (correct, reason); reason is "ok" when correct. Every
    detection is kept (no score threshold: the detector has no false positives to drop)."""
    grouped = rules.select_detections(
        rule_detections(dets),
        meta["tag"],
        threshold=0.0,
        counting_threshold=0.0,
        max_per_class=GRID * GRID,
    )
    ok, reason = rules.evaluate(meta, grouped, (IMAGE_SIZE, IMAGE_SIZE), margin=POSITION_THRESHOLD)
    return ok, reason or "ok"


def oracle(image, meta):
    """The pixel oracle: detect, then GenEval's rules (`judge`) -> (correct, reason)."""
    return judge(detect(image), meta)


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts", help="write the prompt files")
    p.add_argument("--out", default="prompts")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.cmd == "prompts":
        write_prompt_files(args.out, args.seed)
        print(f"wrote prompt files to {args.out}/")
