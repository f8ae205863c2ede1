r"""
The recipe of the shipped tiny UMM (models/tiny_umm.py) in the shapes world, and its measurements.

    # the default base: the defaults
    python -m world.make_tiny_umm train --out checkpoints/tiny-umm --seed 0 --threads 1
    # the weak base: the default's recipe, half its share of T2I lines
    python -m world.make_tiny_umm train --out checkpoints/tiny-umm-weak --t2i-frac 0.1 \
        --vision-from checkpoints/tiny-umm --seed 0 --threads 1
    python -m world.make_tiny_umm understand --model checkpoints/tiny-umm --n 300 \
        [--adapter RUN/adapter]
    python -m world.make_tiny_umm draw --model checkpoints/tiny-umm --metadata prompts/train.jsonl
    # a random-init model folder (safetensors)
    python -m world.make_tiny_umm random --out /tmp/tiny

Generation is measured by the evaluation script, as for any model:
    python eval_geneval.py generate --model checkpoints/tiny-umm \
        --metadata prompts/shapes_geneval.jsonl --out E --any-class
    python eval_geneval.py score E --scorer shapes

Three stages, each deterministic in --seed: (1) the image tokenizer, a per-cell classifier onto
the 161 cell kinds; (2) the diffusion decoder on (render, codes) pairs; (3) the LM on I2T captions
in every phrasing of the world (strong) and T2I code sequences of the train lines only (a --t2i-frac
share, deliberately weaker), in gvu.py's formats.
"""

import argparse
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel

import gvu
from tools import runio
from world import shapes
from world.shapes import GRID
from models.tiny_umm import TinyUMM, to_pixels

INSTRUCTION = "Describe the image in detail."  # gvu.py's default understanding instruction
COUNTED_TAGS = shapes.NUMBERED_TAGS
EVAL_FILES = ("prompts/shapes_geneval.jsonl", "prompts/shapes_geneval_plus.jsonl")
POSITION_SHARES = 3  # caption shares of the plain-relation tag (every other tag: 1)


def log(msg, t0=[time.time()]):
    print(f"[{time.time() - t0[0]:6.0f}s] {msg}", flush=True)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- the 161 cell kinds -----------------------------------------------------------------
def shape_kinds():
    """Kind 0 = empty cell, then (shape, colour, size) for 8 x 10 x 2 = 160 objects.
    Code k is kind k."""
    return [None] + [(s, c, z) for s in shapes.SHAPES for c in shapes.COLORS for z in shapes.SIZES]


KINDS = shape_kinds()
KIND_ID = {k: i for i, k in enumerate(KINDS)}


def scene_codes(objects):
    """The intended codes of a scene: kind id per cell, row-major."""
    codes = [0] * (GRID * GRID)
    for o in objects:
        codes[o.row * GRID + o.col] = KIND_ID[(o.shape, o.color, o.size)]
    return codes


def random_cells(rng, p_empty=0.4):
    """A scene with every cell independently empty or a random object (tokenizer/decoder data)."""
    return [
        shapes.Obj(*KINDS[k], r, c)
        for r in range(GRID)
        for c in range(GRID)
        if rng.random() > p_empty
        for k in [int(rng.integers(1, len(KINDS)))]
    ]


def render_batch(scenes, rng, jitter=0, noise=0.0):
    return to_pixels([shapes.render(s, jitter=jitter, noise=noise, rng=rng) for s in scenes])


# --- stage 1: the image tokenizer ------------------------------------------------------
def train_image_tokenizer(tok, rng, steps=300, batch=48, lr=3e-3):
    """Nearest-prototype classifier: cross-entropy over -||feature - codebook_k||^2 with the
    cell's kind as label. Trained on jittered, noisy renders so that decoded images (never
    pixel-perfect) still snap to the right code; the unused codes drift away from every cell."""
    opt = torch.optim.Adam(tok.parameters(), lr=lr)
    tok.train().requires_grad_(True)
    for step in range(steps):
        scenes = [random_cells(rng) for _ in range(batch)]
        x = render_batch(scenes, rng, jitter=1, noise=float(rng.choice([0.0, 4.0, 12.0])))
        y = torch.tensor([scene_codes(s) for s in scenes])
        loss = F.cross_entropy(tok.logits(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"tokenizer step {step:4d}  loss {loss.item():.4f}")
    tok.requires_grad_(False).eval()


@torch.no_grad()
def tokenizer_accuracy(tok, rng, n=500, noise=0.0):
    scenes = [random_cells(rng) for _ in range(n)]
    codes = tok.encode(render_batch(scenes, rng, jitter=1, noise=noise))
    return (codes == torch.tensor([scene_codes(s) for s in scenes])).float().mean().item()


# --- stage 2: the diffusion decoder -----------------------------------------------------
@torch.no_grad()
def init_decoder_templates(dec):
    """Start each code's RGB template at its kind's centred render (one cell; every cell draws
    the same way) and the UNet's residual at zero: the decoder starts as a near-perfect x0 model,
    so the diffusion training below is a short fine-tune instead of a long CPU run.
    Unused codes (>= len(KINDS)) get the empty cell's template."""
    c = dec.config.image_size // dec.config.grid
    w = dec.code_embed.weight.view(dec.config.num_codes, dec.config.cond_dim, c, c)
    for k in range(dec.config.num_codes):
        objs = [shapes.Obj(*KINDS[k], 0, 0)] if 0 < k < len(KINDS) else []
        w[k, :3] = to_pixels([shapes.render(objs)])[0, :, :c, :c]
    dec.unet.conv_out.weight.zero_()
    dec.unet.conv_out.bias.zero_()


def train_decoder(dec, scheduler, rng, steps=200, batch=16, lr=5e-4):
    """Standard DDPM epsilon-prediction MSE on (render, codes), after the template init. Targets
    are renders without jitter: given its codes an image is then fully determined, so decodes come
    out crisp and centred."""
    init_decoder_templates(dec)
    opt = torch.optim.AdamW(dec.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    dec.train().requires_grad_(True)
    T = scheduler.config.num_train_timesteps
    for step in range(steps):
        scenes = [random_cells(rng, p_empty=float(rng.uniform(0.2, 0.9))) for _ in range(batch)]
        x0 = render_batch(scenes, rng)
        codes = torch.tensor([scene_codes(s) for s in scenes])
        t = torch.from_numpy(rng.integers(0, T, batch))
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        loss = F.mse_loss(dec(scheduler.add_noise(x0, noise, t), t, codes), noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder step {step:4d}  loss {loss.item():.4f}")
    dec.requires_grad_(False).eval()


def detections_match(image, objects):
    """Does the pixel detector read exactly the scene's objects (shape, colour, size, cell)?"""
    got = sorted((d.shape, d.color, d.size, d.cell) for d in shapes.detect(image))
    return got == sorted((o.shape, o.color, o.size, (o.row, o.col)) for o in objects)


@torch.no_grad()
def vision_round_trip(umm, rng, n=200):
    """On held-out scenes: decode(encode(render)) read by the oracle (exact scene and per-line
    oracle), and re-tokenising the decoded image gives back the same codes."""
    metas = [m for f in EVAL_FILES for m in read_jsonl(f)]
    picks = [metas[i] for i in rng.integers(0, len(metas), n)]
    scenes = [shapes.sample_scene(m, rng, extra=int(rng.integers(0, 3))) for m in picks]
    codes = umm.image_tokenizer.encode(render_batch(scenes, rng, jitter=1))
    images = umm.decode_images(codes, torch.Generator().manual_seed(0))
    recodes = umm.image_tokenizer.encode(to_pixels(images))
    return dict(
        exact_scene=float(np.mean([detections_match(im, s) for im, s in zip(images, scenes)])),
        oracle=float(np.mean([shapes.oracle(im, m)[0] for im, m in zip(images, picks)])),
        codes_right=(codes == torch.tensor([scene_codes(s) for s in scenes])).float().mean().item(),
        recode_same=(recodes == codes).float().mean().item(),
    )


# --- captions and one-attribute distractors ------------------------------------------------
def caption_of(meta):
    """Rebuild a metadata line (prompt text, excludes) from its include list, in world/shapes.py's
    phrasing."""
    return shapes.make_line(meta["tag"], meta["include"])


def distractors(meta):
    """{attribute: [metadata lines that change ONE attribute of `meta`]}. Attributes: colour,
    count, position (relation or region), shape, size. Not yet checked against an image."""
    inc = meta["include"]
    out = {a: [] for a in ("color", "count", "position", "shape", "size")}

    def variant(i, **changes):
        new = [dict(r) for r in inc]
        new[i].update(changes)
        return caption_of({"tag": meta["tag"], "include": new})

    used = {r["class"] for r in inc}
    for i, r in enumerate(inc):
        if "color" in r:
            out["color"] += [variant(i, color=c) for c in shapes.COLORS if c != r["color"]]
        if meta["tag"] in COUNTED_TAGS:
            out["count"] += [
                variant(i, count=n)
                for n in (r["count"] - 1, r["count"] + 1)
                if 1 <= n <= shapes.MAX_OBJECTS
            ]
        if "position" in r:
            out["position"] += [
                variant(i, position=[rel, r["position"][1]])
                for rel in shapes.RELATIONS
                if rel != r["position"][0]
            ]
        if "region" in r:
            out["position"] += [variant(i, region=g) for g in shapes.REGIONS if g != r["region"]]
        out["shape"] += [variant(i, **{"class": s}) for s in shapes.SHAPES if s not in used]
        if r.get("size") in shapes.SIZES:
            out["size"].append(variant(i, size=[z for z in shapes.SIZES if z != r["size"]][0]))
    if any(r.get("size") in ("larger", "smaller") for r in inc):  # swap which one is larger
        out["size"].append(swap_all(meta, "size", {"larger": "smaller", "smaller": "larger"}))
    return out


def swap_all(meta, key, swap):
    """The line with every object's `key` (size, region) replaced by swap[value]; objects without
    it kept."""
    swapped = lambda r: dict(r, **{key: swap[r[key]]}) if r.get(key) in swap else dict(r)
    return caption_of({"tag": meta["tag"], "include": [swapped(r) for r in meta["include"]]})


def regions_swapped(meta):
    """The line with every region swapped, or None. Region lines always name an opposite pair ("on
    the left ... on the right"), so a distractor that changes ONE region names a pair no caption
    has, and language alone rejects it. The swap keeps an opposite pair: only the image can rule it
    out."""
    if sum("region" in r for r in meta["include"]) < 2:
        return None
    return swap_all(meta, "region", shapes.OPPOSITE)


def colours_rotated(meta):
    """The line with its named colours moved one object on (the last object's to the first), or
    None when that names the same objects. Every colour the line names is still named, so a judge
    that reads a bag of colours cannot reject it; only which object has which colour can (attribute
    binding, the color_attr tag's test)."""
    inc = meta["include"]
    if len(inc) < 2 or not all("color" in r for r in inc):
        return None
    rotated = [dict(r, color=inc[i - 1]["color"]) for i, r in enumerate(inc)]
    objects = lambda rs: sorted((r["class"], r["color"]) for r in rs)
    if objects(rotated) == objects(inc):
        return None
    return caption_of({"tag": meta["tag"], "include": rotated})


def binding_views(scene, rotated, seed):
    """The reward's side of binding: a line's scene, the same scene with the colours of `rotated`
    (its colours_rotated line), and the scene without its last object (a wrong count where the last
    group is counted), rendered with one jitter (the same seed)."""
    colours = [r["color"] for r in rotated["include"] for _ in range(r["count"])]
    views = (scene, [replace(o, color=c) for o, c in zip(scene, colours)], scene[:-1])
    return [shapes.render(v, jitter=1, rng=np.random.default_rng(seed)) for v in views]


def false_distractors(image, meta, rng, per_attr=3):
    """Per attribute, up to `per_attr` distractor prompts that the pixel oracle says are FALSE
    for this image (a changed attribute can happen to be true too, e.g. a second relation)."""
    out, dets = {}, shapes.detect(image)
    for attr, cands in distractors(meta).items():
        cands = [cands[i] for i in rng.permutation(len(cands))]
        bad = [d["prompt"] for d in cands if not shapes.judge(dets, d)[0]][:per_attr]
        if bad:
            out[attr] = bad
    return out


# --- stage 3: the LM --------------------------------------------------------------------
def lone_object(meta):
    """The line's one object (count 1), or None: what `draw` measures, --colour-first trains on."""
    obj = meta["include"]
    return obj[0] if len(obj) == 1 and obj[0]["count"] == 1 else None


def lone_colour(meta):
    """One object of a named colour (the colors tag's lines): --colour-first and --colour-share."""
    return "color" in (lone_object(meta) or {})


def colour_pair(meta):
    """Two or more objects, one of each, each of a named colour (color_attr's lines), as
    --pair-share draws."""
    obj = meta["include"]
    return len(obj) >= 2 and all(o["count"] == 1 and "color" in o for o in obj)


def t2i_sequence(umm, prompt, objs):
    """t2i_prompt(prompt) + the codes of the scene `objs`: exactly the sequence gvu.rollout
    samples and gvu.image_token_logprobs scores. Returns (ids, where the codes start)."""
    prefix = umm.tokenizer(umm.t2i_prompt(prompt), add_special_tokens=False).input_ids
    return prefix + [umm.image_offset + k for k in scene_codes(objs)], len(prefix)


def t2i_example(umm, meta, rng):
    """T2I: the sequence of a scene satisfying the line (loss on the codes only)."""
    return t2i_sequence(umm, meta["prompt"], shapes.sample_scene(meta, rng))


def i2t_batch(umm, metas, rng, with_distractor, extras=(0, 0, 1, 2)):
    """I2T: caption_prompt(image, instruction) + prompt + <|im_end|> (loss on the answer), exactly
    gvu.caption_token_logprobs' layout. Images are jittered renders of scenes sampled for the line,
    sometimes with extra unmentioned objects (as generated images have); the context uses the
    trained image tokenizer's codes (extra objects: one of `extras`, uniformly). Optionally one
    oracle-checked one-attribute distractor each."""
    scenes = [shapes.sample_scene(m, rng, extra=int(rng.choice(extras))) for m in metas]
    images = [shapes.render(s, jitter=1, rng=rng) for s in scenes]
    codes = umm.image_tokenizer.encode(to_pixels(images))
    tok = umm.tokenizer
    out = []
    for m, im, c in zip(metas, images, codes):
        ctx = tok(
            umm.caption_prompt_text(umm.codes_to_text(c), INSTRUCTION), add_special_tokens=False
        ).input_ids
        ans = tok(m["prompt"] + umm.answer_suffix, add_special_tokens=False).input_ids
        bad = None
        if with_distractor:  # attribute first, so shape and position get as many pairs as colour
            cands, dets = [ds for ds in distractors(m).values() if ds], shapes.detect(im)
            for a in rng.permutation(len(cands)):
                d = cands[a][int(rng.integers(len(cands[a])))]
                if not shapes.judge(dets, d)[0]:  # a changed attribute can happen to be true
                    bad = tok(d["prompt"] + umm.answer_suffix, add_special_tokens=False).input_ids
                    break
        out.append((ctx, ans, bad))
    return out


def lm_loss(umm, seqs, empty_weight=1.0):
    """seqs: list of (ids, start) = targets are ids[start:]. Right-padded batch; each target is
    scored over its own mode's vocabulary (text or image codes), as gvu's `logits` does.
    Returns per-sequence (weighted sum of target log-probs, sum of weights): every target weighs 1,
    except the empty image code, which weighs `empty_weight` (train_lm's warm-up; 1 = plain NLL)."""
    T = max(len(q) for q, _ in seqs)
    pad = umm.tokenizer.pad_token_id
    ids = torch.tensor([q + [pad] * (T - len(q)) for q, _ in seqs])
    attn = torch.tensor([[1] * len(q) + [0] * (T - len(q)) for q, _ in seqs])
    tmask = torch.tensor([[0] * s + [1] * (len(q) - s) + [0] * (T - len(q)) for q, s in seqs])
    tmask = tmask[:, 1:].bool()
    hidden = umm.lm.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
    target = ids[:, 1:]
    # (B, T-1); code 0 = empty cell
    weight = tmask * torch.where(target == umm.image_offset, empty_weight, 1.0)
    is_img = target >= umm.image_offset
    logp = torch.zeros(target.shape)
    for mode, sel, offset in (
        ("image", tmask & is_img, umm.image_offset),
        ("text", tmask & ~is_img, 0),
    ):
        if sel.any():  # the model's own per-mode vocabulary slice, as gvu reads it
            umm.set_generation_mode(mode)
            lp = F.log_softmax(umm.logits(hidden[sel]), -1)
            logp[sel] = lp.gather(-1, (target[sel] - offset)[:, None])[:, 0]
    return (logp * weight).sum(1), weight.sum(1)


def caption_space():
    """What the understanding branch learns to read: every line of every tag, as (benchmark, tag)
    keys for shapes.sample_line, drawn uniformly (a key listed k times gets k shares). A captioner
    describes scenes in all the world's phrasings (as a real UMM's caption data does), the eval
    prompts' texts included; T2I learns from the train lines only, so eval prompts stay unseen by
    generation (and by GvU). Plain relations ("a square left of a circle") get POSITION_SHARES
    shares (docs/shapes_world.md says why)."""
    keys = [(bench, tag) for bench, tags in shapes.BENCHMARKS.items() for tag in tags]
    return keys + [("geneval", "position")] * (POSITION_SHARES - 1)


def lm_batch(umm, metas, captions, rng, batch, n_t2i, with_distractor, kept=()):
    """n_t2i T2I examples and batch - n_t2i I2T examples whose captions are drawn from `captions`
    ((benchmark, tag) keys: a tag uniformly, then one of its lines). kept: (lines, n) pairs; n of
    the T2I examples are drawn from those lines, the rest from the train lines `metas`."""
    seqs = [
        t2i_example(umm, metas[i], rng)
        for i in rng.integers(0, len(metas), n_t2i - sum(n for _, n in kept))
    ]
    for lines, n in kept:
        if n:  # drawn only when asked, so the default recipe's random stream is unchanged
            seqs += [t2i_example(umm, lines[i], rng) for i in rng.integers(0, len(lines), n)]
    tags = [captions[i] for i in rng.integers(0, len(captions), batch - n_t2i)]
    return seqs, i2t_batch(umm, [shapes.sample_line(*t, rng) for t in tags], rng, with_distractor)


def train_lm(
    umm,
    metas,
    captions,
    rng,
    steps,
    batch,
    t2i_frac,
    lr,
    rank_weight,
    empty_weight=1.0,
    empty_until=0.0,
    colour_first=0.0,
    draw_every=0,
    colour_share=0.0,
    pair_share=0.0,
):
    """Mixed batches (`lm_batch`): round(batch * t2i_frac) T2I sequences, the rest I2T. Loss = mean
    token NLL over all targets + rank_weight * a ranking loss that puts the true caption's reward
    (mean log-prob of prompt + end-of-turn, the intrinsic reward) above a one-attribute
    distractor's.
    Empty-cell warm-up: for the first `empty_until` share of the steps, T2I's empty-cell targets
    (most of every scene) weigh `empty_weight`; after it, plain NLL, which calibrates how often a
    cell is empty again (the logged `nll img` is the weighted one meanwhile).
    Colour first: for the first `colour_first` share of the steps, T2I draws only the one-object
    lines that name their colour; after it, every train line (55% name no colour and draw a random
    one), of which round(n_t2i * colour_share) a batch stay on those lines. Without that share the
    curriculum's colour is forgotten within 200 steps (docs/shapes_world.md, "Colour generation, a
    curriculum"). After it, round(n_t2i * pair_share) a batch are lines of two or more objects,
    each of a named colour (`colour_pair`).
    draw_every > 0 logs `draw_rates` on the train lines every that many steps (its own rng: the run
    is unchanged)."""
    coloured = [m for m in metas if lone_colour(m)]
    pairs = [m for m in metas if colour_pair(m)]
    n_t2i = int(round(batch * t2i_frac))
    opt = torch.optim.AdamW(umm.lm.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    umm.lm.train().requires_grad_(True)
    for step in range(steps):
        first = step < colour_first * steps
        kept = (
            ()
            if first
            else ((coloured, round(n_t2i * colour_share)), (pairs, round(n_t2i * pair_share)))
        )
        seqs, i2t = lm_batch(
            umm, coloured if first else metas, captions, rng, batch, n_t2i, rank_weight > 0, kept
        )
        seqs += [(c + a, len(c)) for c, a, _ in i2t]
        ranked = [k for k, (_, _, b) in enumerate(i2t) if b is not None]
        seqs += [(i2t[k][0] + i2t[k][2], len(i2t[k][0])) for k in ranked]
        lp, n = lm_loss(umm, seqs, empty_weight if step < empty_until * steps else 1.0)
        n_main = n_t2i + len(i2t)
        nll = -lp[:n_main].sum() / n[:n_main].sum()
        nll_img = -lp[:n_t2i].sum() / max(1, n[:n_t2i].sum())
        nll_txt = -lp[n_t2i:n_main].sum() / n[n_t2i:n_main].sum()
        loss, rank = nll, torch.tensor(0.0)
        if ranked:  # logistic loss on the gap of mean log-probs (log intrinsic rewards)
            good = (lp[n_t2i:n_main] / n[n_t2i:n_main])[ranked]
            bad = lp[n_main:] / n[n_main:]
            rank = F.softplus(-10 * (good - bad)).mean()
            loss = loss + rank_weight * rank
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(umm.lm.parameters(), 1.0)
        opt.step()
        sched.step()
        if draw_every and (step % draw_every == 0 or step == steps - 1):
            log(
                "draw "
                + "  ".join(
                    f"{t} shape {s:.3f} colour {c:.3f}"
                    for t, (s, c, _) in draw_rates(umm, metas, n=50).items()
                    if not np.isnan(c)
                )
            )
        if step % 100 == 0 or step == steps - 1:
            log(
                f"lm step {step:5d}  nll img {nll_img.item():.3f}  txt {nll_txt.item():.3f}"
                f"  rank {rank.item():.3f}  lr {sched.get_last_lr()[0]:.1e}"
            )
    umm.lm.eval().requires_grad_(False)


def start_codes_from_words(umm, weight):
    """Row image_offset + k of `weight` (V, D) starts as the sum of kind k's shape, colour and size
    word rows over sqrt(3), which keeps the norm of a random row: every red code then shares one
    direction from step 0 (a SigLIP-VQ code is a semantic feature too). The empty code, unused codes
    and text rows keep their init."""
    unk = umm.tokenizer.unk_token_id
    with torch.no_grad():
        for k, kind in enumerate(KINDS[1:], 1):
            ids = [umm.tokenizer.convert_tokens_to_ids(w) for w in kind]
            assert unk not in ids, kind
            weight[umm.image_offset + k] = weight[ids].sum(0) / len(ids) ** 0.5


def semantic_code_init(umm):
    """--semantic-codes: the codes' input embeddings start from their words' (what the LM reads)."""
    start_codes_from_words(umm, umm.lm.get_input_embeddings().weight)


def semantic_head_init(umm):
    """--semantic-head: the codes' output rows start from their words' output rows (what T2I
    writes), meant to let a colour be learned once for every shape. It does not make the model draw
    the named colour (docs/shapes_world.md, "Colour generation, measured")."""
    start_codes_from_words(umm, umm.lm.lm_head.weight)


# what --lm-from takes from its folder; check_train_args refuses these flags beside it
FROM_THE_FOLDER = (
    "hidden",
    "layers",
    "heads",
    "num_codes",
    "tok_steps",
    "dec_steps",
    "decode_steps",
)


def check_train_args(p, a):
    """Refuse bad `train` input before anything is trained or written: one line that names every
    bad flag."""
    n_t2i = round(a.batch * a.t2i_frac)
    rules = [
        ("steps", a.steps >= 1, ">= 1"),
        ("batch", a.batch >= 2, ">= 2"),
        (
            "t2i_frac",
            0 <= n_t2i < a.batch,
            "in [0, 1) with round(batch * t2i_frac) < batch (an I2T sequence)",
        ),
        ("lr", math.isfinite(a.lr) and a.lr > 0, "> 0"),
        ("rank_weight", a.rank_weight >= 0, ">= 0"),
        ("empty_weight", math.isfinite(a.empty_weight) and a.empty_weight > 0, "> 0"),
        ("empty_until", 0 <= a.empty_until <= 1, "in [0, 1]"),
        ("colour_first", 0 <= a.colour_first <= 1, "in [0, 1]"),
        ("colour_share", 0 <= a.colour_share <= 1, "in [0, 1]"),
        ("pair_share", 0 <= a.pair_share <= 1, "in [0, 1]"),
        ("draw_every", a.draw_every >= 0, ">= 0 (0 = never)"),
        ("threads", a.threads >= 1, ">= 1"),
    ]
    bad = [
        f"--{f.replace('_', '-')} must be {what} (got {getattr(a, f)})"
        for f, ok, what in rules
        if not ok
    ]
    if a.colour_share + a.pair_share > 1:
        bad.append(
            f"--colour-share + --pair-share must be <= 1 (got {a.colour_share + a.pair_share:g})"
        )
    try:
        metas = read_jsonl(a.prompts)
        coloured = any(map(lone_colour, metas))
        pairs = any(map(colour_pair, metas))
    except OSError as e:  # missing, a folder, unreadable
        bad.append(f"--prompts {a.prompts}: {e.strerror or e}")
    # bad JSON, bad UTF-8, or a line without GenEval's fields
    except (ValueError, KeyError, TypeError) as e:
        bad.append(
            f"--prompts {a.prompts}: not GenEval-format JSON lines ({type(e).__name__}: {e})"
        )
    else:
        if (a.colour_first or a.colour_share) and not coloured:
            bad.append(
                f"--colour-first/--colour-share: {a.prompts} has no one-object line "
                "that names a colour"
            )
        if a.pair_share and not pairs:
            bad.append(
                f"--pair-share: {a.prompts} has no line of one-of-each objects "
                "that all name a colour"
            )
    if a.lm_from and (a.vision_from or a.semantic_codes or a.semantic_head):
        bad.append(
            "--lm-from starts from a trained model: "
            "--vision-from, --semantic-codes and --semantic-head do not apply"
        )
    if a.lm_from:
        default = vars(parser().parse_args(["train", "--out", "X"]))
        if given := [
            f"--{f.replace('_', '-')}" for f in FROM_THE_FOLDER if getattr(a, f) != default[f]
        ]:
            bad.append(f"--lm-from keeps the folder's model: {', '.join(given)} do not apply")
    if a.lm_from and not os.path.isfile(os.path.join(a.lm_from, "tiny_umm.json")):
        bad.append(f"--lm-from {a.lm_from} is not a tiny UMM folder (no tiny_umm.json)")
    if problem := runio.check_out_folder(a.out):
        bad.append(problem)
    elif os.path.isdir(a.out) and os.listdir(a.out):
        bad.append(
            f"--out {a.out} is not empty (a model there is never overwritten); "
            "remove it or pick another folder"
        )
    if bad:
        p.error("; ".join(bad))


def train(a):
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    # a further LM stage: the whole model (LM, tokenizer, decoder) starts from a trained folder
    if a.lm_from:
        umm = TinyUMM.from_pretrained(a.lm_from)
        log(f"LM, image tokenizer and decoder loaded from {a.lm_from}")
    else:
        umm = TinyUMM.random(a.seed, a.hidden, a.layers, a.heads, a.num_codes)
        # saved with the model; the round-trip check below uses it too
        umm.decode_steps = a.decode_steps
    if a.semantic_codes:
        semantic_code_init(umm)
    if a.semantic_head:
        semantic_head_init(umm)
    if a.vision_from:  # reuse a trained tokenizer + decoder (same seed -> same result, faster)
        src = TinyUMM.from_pretrained(a.vision_from)
        umm.image_tokenizer, umm.decoder = src.image_tokenizer, src.decoder
        log(f"image tokenizer + decoder loaded from {a.vision_from}")
    elif not a.lm_from:
        train_image_tokenizer(umm.image_tokenizer, rng, a.tok_steps)
        log(
            f"tokenizer cell accuracy: clean {tokenizer_accuracy(umm.image_tokenizer, rng):.4f}"
            f"  noise 12: {tokenizer_accuracy(umm.image_tokenizer, rng, noise=12.0):.4f}"
        )
        train_decoder(umm.decoder, umm.scheduler, rng, a.dec_steps)
    log(
        "vision round trip (held-out scenes): "
        + json.dumps(
            {
                k: round(v, 4)
                for k, v in vision_round_trip(umm, np.random.default_rng(a.seed + 1)).items()
            }
        )
    )
    metas = read_jsonl(a.prompts)
    eval_prompts = {m["prompt"] for f in EVAL_FILES for m in read_jsonl(f)}
    assert not eval_prompts & {m["prompt"] for m in metas}, (
        "train prompts must not contain eval prompts"
    )
    # the LM's data does not depend on how the vision parts were made
    rng = np.random.default_rng([a.seed, 1])
    train_lm(
        umm,
        metas,
        caption_space(),
        rng,
        a.steps,
        a.batch,
        a.t2i_frac,
        a.lr,
        a.rank_weight,
        a.empty_weight,
        a.empty_until,
        a.colour_first,
        a.draw_every,
        a.colour_share,
        a.pair_share,
    )
    # written whole, then renamed: a killed run leaves no half model at --out
    tmp = a.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    umm.save_pretrained(tmp)
    with open(os.path.join(tmp, "train_args.json"), "w") as f:
        json.dump(vars(a), f, indent=1)
    os.replace(tmp, a.out)  # --out is absent or an empty folder (check_train_args)
    log(f"saved {a.out}")


# --- measuring a base -------------------------------------------------------------------
def load_measured(a):
    """The model a measuring subcommand reads: --model, with --adapter (a GvU-trained LoRA) applied
    if given. Returns (umm, the PeftModel or None); the LoRA is injected into umm.lm, so umm reads
    with it."""
    torch.set_num_threads(a.threads)
    umm = TinyUMM.from_pretrained(a.model)
    lora = PeftModel.from_pretrained(umm.lm, a.adapter) if a.adapter else None
    umm.lm.eval()
    return umm, lora


def paired_change(before, after):
    """Two verdict lists on the same comparisons: (lost, gained, n, change, low, high), the change
    in accuracy with its 95% Wald interval for a paired difference. Rough at a handful of changed
    verdicts (none: zero width)."""
    b, x = np.array(before, bool), np.array(after, bool)
    lost, gained, n = int((b & ~x).sum()), int((~b & x).sum()), len(b)
    d = (gained - lost) / n
    half = 1.96 * np.sqrt(max((gained + lost) / n - d * d, 0) / n)
    return lost, gained, n, d, d - half, d + half


# the swaps `understand` reads apart from the one-attribute distractors: regions_swapped,
# colours_rotated
SWAPS = {
    "regions, both swapped": "every region swapped",
    "colours, rotated": "its colours moved one object on",
}


@torch.no_grad()
def understand(a):
    """Held-out renders of scenes for EVAL lines; per attribute, is the true caption's intrinsic
    reward above every oracle-false one-attribute distractor's? Reported per attribute and per
    (eval file, tag) (a tag's rate pools its images' attribute comparisons)."""
    umm, lora = load_measured(a)  # with --adapter: does understanding survive the RL?
    paired, base_hits = bool(a.adapter and getattr(a, "paired", False)), {}
    rng = np.random.default_rng(a.seed)
    metas = [(os.path.basename(f).split(".")[0], m) for f in EVAL_FILES for m in read_jsonl(f)]
    # position: its comparisons split into relations and regions
    hits, by_tag, position = {}, {}, {}
    swapped = {kind: [] for kind in SWAPS}  # true caption vs the line swapped, per kind
    views = []  # colour lines: the reward on the scene, the colour-rotated one, one object short
    for i in range(a.n):
        name, meta = (
            metas[i % len(metas)] if a.n >= len(metas) else metas[int(rng.integers(len(metas)))]
        )
        scene = shapes.sample_scene(meta, rng)
        image = shapes.render(scene, jitter=1, rng=rng)
        bad = false_distractors(image, meta, rng)
        prompts = [meta["prompt"]] + [p for ps in bad.values() for p in ps]
        # the swaps are false for every scene of the line; scored last, so the attributes keep their
        # distractors
        rotated = colours_rotated(meta)
        swaps = {kind: s["prompt"] for kind, s in zip(SWAPS, (regions_swapped(meta), rotated)) if s}
        prompts += list(swaps.values())
        logp, mask = gvu.caption_token_logprobs(umm, [image] * len(prompts), prompts, INSTRUCTION)
        r = gvu.intrinsic_reward(logp, mask).tolist()
        if paired:  # the same comparisons read by the base model, the adapter off
            with lora.disable_adapter():
                r_base = gvu.intrinsic_reward(
                    *gvu.caption_token_logprobs(umm, [image] * len(prompts), prompts, INSTRUCTION)
                ).tolist()
        k = 1
        for attr, ps in bad.items():
            hit = r[0] > max(r[k : k + len(ps)])
            hits.setdefault(attr, []).append(hit)
            if paired:
                base_hits.setdefault(attr, []).append(r_base[0] > max(r_base[k : k + len(ps)]))
            by_tag.setdefault(f"{name}/{meta['tag']}", []).append(hit)
            if attr == "position":  # "a circle left of a square" or "a circle on the left"
                kind = "relation" if any("position" in r for r in meta["include"]) else "region"
                position.setdefault(kind, []).append(hit)
            k += len(ps)
        for kind, rs in zip(swaps, r[len(r) - len(swaps) :]):
            swapped[kind].append(r[0] > rs)
        if rotated:
            views.append(
                gvu.intrinsic_reward(
                    *gvu.caption_token_logprobs(
                        umm,
                        binding_views(scene, rotated, [a.seed, i]),
                        [meta["prompt"]] * 3,
                        INSTRUCTION,
                    )
                ).tolist()
            )
    for tag, h in sorted(by_tag.items()):
        print(f"understanding {tag:40s} {np.mean(h):.3f}  (n={len(h)})")
    for attr, h in hits.items():
        print(f"understanding {attr:9s} {np.mean(h):.3f}  (n={len(h)})")
    for kind, h in sorted(position.items()):
        print(f"  position, {kind:8s} {np.mean(h):.3f}  (n={len(h)})")
    # chance is 0.5: a judge blind to where things are (which object has which colour) scores ~0.5
    # here, however well it reads regions (colours) one at a time above
    for kind, h in swapped.items():
        if h:
            print(
                f"  {kind} {np.mean(h):.3f}  "
                f"(n={len(h)}: true caption above the line with {SWAPS[kind]})"
            )
    if views:  # what GRPO's advantage sees: how much a wrong colour costs against a missing object
        own, rotated, short = np.array(views).T
        below = np.mean(rotated < own)
        print(
            f"  reward of a colour line on its scene {own.mean():.3f}, "
            f"with its colours rotated {rotated.mean():.3f} (below in {below:.3f}), "
            f"one object short {short.mean():.3f} (n={len(own)})"
        )
    overall = np.mean([np.mean(h) for h in hits.values()])
    print(f"understanding overall   {overall:.3f}  (mean of attributes)")
    # paired: which comparisons the adapter lost and gained, and the change's interval
    for attr, h in base_hits.items():
        lost, gained, n, d, lo, hi = paired_change(h, hits[attr])
        print(
            f"paired with the base {attr:9s} {np.mean(h):.3f} -> {np.mean(hits[attr]):.3f}: "
            f"lost {lost}, gained {gained} of {n}; "
            f"{100 * d:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        )
    return (hits, base_hits) if paired else hits


@contextmanager
def image_mode_eval(umm):
    """The LM in eval and image mode inside the block, then back as it was (a probe inside train_lm
    changes nothing)."""
    was_training, mode = umm.lm.training, umm.generation_mode
    umm.lm.eval()
    umm.set_generation_mode("image")
    try:
        yield
    finally:
        umm.lm.train(was_training)
        umm.set_generation_mode(mode)


@torch.no_grad()
def draw_rates(umm, metas, seed=1234, n=100):
    """Does T2I draw what a one-object line names? Teacher-forced on a scene sampled for the line,
    at the object's own cell: the LM's image-mode probability of the named shape (among all
    objects) and of the named colour (among the ten colours of that shape and size). Chance: 1/8
    and 1/10. Returns {tag: (shape, colour or nan, lines)} over up to n one-object lines per tag of
    `metas`; its own rng, so a probe inside train_lm changes nothing."""
    rng, by_tag = np.random.default_rng(seed), {}
    with image_mode_eval(umm):
        for meta in metas:
            obj = lone_object(meta)
            if obj is None or len(by_tag.get(meta["tag"], [])) >= n:
                continue
            (o,) = shapes.sample_scene(meta, rng)
            cell = o.row * GRID + o.col
            ids, start = t2i_sequence(umm, meta["prompt"], [o])
            ids = ids[: start + cell]  # the prompt and the empty cells before the object
            hidden = umm.lm.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            p = F.softmax(umm.logits(hidden), -1)
            objects = p[1 : len(KINDS)].sum()
            shape = (
                sum(p[KIND_ID[(o.shape, c, z)]] for c in shapes.COLORS for z in shapes.SIZES)
                / objects
            )
            colour = p[KIND_ID[(o.shape, o.color, o.size)]] / sum(
                p[KIND_ID[(o.shape, c, o.size)]] for c in shapes.COLORS
            )
            by_tag.setdefault(meta["tag"], []).append(
                (shape.item(), colour.item() if "color" in obj else np.nan)
            )
    out = {}
    for tag, rows in sorted(by_tag.items()):
        shape, colour = np.array(rows).T
        out[tag] = (
            shape.mean(),
            np.nan if np.isnan(colour).all() else np.nanmean(colour),
            len(rows),
        )
    return out


@torch.no_grad()
def binding_rates(umm, metas, seed=1234, n=150):
    """Does T2I bind each colour to its own object? On up to n color_attr lines of `metas` (2+
    objects, each of a named colour), teacher-forced on a scene sampled for the line, at each
    object's cell: the probability of the colour its prompt names and of the colours the prompt
    names for the OTHER objects, both among the ten colours of that shape and size. A bag of the
    prompt's colours puts about as much on each named colour (a first object's own colour and
    another's then tie); binding puts it on the object's own. Returns (own, another's, lines)."""
    rng, own, other = np.random.default_rng(seed), [], []
    lines = [m for m in metas if m["tag"] == "color_attr" and colour_pair(m)][:n]
    with image_mode_eval(umm):
        for meta in lines:
            objs = shapes.sample_scene(meta, rng)
            ids, start = t2i_sequence(umm, meta["prompt"], objs)
            hidden = umm.lm.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            named = {r["color"] for r in meta["include"]}
            for o in objs:  # the hidden state before the object's own cell predicts its code
                p = F.softmax(umm.logits(hidden[start + o.row * GRID + o.col - 1]), -1)
                of = lambda colours: sum(p[KIND_ID[(o.shape, c, o.size)]] for c in colours).item()
                total = of(shapes.COLORS)
                own.append(of([o.color]) / total)
                other.append(of(named - {o.color}) / total)
    return float(np.mean(own)), float(np.mean(other)), len(lines)


def draw(a):
    """`draw_rates` of --model on --metadata, one printed line per tag, then `binding_rates`."""
    umm, _ = load_measured(a)
    metas = read_jsonl(a.metadata)
    for tag, (shape, colour, n) in draw_rates(umm, metas, a.seed, a.n).items():
        named = "  -  " if np.isnan(colour) else f"{colour:.3f}"
        print(f"draw {tag:14s} named shape {shape:.3f}  named colour {named}  (n={n} lines)")
    own, other, n = binding_rates(umm, metas, a.seed)
    if n:
        print(
            f"draw binding: at each object of a color_attr line, its own colour {own:.3f}, "
            f"the other objects' named colours {other:.3f} "
            f"(n={n} lines; a bag of the named colours spreads over both)"
        )


def parser():
    """The command line; `train`'s defaults are the shipped default base's recipe
    (checkpoints/tiny-umm)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("random", help="save a randomly initialised tiny UMM")
    r.add_argument("--out", required=True, help="folder to write")
    r.add_argument("--seed", type=int, default=0, help="init seed")
    t = sub.add_parser("train", help="train tokenizer, decoder and LM in the shapes world")
    t.add_argument("--out", required=True, help="folder to write")
    t.add_argument("--seed", type=int, default=0, help="seeds init, data and every random choice")
    t.add_argument(
        "--t2i-frac",
        type=float,
        default=0.2,
        help="share of T2I sequences per LM batch (0.2: 13 of 64)",
    )
    t.add_argument("--steps", type=int, default=2000, help="LM steps")
    t.add_argument("--batch", type=int, default=64, help="LM sequences per step (+ distractors)")
    t.add_argument("--lr", type=float, default=2e-3, help="LM peak learning rate (one-cycle)")
    t.add_argument(
        "--rank-weight",
        type=float,
        default=1.0,
        help="weight of the caption-vs-distractor ranking loss",
    )
    t.add_argument(
        "--empty-weight",
        type=float,
        default=0.05,
        help="weight of T2I's empty-cell targets during the warm-up (1: plain NLL throughout)",
    )
    t.add_argument(
        "--empty-until",
        type=float,
        default=0.3,
        help="share of the LM steps the empty-cell warm-up lasts",
    )
    t.add_argument(
        "--colour-first",
        type=float,
        default=0.3,
        help="share of the LM steps whose T2I lines are one object of a named colour "
        "(0: every line from the start)",
    )
    t.add_argument(
        "--colour-share",
        type=float,
        default=0.5,
        help="after --colour-first, share of each T2I batch still drawn from those lines (0: none)",
    )
    t.add_argument(
        "--pair-share",
        type=float,
        default=0.25,
        help="after --colour-first, share of each T2I batch drawn from lines of one-of-each "
        "objects that all name a colour",
    )
    t.add_argument(
        "--draw-every",
        type=int,
        default=200,
        help="log `draw`'s named shape and colour on the train lines every N LM steps (0: never)",
    )
    t.add_argument("--tok-steps", type=int, default=300, help="image tokenizer steps")
    t.add_argument("--dec-steps", type=int, default=200, help="diffusion decoder steps")
    t.add_argument(
        "--decode-steps",
        type=int,
        default=2,
        help="DDIM steps the saved model decodes with",
    )
    t.add_argument(
        "--semantic-codes",
        action="store_true",
        help="image code embeddings start from their words'",
    )
    t.add_argument(
        "--semantic-head",
        action="store_true",
        help="image code output rows start from their words'",
    )
    t.add_argument(
        "--vision-from", default="", help="reuse the tokenizer + decoder of this tiny UMM folder"
    )
    t.add_argument(
        "--lm-from",
        default="",
        help="start from this trained tiny UMM folder (LM, tokenizer, decoder and its decode "
        "steps) and train its LM further: a second stage",
    )
    t.add_argument("--prompts", default="prompts/train.jsonl", help="train metadata lines")
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--num-codes", type=int, default=192, help="image codes (>= the 161 cell kinds)")
    t.add_argument("--threads", type=int, default=2)
    u = sub.add_parser(
        "understand", help="caption-vs-distractor accuracy per attribute on eval lines"
    )
    u.add_argument("--n", type=int, default=300, help="held-out scenes")
    u.add_argument(
        "--paired",
        action="store_true",
        help="with --adapter: also read every comparison with the adapter off, and print per "
        "attribute how many the adapter lost and gained, with a 95%% interval",
    )
    d = sub.add_parser(
        "draw", help="T2I probability of the named shape and colour at the object's cell, per tag"
    )
    d.add_argument(
        "--metadata",
        default="prompts/train.jsonl",
        help="lines to read (one-object lines are used)",
    )
    d.add_argument("--n", type=int, default=100, help="lines per tag, at most")
    for m in (u, d):  # what load_measured reads
        m.add_argument("--model", required=True)
        m.add_argument("--adapter", default="", help="a LoRA adapter folder written by gvu.py")
        m.add_argument("--seed", type=int, default=1234)
        m.add_argument("--threads", type=int, default=2)
    return p


if __name__ == "__main__":
    p = parser()
    a = p.parse_args()
    if a.cmd == "random":
        TinyUMM.random(a.seed).save_pretrained(a.out)
        print(f"saved a random tiny UMM to {a.out}")
    elif a.cmd == "train":
        check_train_args(p, a)
        train(a)
    elif a.cmd == "understand":
        if a.paired and not a.adapter:
            p.error(
                "--paired needs --adapter (it reads each comparison with the adapter on and off)"
            )
        understand(a)
    elif a.cmd == "draw":
        draw(a)
