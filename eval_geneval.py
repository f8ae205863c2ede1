"""Score generated images the GenEval way, with transformers models (no mmdet).

GenEval (Ghosh et al., 2023) checks whether an image contains what its prompt
asks for: the right objects, the right number of them, their colours and their
relative positions.  It detects objects with Mask2Former (COCO classes), names
each object's colour with CLIP zero-shot, and applies simple geometric rules.
This file re-implements that pipeline with Hugging Face models:

    OUT/<00000>/metadata.jsonl      one line: the prompt's metadata dict
    OUT/<00000>/samples/<0000>.png  the generated images for that prompt
    OUT/generate.json               generate's record: prompts, images per prompt, image size

Subcommands (figures and experiments built on these live in tools/experiments.py):
    generate         sample N images per prompt from a gvu.py model (+ adapter) into that layout
    score FOLDER     check the folder; detect, apply the rules, write results.jsonl + summary.*
    compare B R...   a base vs trained runs (paired: the same prompts) per tag: mean ± std across
                     runs, 95% bootstrap interval
    prompts          GenEval-style training prompts over the 80 COCO classes

The rules (`select_detections`, `relative_position`, `evaluate`, ...) are pure
functions over `Detection` records, so they can be tested without any model.
A scorer is any function `scorer(image, meta) -> (correct, reason)`.
GenEval++ fields `region` and `size` have no official rule here: we score them
with a simple rule-based proxy (box centre's half of the image; box areas).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import uuid
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np
import torch
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from PIL import Image, ImageOps
from tqdm import tqdm
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    CLIPModel,
    Mask2FormerForUniversalSegmentation,
)

import gvu
from tools import runio
from world import shapes
from tools import vlm_judge
from models.adapters import InputError, load_umm, pick_device, use_bf16
from world.geneval_rules import (  # the rule engine; tests read its functions from here too
    COLORS,
    Detection,
    evaluate,
    image_regions,  # noqa: F401
    mean_area,  # noqa: F401
    relative_position,  # noqa: F401
    select_detections,
)

# GenEval's 80 class names, in COCO index order (note its renames:
# "computer mouse", "tv remote", "computer keyboard").
GENEVAL_CLASSES = [
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "computer mouse",
    "tv remote",
    "computer keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
]
COLOR_TEMPLATES = [
    "a photo of a {c} {cls}",
    "a photo of a {c}-colored {cls}",
    "a photo of a {c} object",
]
RELATIONS = ["left of", "right of", "above", "below"]
# GenEval++: "above" = top half, "below" = bottom half
REGIONS = ["left", "right", "above", "below"]
# GenEval++ comparatives; the shapes world's absolutes
SIZES = ["larger", "smaller", "small", "large"]
GENEVAL_TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
GENEVAL_PP_TAGS = [
    "color_count_attr",
    "size_spatial_attr",
    "multi_object_count_attr",
    "spatial_count_attr",
    "color_spatial_attr",
]
# + the shapes world's train-only "size" tag
KNOWN_TAGS = set(GENEVAL_TAGS + GENEVAL_PP_TAGS) | {"size"}
NUMBER_WORDS = {
    1: "one",
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
}
PROXY_NOTE = (
    "region/size (GenEval++) are scored by a rule-based proxy, not an official GenEval rule"
)


class GenEvalError(Exception):
    """A user-facing problem (bad input); main() prints it as one line."""


# --------------------------------------------------------------------------- metadata & folders


def validate_meta(meta, where: str, classes=GENEVAL_CLASSES) -> dict:
    """Check one GenEval metadata dict; raise GenEvalError naming `where` if malformed."""

    def bad(msg):
        raise GenEvalError(f"{where}: {msg}")

    if not isinstance(meta, dict):
        bad("metadata must be a JSON object")
    if meta.get("tag") not in KNOWN_TAGS:
        bad(f"unknown tag {meta.get('tag')!r}")
    if not isinstance(meta.get("prompt"), str):
        bad("missing 'prompt' string")
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        bad("'include' must be a non-empty list")
    exclude = meta.get("exclude", [])
    if not isinstance(exclude, list):
        bad("'exclude' must be a list")
    allowed = {"class", "count", "color", "position", "region", "size"}
    for i, req in enumerate(include + exclude):
        if not isinstance(req, dict) or (classes is not None and req.get("class") not in classes):
            bad(f"unknown class {req.get('class') if isinstance(req, dict) else req!r}")
        if not isinstance(req.get("count"), int) or req["count"] < 1:
            bad(f"{req['class']}: 'count' must be a positive integer")
        extra = set(req) - (allowed if i < len(include) else {"class", "count"})
        if extra:
            bad(f"{req['class']}: unknown field(s) {sorted(extra)}")
        for key, choices in (("color", COLORS), ("region", REGIONS), ("size", SIZES)):
            if key in req and req[key] not in choices:
                bad(f"unknown {key} {req[key]!r}")
        if "position" in req:
            pos = req["position"]
            if (
                not isinstance(pos, list)
                or len(pos) != 2
                or pos[0] not in RELATIONS
                or not isinstance(pos[1], int)
                or not 0 <= pos[1] < i
            ):
                bad(f"bad position {pos!r} (want [relation, index of an earlier include])")
    return meta


def numbered_metadata(path, classes=GENEVAL_CLASSES) -> tuple[list[dict], list[int]]:
    """The metadata dicts of a GenEval .jsonl file and their line numbers, every line validated.
    The file is read as gvu.py reads its prompts (runio.read_prompts): UTF-8, a leading byte-order
    mark dropped, blank lines skipped, no prompts an error."""
    try:
        lines, numbers = runio.read_prompts(str(path))
    except InputError as e:
        raise GenEvalError(str(e)) from None
    metas = []
    for lineno, line in zip(numbers, lines):
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenEvalError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        metas.append(validate_meta(meta, f"{path}:{lineno}", classes))
    return metas, numbers


def read_metadata(path, classes=GENEVAL_CLASSES) -> list[dict]:
    """Read a GenEval metadata .jsonl file (one dict per line), validating every line."""
    return numbered_metadata(path, classes)[0]


def write_prompt_folder(out, index: int, meta: dict, images) -> Path:
    """Write OUT/<index:05d>/metadata.jsonl and samples/<j:04d>.png; return the prompt folder."""
    folder = Path(out) / f"{index:05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
    for j, image in enumerate(images):
        image.save(folder / "samples" / f"{j:04d}.png")
    return folder


GENERATE_RECORD = "generate.json"  # generate's record of what it wrote, beside the prompt folders
SAMPLE_NAME = re.compile(r"\d+\.png")  # samples/<0000>.png (GenEval's own generate: <00000>.png)


def read_json(path):
    """A JSON file, or one line naming it (runio.read_json's rule) as a GenEvalError."""
    try:
        return runio.read_json(path)
    except InputError as e:
        raise GenEvalError(str(e)) from None


def read_generate_record(folder) -> dict | None:
    """generate.json: how many prompts generate wrote, how many images per prompt, their size
    [width, height]. None for a folder made by another tool (GenEval's own generate)."""
    path = Path(folder) / GENERATE_RECORD
    if not path.exists():
        return None
    record = read_json(path)
    get = record.get if isinstance(record, dict) else lambda k: None
    counts, size = [get("prompts"), get("images_per_prompt")], get("image_size")
    if not (
        all(type(v) is int and v >= 1 for v in counts) and type(size) is list and len(size) == 2
    ):
        raise GenEvalError(
            f"{path}: not generate's record (prompts, images_per_prompt, image_size)"
        )
    return record


def check_names(found, expected, where: str, why: str) -> None:
    """The entries of a folder must be exactly `expected`: else one line naming the first one
    missing or the first one extra, and why it is expected."""
    if missing := [n for n in expected if n not in found]:
        raise GenEvalError(f"{where}: {missing[0]} is missing ({why})")
    if extra := sorted(set(found) - set(expected)):
        raise GenEvalError(f"{where}: {extra[0]} is extra ({why})")


def expected_samples(first: Path, record: dict | None) -> tuple[list[str], str]:
    """The image names every samples/ folder must hold, and why: generate's record, else those of
    the first prompt folder (numbered 0, 1, ... with no gap)."""
    if record:
        n = record["images_per_prompt"]
        return [f"{j:04d}.png" for j in range(n)], f"generate wrote {n} images per prompt"
    names = sorted(
        (n for n in listdir(first / "samples") if SAMPLE_NAME.fullmatch(n)),
        key=lambda n: int(n[:-4]),
    )
    if not names:
        raise GenEvalError(f"no samples/<0000>.png images in {first}")
    if (gap := next((j for j, n in enumerate(names) if int(n[:-4]) != j), None)) is not None:
        raise GenEvalError(f"{first / 'samples'}: image {gap} is missing (numbered 0, 1, ...)")
    return names, f"{first.name}/samples holds {len(names)} images"


def listdir(folder) -> list[str]:
    """The names in a folder; none if it does not exist."""
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def iter_samples(
    folder, metadata: list[dict] | None = None, classes=GENEVAL_CLASSES
) -> Iterator[tuple[int, dict, Path]]:
    """Yield (prompt index, metadata, image path) for every sample of a GenEval folder.

    The folder holds prompt folders 00000, 00001, ..., none missing and none extra: as many as the
    metadata file's prompts (if given) and generate.json's (if there). Each holds one metadata line
    (equal to the metadata file's, if given) and the same images samples/<0000>.png, as many as
    generate.json says, and nothing else. Everything is validated before the first yield."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GenEvalError(f"image folder not found: {folder}")
    record = read_generate_record(folder)
    found = [n for n in listdir(folder) if n.isdigit() and (folder / n).is_dir()]
    if not found:
        raise GenEvalError(f"no prompt folders (00000, 00001, ...) in {folder}")
    counts = {
        "the metadata file": None if metadata is None else len(metadata),
        GENERATE_RECORD: record["prompts"] if record else None,
    }
    for source, n in counts.items():
        if n is not None:
            names = [f"{k:05d}" for k in range(n)]
            check_names(found, names, str(folder), f"{source} has {n} prompts")
    prompt_dirs = [folder / f"{k:05d}" for k in range(len(found))]
    check_names(found, [p.name for p in prompt_dirs], str(folder), "numbered 00000, 00001, ...")
    names, why = expected_samples(prompt_dirs[0], record)
    items = []
    for k, pdir in enumerate(prompt_dirs):
        metas = read_metadata(pdir / "metadata.jsonl", classes)
        if len(metas) != 1:
            raise GenEvalError(f"{pdir / 'metadata.jsonl'}: expected 1 line, found {len(metas)}")
        if metadata is not None and metadata[k] != metas[0]:
            key = next(
                k2 for k2 in metadata[k] | metas[0] if metadata[k].get(k2) != metas[0].get(k2)
            )
            raise GenEvalError(
                f"{pdir}: its {key} {metas[0].get(key)!r} differs from prompt {k + 1} of the "
                f"metadata file ({metadata[k].get(key)!r})"
            )
        check_names(listdir(pdir / "samples"), names, str(pdir / "samples"), why)
        items += [(k, metas[0], pdir / "samples" / n) for n in names]
    yield from items


def check_images(samples, size=None) -> None:
    """Every image decodes whole, is RGB, and has the size generate wrote (else the first image's):
    what the scorers read, checked before any model loads."""
    first = None
    for _, _, path in samples:
        try:
            with Image.open(path) as im:
                im.load()  # decodes it: a truncated file fails here, not half-way through a score
                mode, got = im.mode, im.size
        except (OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise GenEvalError(f"cannot read image {path}: {e}") from None
        if mode != "RGB":
            raise GenEvalError(
                f"{path} is a {mode} image; the scorers read RGB, as generate writes"
            )
        if size is None:
            size, first = got, path
        if got != tuple(size):
            source = f"the size of {first}" if first else "the size generate wrote"
            raise GenEvalError(
                f"{path} is {got[0]}x{got[1]} pixels, not {size[0]}x{size[1]} ({source})"
            )


def load_image(path) -> Image.Image:
    """Open an image as RGB (applying EXIF rotation); GenEvalError if unreadable."""
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except OSError as e:
        raise GenEvalError(f"cannot read image {path}: {e}") from None


# -------------------------------------------------------------------- rules: world/geneval_rules.py


def crop_on_grey(image: Image.Image, mask, box, bgcolor="#999999") -> Image.Image:
    """Paste the masked object onto a grey image and crop to its box (GenEval's colour crop)."""
    blank = Image.new("RGB", image.size, bgcolor)
    if mask is not None:
        image = Image.composite(image, blank, Image.fromarray(np.asarray(mask, np.uint8) * 255))
    return image.crop(tuple(int(round(v)) for v in box[:4]))


# --------------------------------------------------------------------------- models


def _features(out):
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    feats = out if hasattr(out, "norm") else out.pooler_output
    return feats / feats.norm(dim=-1, keepdim=True)


class GenEvalScorer:
    """Mask2Former detector + CLIP colour classifier; call it as scorer(image, meta)."""

    def __init__(
        self,
        detector: str,
        clip: str,
        device: str,
        threshold=0.3,
        counting_threshold=0.9,
        max_per_class=16,
        top_k=100,
    ):
        self.device = device
        self.det_proc = AutoImageProcessor.from_pretrained(detector)
        self.det = Mask2FormerForUniversalSegmentation.from_pretrained(detector).to(device).eval()
        if self.det.config.num_labels != len(GENEVAL_CLASSES):
            raise GenEvalError(
                f"{detector}: expected 80 COCO classes, got {self.det.config.num_labels}"
            )
        self.clip_proc = AutoProcessor.from_pretrained(clip)
        self.clip = CLIPModel.from_pretrained(clip).to(device).eval()
        self.opts = dict(
            threshold=threshold, counting_threshold=counting_threshold, max_per_class=max_per_class
        )
        self.top_k, self.min_score = top_k, min(threshold, counting_threshold)
        self._classifiers = {}

    def detect(self, image: Image.Image) -> list[Detection]:
        """Top-k (query, class) pairs by class probability, scored class prob x mean mask prob."""
        F = torch.nn.functional
        inputs = self.det_proc(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.det(**inputs)
        probs = out.class_queries_logits[0].softmax(-1)[:, :-1]  # drop the no-object column
        num_classes = probs.shape[1]
        cls_scores, flat = probs.flatten().topk(min(self.top_k, probs.numel()))
        keep = cls_scores > self.min_score  # final score <= class prob, so nothing else can pass
        cls_scores, flat = cls_scores[keep], flat[keep]
        if not len(flat):
            return []
        # Mask logits -> padded input size -> valid (unpadded) region -> original image size.
        logits = out.masks_queries_logits[0][flat // num_classes][None]
        logits = F.interpolate(
            logits, size=inputs["pixel_values"].shape[-2:], mode="bilinear", align_corners=False
        )
        if "pixel_mask" in inputs:
            valid = inputs["pixel_mask"][0].bool()
            logits = logits[..., : int(valid.any(1).sum()), : int(valid.any(0).sum())]
        logits = F.interpolate(logits, size=image.size[::-1], mode="bilinear", align_corners=False)[
            0
        ]
        masks = logits > 0
        mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (
            masks.flatten(1).sum(1) + 1e-6
        )
        dets = []
        for label, score, mask in zip(
            (flat % num_classes).tolist(), (cls_scores * mask_scores).tolist(), masks
        ):
            ys, xs = torch.where(mask)
            box = (
                (0, 0, 0, 0)
                if not len(xs)
                else (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
            )
            dets.append(Detection(GENEVAL_CLASSES[label], score, box, mask.cpu().numpy()))
        return dets

    def color_classifier(self, cls: str):
        """Zero-shot colour weights (10 x D): normalised template embeddings' mean, renormalised."""
        if cls not in self._classifiers:
            rows = []
            for c in COLORS:
                texts = [t.format(c=c, cls=cls) for t in COLOR_TEMPLATES]
                tok = self.clip_proc(text=texts, return_tensors="pt", padding=True).to(self.device)
                with torch.no_grad():
                    emb = _features(self.clip.get_text_features(**tok)).mean(0)
                rows.append(emb / emb.norm())
            self._classifiers[cls] = torch.stack(rows)
        return self._classifiers[cls]

    def colors(self, image: Image.Image, objects: list[Detection], cls: str) -> list[str]:
        """Name the colour of each object from its grey-background crop."""
        crops = [crop_on_grey(image, d.mask, d.box) for d in objects]
        pix = self.clip_proc(images=crops, return_tensors="pt").to(self.device)
        with torch.no_grad():
            feats = _features(self.clip.get_image_features(**pix))
        return [COLORS[i] for i in (feats @ self.color_classifier(cls).T).argmax(1).tolist()]

    def __call__(self, image: Image.Image, meta: dict) -> tuple[bool, str]:
        detected = select_detections(self.detect(image), meta["tag"], **self.opts)
        return evaluate(meta, detected, image.size, lambda objs, cls: self.colors(image, objs, cls))


def scorer_classes(name):
    """The class names a scorer knows: GenEval's 80 COCO names, or the shapes world's 8 shapes."""
    if name == "shapes":
        return shapes.SHAPES
    return GENEVAL_CLASSES


def make_scorer(args) -> Callable[[Image.Image, dict], tuple[bool, str]]:
    """Build the scorer named by --scorer."""
    if args.scorer == "shapes":
        return shapes.oracle
    if args.scorer == "vlm":  # GenEval++ the paper's way: a VLM judge (tools/vlm_judge.py)
        return vlm_judge.VLMScorer(args.judge, args.device)
    device = pick_device(args.device or "auto")
    try:
        return GenEvalScorer(
            args.detector,
            args.clip,
            device,
            args.threshold,
            args.counting_threshold,
            args.max_objects,
        )
    # missing path / hub id not cached: keep the first line of the message
    except (OSError, ValueError) as e:
        raise GenEvalError(
            f"cannot load models ({args.detector}, {args.clip}): {str(e).splitlines()[0]}"
        ) from None


# --------------------------------------------------------------------------- summaries


def summarize(results: list[dict]) -> dict:
    """Per-tag accuracy, overall = unweighted mean of tag means, share of prompts with >= 1
    correct image. Rows with correct == -1 (a VLM judge that gave up) are left out of every
    accuracy and counted apart."""
    by_tag, by_prompt, unevaluated = {}, {}, {}
    for r in results:
        if r["correct"] == vlm_judge.UNEVALUATED:
            unevaluated[r["tag"]] = unevaluated.get(r["tag"], 0) + 1
            continue
        by_tag.setdefault(r["tag"], []).append(r["correct"])
        by_prompt[r["index"]] = by_prompt.get(r["index"], False) or r["correct"]
    tags = {t: {"images": len(v), "accuracy": sum(v) / len(v)} for t, v in sorted(by_tag.items())}
    summary = {
        "tags": tags,
        "overall": float(np.mean([t["accuracy"] for t in tags.values()])) if tags else 0.0,
        "prompts_any_correct": sum(by_prompt.values()) / max(len(by_prompt), 1),
        "images": len(results) - sum(unevaluated.values()),
        "prompts": len(by_prompt),
    }
    if unevaluated:
        for tag, entry in tags.items():
            entry["unevaluated"] = unevaluated.get(tag, 0)
        summary |= {
            "unevaluated": sum(unevaluated.values()),
            "unevaluated_by_tag": unevaluated,
            "unevaluated_share": sum(unevaluated.values()) / len(results),
        }
    return summary


def format_table(summary: dict) -> str:
    """Markdown table of a summary."""
    lines = ["| tag | images | accuracy |", "|---|---:|---:|"]
    lines += [f"| {t} | {v['images']} | {v['accuracy']:.4f} |" for t, v in summary["tags"].items()]
    lines += [
        f"| **overall** (mean of tag means) | {summary['images']} | {summary['overall']:.4f} |",
        f"| prompts with >=1 correct image | {summary['prompts']} "
        f"| {summary['prompts_any_correct']:.4f} |",
    ]
    return "\n".join(lines + [f"\nNote: {n}" for n in summary.get("notes", [])])


def finite(v) -> bool:
    """A JSON number, not nan or infinite."""
    return type(v) in (int, float) and math.isfinite(v)


def load_summary(path) -> dict:
    """Read summary.json from a file or a score output folder; one line if it is not score's."""
    path = Path(path)
    path = path / "summary.json" if path.is_dir() else path
    if not path.is_file():
        raise GenEvalError(f"no summary.json at {path}")
    s = read_json(path)
    tags = s.get("tags") if isinstance(s, dict) else None
    ok = isinstance(tags, dict) and all(
        isinstance(t, dict) and type(t.get("images")) is int and finite(t.get("accuracy"))
        for t in tags.values()
    )
    if not (ok and finite(s.get("overall")) and finite(s.get("prompts_any_correct"))):
        raise GenEvalError(f"{path}: not score's summary (tags with images and accuracy, overall)")
    return s


def check_paired_summaries(a: dict, b: dict, names) -> None:
    """Summaries alone name no prompts: two runs must at least hold the same tags, each with the
    same number of images."""
    for tag in sorted(set(a["tags"]) | set(b["tags"])):
        images = [s["tags"][tag]["images"] if tag in s["tags"] else None for s in (a, b)]
        if images[0] != images[1]:
            show = lambda n: "missing" if n is None else f"{n} images"  # noqa: E731
            raise GenEvalError(
                f"compare: the runs are not paired: tag {tag}: {show(images[0])} in {names[0]}, "
                f"{show(images[1])} in {names[1]}"
            )


def compare_table(a: dict, b: dict) -> str:
    """Markdown table: per-tag accuracy of run A (base) vs run B (trained), with deltas. The two
    hold the same tags (check_paired_summaries)."""
    rows = [(t, a["tags"][t]["accuracy"], b["tags"][t]["accuracy"]) for t in sorted(a["tags"])]
    rows += [
        ("**overall**", a["overall"], b["overall"]),
        ("prompts with >=1 correct", a["prompts_any_correct"], b["prompts_any_correct"]),
    ]
    lines = ["| tag | base (A) | trained (B) | delta |", "|---|---:|---:|---:|"]
    return "\n".join(lines + [f"| {t} | {x:.4f} | {y:.4f} | {y - x:+.4f} |" for t, x, y in rows])


def load_results(path) -> list[dict] | None:
    """The rows of the results.jsonl beside a summary (None if absent), each one checked."""
    path = Path(path)
    results = (path if path.is_dir() else path.parent) / "results.jsonl"
    if not results.is_file():
        return None
    try:
        lines = results.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise GenEvalError(f"{results} is not UTF-8 (byte {e.start})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise GenEvalError(f"{results} line {n} is not JSON ({e.msg})") from None
        if row is None:
            continue
        types = {"index": int, "tag": str, "prompt": str}
        ok = isinstance(row, dict) and all(type(row.get(k)) is t for k, t in types.items())
        if not (ok and row.get("correct") in (True, False, vlm_judge.UNEVALUATED)):
            raise GenEvalError(
                f"{results} line {n} is not a score row (index, tag, prompt, correct)"
            )
        rows.append(row)
    if not rows:
        raise GenEvalError(f"{results} has no rows")
    return rows


def run_prompts(rows, name) -> dict[int, tuple[str, str, int]]:
    """{prompt index: (tag, prompt, images)} of one run's results."""
    prompts = {}
    for r in rows:
        tag, prompt, images = prompts.get(r["index"], (r["tag"], r["prompt"], 0))
        if (tag, prompt) != (r["tag"], r["prompt"]):
            raise GenEvalError(f"{name}: prompt {r['index']} has two texts or tags in its results")
        prompts[r["index"]] = (tag, prompt, images + 1)
    return prompts


def check_paired(names, runs) -> None:
    """compare pairs prompt i of every run with prompt i of the base: every run must hold the same
    prompts (index, text and tag), each with the same number of images. Else the first difference,
    in one line."""
    show = lambda p: "missing" if p is None else f"{p[1]!r} ({p[0]}, {p[2]} images)"  # noqa: E731
    base = run_prompts(runs[0], names[0])
    for name, rows in zip(names[1:], runs[1:]):
        run = run_prompts(rows, name)
        diff = next((i for i in sorted(base | run) if base.get(i) != run.get(i)), None)
        if diff is not None:
            raise GenEvalError(
                f"compare: the runs are not paired: prompt {diff}: {show(base.get(diff))} in "
                f"{names[0]}, {show(run.get(diff))} in {name}"
            )


def prompt_accuracy(rows) -> dict[str, dict[int, float]]:
    """Per tag, each prompt's share of correct images. Images a VLM judge gave up on (-1) are left
    out, as in summarize; a prompt with none left has no accuracy."""
    images: dict[str, dict[int, list[bool]]] = {}
    for r in rows:
        if r["correct"] != vlm_judge.UNEVALUATED:
            images.setdefault(r["tag"], {}).setdefault(r["index"], []).append(bool(r["correct"]))
    return {t: {i: float(np.mean(v)) for i, v in ps.items()} for t, ps in images.items()}


def paired_accuracy(runs) -> list[dict[str, dict[int, float]]]:
    """prompt_accuracy of every run (paired runs), on the prompts that have an accuracy in every
    run: the others (a judge gave up on all their images somewhere) are named on stderr."""
    accs = [prompt_accuracy(rows) for rows in runs]
    tags = set().union(*accs)
    keep = {t: set.intersection(*(set(a.get(t, {})) for a in accs)) for t in tags}
    if dropped := sorted(set().union(*(set(a.get(t, {})) - keep[t] for a in accs for t in tags))):
        print(
            f"note: left out prompts {dropped}: a judge evaluated none of their images in some run",
            file=sys.stderr,
        )
    if not any(keep.values()):
        raise GenEvalError("compare: no prompt has an evaluated image in every run")
    return [{t: {i: a[t][i] for i in sorted(keep[t])} for t in tags if keep[t]} for a in accs]


def bootstrap_deltas(base: dict, runs: list[dict], n_boot=2000, seed=0) -> dict[str, np.ndarray]:
    """Bootstrap draws of (mean over runs of the trained accuracy) - (base accuracy), per tag and
    "overall" (the mean of the tag deltas). Prompts are resampled with replacement within each tag,
    the same prompts for the base and every run (a paired bootstrap over prompts; the runs' seeds
    are not resampled)."""
    rng = np.random.default_rng(seed)
    out = {}
    for tag in sorted(set(base).intersection(*runs)):
        idx = sorted(set(base[tag]).intersection(*(run[tag] for run in runs)))
        trained = np.mean([[run[tag][i] for i in idx] for run in runs], 0)
        d = trained - np.array([base[tag][i] for i in idx])  # (P,)
        out[tag] = d[rng.integers(0, len(idx), (n_boot, len(idx)))].mean(1)  # (n_boot,)
    out["overall"] = np.mean(list(out.values()), 0)
    return out


def compare_runs_table(base: dict, runs: list[dict], n_boot=2000, seed=0) -> str:
    """Markdown: per tag and overall, the base, the trained runs' mean ± std across runs (seeds),
    the mean delta and its 95% bootstrap interval over prompts.
    base, runs: prompt_accuracy() dicts."""
    draws = bootstrap_deltas(base, runs, n_boot, seed)
    # a tag's accuracy: the mean over its prompts
    acc = lambda d, tag: float(np.mean(list(d[tag].values())))
    tags = [t for t in draws if t != "overall"]
    rows = {t: (acc(base, t), [acc(r, t) for r in runs]) for t in tags}
    rows["overall"] = (
        float(np.mean([rows[t][0] for t in tags])),
        [float(np.mean([rows[t][1][k] for t in tags])) for k in range(len(runs))],
    )
    lines = [
        f"| tag | prompts | base | trained (mean ± std over {len(runs)} runs) "
        "| delta | 95% interval |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for t, (b, tr) in rows.items():
        lo, hi = np.percentile(draws[t], [2.5, 97.5])
        rel = f" ({(np.mean(tr) - b) / b:+.1%})" if t == "overall" and b > 0 else ""
        n = len(set(base[t])) if t != "overall" else sum(len(base[x]) for x in tags)
        name = "**overall**" if t == "overall" else t
        std = np.std(tr, ddof=1) if len(tr) > 1 else 0
        lines.append(
            f"| {name} | {n} | {b:.4f} | {np.mean(tr):.4f} ± {std:.4f} "
            f"| {np.mean(tr) - b:+.4f}{rel} | [{lo:+.4f}, {hi:+.4f}] |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- prompts


def with_article(phrase: str) -> str:
    """'an apple', 'a blue umbrella' (article chosen by the next word, as in GenEval)."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def plural(name: str) -> str:
    """GenEval's naive plural: 'clocks', 'buses', 'sheeps', 'benchs'."""
    return name + ("es" if name.endswith("s") else "s")


# Size of each tag's prompt space as mixed-radix digits (class, other class, colour, ...).
TAG_SPACES = {
    "single_object": (80,),
    "counting": (80, 3),
    "colors": (80, 10),
    "two_object": (80, 79),
    "position": (80, 79, 4),
    "color_attr": (80, 79, 10, 9),
}


def make_meta(tag: str, index: int) -> dict:
    """The index-th prompt (GenEval format and phrasing) of a tag's space; pairs are distinct."""
    digits = []
    for size in reversed(TAG_SPACES[tag]):
        index, d = divmod(index, size)
        digits.insert(0, d)
    a, k = GENEVAL_CLASSES[digits[0]], (digits + [0])[1]
    b = GENEVAL_CLASSES[k if k < digits[0] else k + 1]  # second class, never equal to the first
    if tag == "single_object":
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1}],
            "prompt": f"a photo of {with_article(a)}",
        }
    if tag == "counting":
        n = k + 2
        return {
            "tag": tag,
            "include": [{"class": a, "count": n}],
            "exclude": [{"class": a, "count": n + 1}],
            "prompt": f"a photo of {NUMBER_WORDS[n]} {plural(a)}",
        }
    if tag == "colors":
        c = COLORS[k]
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1, "color": c}],
            "prompt": f"a photo of {with_article(f'{c} {a}')}",
        }
    if tag == "two_object":
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {with_article(a)} and {with_article(b)}",
        }
    if tag == "position":
        rel = RELATIONS[digits[2]]
        return {
            "tag": tag,
            "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of {with_article(a)} {rel} {with_article(b)}",
        }
    c1 = COLORS[digits[2]]
    c2 = COLORS[digits[3] if digits[3] < digits[2] else digits[3] + 1]  # two different colours
    return {
        "tag": tag,
        "include": [{"class": a, "count": 1, "color": c1}, {"class": b, "count": 1, "color": c2}],
        "prompt": f"a photo of {with_article(f'{c1} {a}')} and {with_article(f'{c2} {b}')}",
    }


def generate_prompts(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """n distinct GenEval-style prompts, tags balanced (small tags first, leftovers go to larger
    ones). `exclude` holds lowercased prompt texts (GenEval++ capitalises "A photo of ...")."""
    rng = random.Random(seed)
    tags = sorted(TAG_SPACES, key=lambda t: math.prod(TAG_SPACES[t]))
    metas = []
    for left, tag in zip(range(len(tags), 0, -1), tags):
        share = math.ceil((n - len(metas)) / left)
        pool = math.prod(TAG_SPACES[tag])
        picks = (
            make_meta(tag, i) for i in rng.sample(range(pool), min(pool, share + len(exclude)))
        )
        metas += [m for m in picks if m["prompt"].lower() not in exclude][:share]
    rng.shuffle(metas)
    return metas[:n]


# ------------------------------------------------------------------------ generate (the model side)


GVU_JSON = "gvu.json"  # gvu.py writes it into every adapter: the step and the base model
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", GVU_JSON)


def check_adapter_folder(adapter):
    """--adapter is a folder gvu.py wrote (its --out/adapter): peft's config and weights, and the
    gvu.json that names the base model. Checked before the model loads, and before peft, which
    would take a missing path for a hub id and try the network."""
    if not os.path.isdir(adapter):
        raise GenEvalError(f"--adapter {adapter}: no such folder")
    for name in ADAPTER_FILES:
        if not os.path.isfile(os.path.join(adapter, name)):
            raise GenEvalError(f"--adapter {adapter}: no {name} (not an adapter gvu.py wrote)")
    read_adapter_json(adapter, "adapter_config.json")
    adapter_info(adapter)
    weights = os.path.join(adapter, "adapter_model.safetensors")
    try:
        with safe_open(weights, "pt"):  # parses the header: empty or truncated files fail here
            pass
    except (OSError, SafetensorError) as e:
        raise GenEvalError(f"--adapter {adapter}: cannot read {weights} ({e})") from None


def read_adapter_json(adapter, name) -> dict:
    """A JSON object of the adapter folder, or one line naming the adapter and the file."""
    try:
        obj = runio.read_json(os.path.join(adapter, name))
    except InputError as e:
        raise GenEvalError(f"--adapter {adapter}: {e}") from None
    if not isinstance(obj, dict):
        raise GenEvalError(f"--adapter {adapter}: {name} is not a JSON object")
    return obj


def adapter_info(adapter) -> dict:
    """The adapter's gvu.json (runio.adapter_info): the base model it was trained on, and the
    fingerprint of that model's weights."""
    info = read_adapter_json(adapter, GVU_JSON)
    if not isinstance(info.get("base_model"), str):
        raise GenEvalError(f"--adapter {adapter}: {GVU_JSON} does not name its base_model")
    if not isinstance(info.get("base_fingerprint", ""), str):
        raise GenEvalError(f"--adapter {adapter}: {GVU_JSON}'s base_fingerprint is not a string")
    return info


def check_adapter_base(umm, args):
    """Refuse an adapter trained on another base model: by the weights' fingerprint when gvu.json
    has one (robust to a changed model path or hub id), else by the recorded base model's name."""
    info = adapter_info(args.adapter)
    if "base_fingerprint" in info:
        same = info["base_fingerprint"] == runio.base_fingerprint(umm.lm)
    else:
        same = info["base_model"] == runio.base_model_id(args.model, args.seed)
    if not same:
        raise GenEvalError(
            f"--adapter {args.adapter} was trained on {info['base_model']} (its {GVU_JSON}), "
            f"not on --model {args.model}"
            + (f" with --seed {args.seed}" if args.model == "tiny-random" else "")
        )


def load_model(args):
    """Any model gvu.py trains (+ an optional peft adapter saved by gvu.py), in eval mode, in the
    precision the trainer uses (--dtype)."""
    if args.adapter:
        check_adapter_folder(args.adapter)
    try:
        device = pick_device(args.device or "auto")
        umm = load_umm(
            args.model,
            args.seed,
            args.trust_remote_code,
            args.flux,
            device,
            use_bf16(args.dtype, device),
            args.image_size,
            args.decoder_text,
        ).to(device)
    except InputError as e:
        raise GenEvalError(str(e)) from None
    if args.adapter:
        check_adapter_base(umm, args)
        try:
            # injects the LoRA layers into umm.lm in place
            PeftModel.from_pretrained(umm.lm, args.adapter)
        except (OSError, ValueError, RuntimeError) as e:
            raise GenEvalError(
                f"cannot load --adapter {args.adapter}: {str(e).splitlines()[0]}"
            ) from None
    umm.lm.eval()
    return umm


def sample_groups(umm, metas, n, args, out=None):
    """Yield (index, meta, images) with n images per prompt, batched; seeds depend only on the
    batch index, so a base and a trained model are compared on the same noise. The sampler is
    gvu.py's (runio.sampler_args: with --generation-config the checkpoint's values where the flags
    leave transformers' defaults), printed, and recorded in OUT/sampler.json when `out` is given."""
    prompts = [m["prompt"] for m in metas]
    if not 0 < args.top_p <= 1:  # (gvu.py: runio.settings_rules)
        raise GenEvalError(f"--top-p must be in (0, 1] (1 = off) (got {args.top_p})")
    try:
        runio.check_vocabulary(umm, prompts)
        args = runio.sampler_args(umm.lm, args, out)
    except InputError as e:
        raise GenEvalError(str(e)) from None
    device = umm.lm.device.type
    # as gvu.train
    autocast = (
        torch.autocast(device, torch.bfloat16) if use_bf16(args.dtype, device) else nullcontext()
    )
    for b in tqdm(
        range(0, len(metas), args.batch),
        desc="sampling",
        unit="batch" if args.batch > 1 else "prompt",
    ):
        seed = args.seed * 100_003 + b
        # sampling runs on the model's device
        gen = torch.Generator(umm.lm.device).manual_seed(seed)
        batch = prompts[b : b + args.batch]
        with autocast:
            sampling = (args.temperature, args.top_k, args.min_p, args.cfg_scale, gen, args.top_p)
            ro = gvu.rollout(umm, batch, n, *sampling)
            images = umm.decode_images(
                ro["codes"],
                gen if gen.device.type == "cpu" else torch.Generator().manual_seed(seed),
                prompts=[p for p in batch for _ in range(n)],
            )
        for k, meta in enumerate(metas[b : b + args.batch]):
            yield b + k, meta, images[k * n : (k + 1) * n]


# what generate and score write: prompt folders, generate's record and sampler, score's outputs
# (publish_scores)
OUTPUT_NAMES = re.compile(
    r"\d+|generate\.json|sampler\.json|(results\.jsonl|summary\.(json|md)|\.score)(\.link)?"
    r"|\.score-\w+"
)


def check_generate_out(out, overwrite):
    """generate never mixes its images with an earlier run's: a non-empty --out needs
    --overwrite, which clears only what generate and score write there."""
    out = Path(out)
    if problem := runio.check_out_folder(str(out)):  # not a folder, or not writable
        raise GenEvalError(problem)
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names and not overwrite:
        raise GenEvalError(
            f"--out {out} is not empty ({len(names)} entries); pass --overwrite to replace it, "
            "or pick another --out"
        )
    if other := [n for n in names if not OUTPUT_NAMES.fullmatch(n)]:
        raise GenEvalError(
            f"--overwrite clears only generate/score output, and {out} also holds {other[0]}"
        )


def as_gvu_args(args):
    """generate's flags over gvu.Args' defaults (its instruction, its reward input): what gvu.py's
    checks in runio read."""
    return SimpleNamespace(**(asdict(gvu.Args()) | vars(args) | {"prompts": args.metadata}))


def generate_rules(args):
    """(flag, valid?, what it must be) for generate's numbers: gvu.py's rules for the flags the two
    share (runio.settings_rules, written once there), then generate's own."""
    shared = [r for r in runio.settings_rules(as_gvu_args(args)) if r[0] in vars(args)]
    return shared + [("n", args.n >= 1, ">= 1"), ("batch", args.batch >= 1, ">= 1")]


def cmd_generate(args) -> None:
    """generate: n images per metadata line into GenEval's folder layout, written beside --out
    and renamed into place at the end (an interrupted generate leaves no half-filled --out), with
    generate.json: what score checks the folder against."""
    check_rules(generate_rules(args), args)
    classes = None if args.any_class else GENEVAL_CLASSES
    metas, lines = numbered_metadata(args.metadata, classes)
    check_generate_out(args.out, args.overwrite)
    umm = load_model(args)
    try:  # gvu.py's checks on the loaded model: --top-k, the prompts' words and lengths
        runio.check_against_model(umm, as_gvu_args(args), [m["prompt"] for m in metas], lines)
    except InputError as e:
        raise GenEvalError(str(e)) from None
    out, tmp = Path(args.out), Path(str(Path(args.out)) + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for index, meta, images in sample_groups(umm, metas, args.n, args, out=tmp):
            write_prompt_folder(tmp, index, meta, images)
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        record = dict(prompts=len(metas), images_per_prompt=args.n, image_size=list(images[0].size))
        (tmp / GENERATE_RECORD).write_text(json.dumps(record | {"settings": settings}, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed generate leaves nothing behind
        raise
    if out.exists():
        shutil.rmtree(out)  # checked above: empty, or --overwrite of generate/score output only
    tmp.rename(out)
    print(f"wrote {len(metas)} prompts x {args.n} images to {args.out}")


# ------------------------------------------------------------- score's outputs: swapped in as one


SCORE_OUTPUTS = ("results.jsonl", "summary.json", "summary.md")


def publish_scores(out: Path, texts: dict[str, str]) -> None:
    """Swap score's three outputs into OUT as one unit. Each name is a link to .score/<name>, and
    .score a link to the folder .score-<id> that holds one score's three files: a new score writes
    a new folder, then one os.replace of .score swaps all three, so a kill at any moment leaves the
    old three or the new three, never a mix. Folders a killed score left are removed here."""
    current = out / ".score"
    if any(not (out / n).is_symlink() and (out / n).exists() for n in SCORE_OUTPUTS):
        # plain files (an older score's): move them behind .score first, unchanged
        swap_in(out, {n: (out / n).read_bytes() for n in SCORE_OUTPUTS if (out / n).exists()})
    for name in SCORE_OUTPUTS:
        path, link = out / name, f".score/{name}"
        if not (path.is_symlink() and os.readlink(path) == link):
            replace_with_link(path, link)  # the same content as before, now through .score
    swap_in(out, {n: t.encode() for n, t in texts.items()})
    for stale in out.glob(".score-*"):
        if stale.name != os.readlink(current):
            shutil.rmtree(stale)
    for name in SCORE_OUTPUTS + (".score",):
        (out / f"{name}.link").unlink(missing_ok=True)


def swap_in(out: Path, files: dict[str, bytes]) -> None:
    """Write files into a new folder .score-<id>, then point OUT/.score at it (one os.replace)."""
    new = out / f".score-{uuid.uuid4().hex[:8]}"
    new.mkdir()
    try:
        for name, data in files.items():
            (new / name).write_bytes(data)
        replace_with_link(out / ".score", new.name)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def replace_with_link(path: Path, target: str) -> None:
    """Make path a symbolic link to target, atomically (a link beside it, renamed over it)."""
    tmp = path.with_name(path.name + ".link")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- CLI


def score_rules(args):
    """(flag, valid?, what it must be) for score's numbers."""
    unit = "in [0, 1]"
    return [
        ("threshold", 0 <= args.threshold <= 1, unit),  # false for nan
        ("counting_threshold", 0 <= args.counting_threshold <= 1, unit),
        ("max_objects", args.max_objects >= 1, ">= 1"),
    ]


def cmd_score(args) -> None:
    """score: run a scorer over a folder, write results.jsonl, summary.md, summary.json. The
    folder and every image are checked before a model loads; nothing is written until every image
    is scored, then the three files are swapped in as one (publish_scores)."""
    check_rules(score_rules(args), args)
    classes = scorer_classes(args.scorer)
    metadata = read_metadata(args.metadata, classes) if args.metadata else None
    samples = list(iter_samples(args.folder, metadata, classes))
    record = read_generate_record(args.folder)
    check_images(samples, record and record["image_size"])
    out = Path(args.out or args.folder)
    if problem := runio.check_out_folder(str(out)):
        raise GenEvalError(problem)
    scorer = make_scorer(args)
    results = []
    for index, meta, path in samples:
        correct, reason = scorer(load_image(path), meta)
        results.append(
            {
                "index": index,
                "sample": path.stem,
                "tag": meta["tag"],
                "prompt": meta["prompt"],
                "correct": -1 if correct == -1 else bool(correct),  # -1: judge gave up
                "reason": reason,
            }
        )
    summary = summarize(results) | {"scorer": args.scorer}
    if args.scorer == "geneval" and any(
        "region" in r or "size" in r for _, m, _ in samples for r in m["include"]
    ):
        summary["notes"] = [PROXY_NOTE]
    if args.scorer == "vlm":
        summary |= {
            "judge": scorer.spec,
            "notes": [scorer.note(summary.get("unevaluated", 0), len(results))],
        }
    out.mkdir(parents=True, exist_ok=True)
    texts = {
        "results.jsonl": "".join(json.dumps(row) + "\n" for row in results),
        "summary.json": json.dumps(summary, indent=2) + "\n",
        "summary.md": format_table(summary) + "\n",
    }
    publish_scores(out, texts)
    print(format_table(summary))


def cmd_compare(args) -> None:
    """compare: per-tag accuracies of a base and one or more trained runs, which must be paired
    (the same prompts, with as many images each); with results.jsonl beside every summary (score's
    output folders), the mean ± std across runs and a 95% bootstrap interval over prompts."""
    check_rules(
        [("bootstrap", args.bootstrap >= 1, ">= 1"), ("seed", args.seed >= 0, ">= 0")], args
    )
    names = [args.base] + args.runs
    runs = [load_results(p) for p in names]
    if all(rows is not None for rows in runs):
        check_paired(names, runs)
        accs = paired_accuracy(runs)
        print(compare_runs_table(accs[0], accs[1:], args.bootstrap, args.seed))
    elif len(args.runs) == 1:  # summaries alone: no per-prompt data, so no interval
        summaries = [load_summary(p) for p in names]
        check_paired_summaries(*summaries, names)
        print(compare_table(*summaries))
    else:
        raise GenEvalError(
            "comparing several runs needs each run's results.jsonl (score's output folder)"
        )


def cmd_prompts(args) -> None:
    """prompts: write <out>.txt and <out>.jsonl of GenEval-style training prompts."""
    check_rules([("n", args.n >= 1, ">= 1")], args)
    exclude = {m["prompt"].lower() for path in args.exclude for m in read_metadata(path)}
    metas = generate_prompts(args.n, args.seed, exclude)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".txt").write_text("".join(m["prompt"] + "\n" for m in metas))
    out.with_name(out.name + ".jsonl").write_text("".join(json.dumps(m) + "\n" for m in metas))
    counts = {t: sum(m["tag"] == t for m in metas) for t in GENEVAL_TAGS}
    print(f"wrote {len(metas)} prompts to {out}.txt/.jsonl: {counts}")


def add_detector_flags(q) -> None:
    """The GenEval scorer's models and thresholds (score, and tools/experiments.py audit)."""
    q.add_argument(
        "--detector",
        default="facebook/mask2former-swin-small-coco-instance",
        help="Mask2Former COCO instance model (hub id or local path)",
    )
    q.add_argument(
        "--clip", default="openai/clip-vit-large-patch14", help="CLIP model (hub id or local path)"
    )
    q.add_argument("--threshold", type=float, default=0.3, help="detection score threshold")
    q.add_argument(
        "--counting-threshold", type=float, default=0.9, help="threshold for the 'counting' tag"
    )
    q.add_argument("--max-objects", type=int, default=16, help="max detections kept per class")


def add_load_flags(q, model_default: str = "tiny-random") -> None:
    """Which model to load, and how: every flag `load_model` reads (generate, audit, token-view)."""
    q.add_argument(
        "--model",
        default=model_default,
        help="a model gvu.py loads (tiny UMM folder, 'tiny-random', "
        "a Janus(-Pro) or X-Omni checkpoint)",
    )
    q.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model repository's code (X-Omni; never implied)",
    )
    q.add_argument(
        "--flux", default="", help="X-Omni only: the FLUX.1-dev weights its decoder is built from"
    )
    q.add_argument(
        "--device",
        help="torch device for the model (and the scorer): default cuda if available, else cpu",
    )
    q.add_argument("--adapter", help="a LoRA adapter folder written by gvu.py (its --out/adapter)")
    q.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the sampling noise (same seed -> same noise for any model) "
        "and of 'tiny-random'",
    )
    q.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="auto: as gvu.py trains (bf16 weights + autocast on a CUDA GPU with bf16, else fp32)",
    )
    q.add_argument(
        "--image-size",
        type=int,
        default=0,
        help="pixels per side (0 = the model's default; X-Omni paper: 576)",
    )
    q.add_argument(
        "--decoder-text",
        default="none",
        choices=["none", "prompt"],
        help="X-Omni's decoder text condition: none, or the prompt (the official evaluation's)",
    )


def add_model_flags(q, n_flag: str, n_default: int, n_help: str) -> None:
    """Which model to sample from, and how (generate, and tools/experiments.py audit)."""
    add_load_flags(q)
    q.add_argument("--metadata", required=True, help="GenEval-format metadata .jsonl")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument(n_flag, type=int, default=n_default, help=n_help)
    q.add_argument("--batch", type=int, default=8, help="prompts per sampling batch")
    q.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    q.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    q.add_argument("--top-p", type=float, default=1.0, help="top-p sampling (1 = off)")
    q.add_argument("--min-p", type=float, default=0.0, help="min-p sampling (0 = off)")
    q.add_argument(
        "--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1 = off)"
    )
    q.add_argument(
        "--generation-config",
        action="store_true",
        help="as gvu.py: sampler values at transformers' defaults yield to the checkpoint's "
        "generation_config.json, as generate does (the official evaluation samples with generate)",
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors (a bad type or choice, a missing flag) are one line naming the flag,
    not the usage block; its subcommands' parsers are of this class too."""

    def error(self, message):
        sys.exit(f"error: {message} (see {self.prog} --help)")


def check_rules(rules, args) -> None:
    """Refuse bad numbers before anything is loaded or written: one line naming every bad flag (the
    wording of gvu.py's runio.check_args). rules: (flag, valid?, what it must be)."""
    if bad := runio.broken_rules(rules, args):
        raise GenEvalError(bad)


def build_parser() -> argparse.ArgumentParser:
    """The argparse CLI."""
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    gn = sub.add_parser(
        "generate", help="sample images for a metadata file into GenEval's folder layout"
    )
    add_model_flags(gn, "--n", 4, "images per prompt")
    gn.add_argument(
        "--any-class", action="store_true", help="accept classes outside GenEval's 80 (e.g. shapes)"
    )
    gn.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the images already in --out (else it must be empty)",
    )
    gn.set_defaults(func=cmd_generate)
    s = sub.add_parser("score", help="score a GenEval image folder")
    s.add_argument(
        "folder", help="folder with <00000>/metadata.jsonl and <00000>/samples/<0000>.png"
    )
    s.add_argument(
        "--metadata", help="GenEval metadata .jsonl; the folder must match it prompt by prompt"
    )
    s.add_argument(
        "--out", help="where to write results.jsonl, summary.md, summary.json (default: FOLDER)"
    )
    s.add_argument(
        "--scorer",
        choices=["geneval", "shapes", "vlm"],
        default="geneval",
        help="geneval: Mask2Former + CLIP rules (GenEval++ region/size via a rule-based proxy); "
        "shapes: the synthetic-shapes oracle shapes.oracle; "
        "vlm: a VLM judge (GenEval++ as in the paper)",
    )
    s.add_argument(
        "--judge",
        help="--scorer vlm: openai:MODEL (OPENAI_BASE_URL, OPENAI_API_KEY; pip install openai) "
        "or hf:MODEL (a local transformers VLM); default openai:gpt-4.1-2025-04-14",
    )
    s.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    add_detector_flags(s)
    s.set_defaults(func=cmd_score)
    c = sub.add_parser(
        "compare", help="a base vs one or more trained runs, per tag, with bootstrap intervals"
    )
    c.add_argument("base", help="base run: score's output folder (or its summary.json)")
    c.add_argument(
        "runs",
        nargs="+",
        help="trained runs (e.g. one per training seed), same prompts and sampling seeds",
    )
    c.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the prompts")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    c.set_defaults(func=cmd_compare)
    g = sub.add_parser("prompts", help="generate GenEval-style training prompts")
    g.add_argument(
        "--seed", type=int, default=0, help="random seed (output is deterministic given it)"
    )
    g.add_argument("--n", type=int, default=50000, help="number of prompts")
    g.add_argument(
        "--exclude",
        nargs="*",
        default=[],
        help="GenEval-format metadata .jsonl files whose prompts must not be generated "
        "(case-insensitive)",
    )
    g.add_argument(
        "--out", default="prompts/geneval_train", help="output path prefix (.txt and .jsonl)"
    )
    g.set_defaults(func=cmd_prompts)
    return p


def main(argv=None) -> int:
    """Entry point; project errors become a one-line message and a non-zero exit."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (GenEvalError, InputError, gvu.TrainingError, vlm_judge.JudgeError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, a read-only folder, ...: the file and the reason
        sys.exit(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}")
    return 0


if __name__ == "__main__":
    main()
