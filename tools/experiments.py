r"""Figures and experiments around a GvU run: what the README's pictures and tables are made of.

audit         per tag, does the model's own intrinsic reward rank its images like the scorer?
curve         reward (and KL) vs step from gvu.py log.jsonl files
failures      per tag, how many of a scored folder's wrong images lack a named object (and how
              many draw every object but get a colour, size or relation wrong)
grid          the same prompts and seeds from two `eval_geneval.py generate` folders side by side
oracle-train  gvu.py with the shapes world's pixel oracle as the reward (gvu_step's reward_fn):
              same RL, a perfect judge, meant as an upper bound for the intrinsic reward
token-view    what the reward sees: a generate folder's images with the prompt's tokens shaded by
              their probability under the judge; --edits: the mean reward drop when one attribute
              word changes
where         can the tiny UMM's LM learn to read WHERE an object is? fine-tunes a copy on
              one-object region captions and reports how often it names the right half

python -m tools.experiments audit --model checkpoints/tiny-umm \
    --metadata prompts/shapes_geneval.jsonl --out runs/audit_base
python -m tools.experiments curve "GvU=runs/A/log.jsonl" --out assets/reward_curve.png --smooth 20
python -m tools.experiments failures runs/eval_base/shapes_geneval runs/eval_A/shapes_geneval
python -m tools.experiments grid runs/eval_base/geneval runs/eval_A/geneval \
    --out assets/before_after.png
python -m tools.experiments oracle-train --out runs/O          # other flags go to gvu.py
python -m tools.experiments token-view runs/eval_base/geneval --edits --correct-only \
    --out assets/token_view.png
python -m tools.experiments where --model checkpoints/tiny-umm --others 0 --cell-embedding 2
"""

import argparse
import json
import sys
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import gvu
from tools import loggers
from world import make_tiny_umm as make
from tools import runio
from world import shapes
from models.adapters import InputError
from eval_geneval import (
    COLORS as GENEVAL_COLORS,
    GenEvalError,
    add_detector_flags,
    add_load_flags,
    add_model_flags,
    iter_samples,
    load_image,
    load_model,
    make_scorer,
    read_metadata,
    sample_groups,
    scorer_classes,
)
from world.geneval_rules import lacks_an_object
from models.tiny_umm import TinyUMM


# --------------------------------------------------------------------------- reward audit


def group_auc(rewards, correct):
    """P(reward of a correct image > reward of a wrong one) within one group, ties count half;
    None if undefined."""
    pos = [r for r, c in zip(rewards, correct) if c]
    neg = [r for r, c in zip(rewards, correct) if not c]
    if not pos or not neg:
        return None
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def audit_table(rows):
    """Per tag: within-group AUC, share of groups the scorer cannot split, and the mean reward of
    correct vs wrong images."""
    by_tag = {}
    for r in rows:
        by_tag.setdefault(r["tag"], []).append(r)
    out = {}
    for tag, groups in sorted(by_tag.items()):
        aucs = [a for g in groups if (a := group_auc(g["rewards"], g["correct"])) is not None]
        good = [x for g in groups for x, c in zip(g["rewards"], g["correct"]) if c]
        bad = [x for g in groups for x, c in zip(g["rewards"], g["correct"]) if not c]
        out[tag] = {
            "groups": len(groups),
            "auc": float(np.mean(aucs)) if aucs else None,
            "no_difference": 1 - len(aucs) / len(groups),
            "reward_correct": float(np.mean(good)) if good else None,
            "reward_wrong": float(np.mean(bad)) if bad else None,
            "accuracy": len(good) / (len(good) + len(bad)),
        }
    return out


def cmd_audit(args) -> None:
    """audit: does the model's own reward rank its images the way the scorer does?"""
    classes = scorer_classes(args.scorer)
    metas = read_metadata(args.metadata, classes)
    umm, scorer, rows = load_model(args), make_scorer(args), []
    for index, meta, images in sample_groups(umm, metas, args.group_size, args):
        with torch.no_grad():
            rewards = gvu.intrinsic_reward(
                *gvu.caption_token_logprobs(
                    umm,
                    images,
                    [meta["prompt"]] * len(images),
                    args.instruction,
                    end_of_turn=args.end_of_turn == "on",
                )
            )
        verdicts = [scorer(im, meta) for im in images]
        rows.append(
            {
                "index": index,
                "tag": meta["tag"],
                "prompt": meta["prompt"],
                "rewards": rewards.tolist(),
                "correct": [bool(c) for c, _ in verdicts],
            }
        )
    table = audit_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit_groups.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "audit.json").write_text(json.dumps(table, indent=2) + "\n")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    md = [
        "| tag | groups | accuracy | within-group AUC | groups with no difference "
        "| reward correct | reward wrong |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    md += [
        f"| {t} | {v['groups']} | {v['accuracy']:.3f} | {fmt(v['auc'])} "
        f"| {v['no_difference']:.2f} | {fmt(v['reward_correct'])} | {fmt(v['reward_wrong'])} |"
        for t, v in table.items()
    ]
    (out / "audit.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


# --------------------------------------------------------------------------- figures for the README


def cmd_curve(args) -> None:
    """curve: reward (and KL) vs step from gvu.py log.jsonl files, as a PNG (needs matplotlib)."""
    try:
        import matplotlib  # optional: only this figure needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GenEvalError("curve needs matplotlib: pip install matplotlib") from None
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(10, 3.5))
    for log in args.logs:
        label, _, path = log.rpartition("=") if "=" in log else (Path(log).parent.name, "", log)
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        steps = [r["step"] for r in rows]
        smooth = lambda xs, k=args.smooth: [
            float(np.mean(xs[max(0, i - k + 1) : i + 1])) for i in range(len(xs))
        ]
        (line,) = ax_r.plot(steps, smooth([r["reward_mean"] for r in rows]), label=label, alpha=0.6)
        probe = [(r["step"], r["probe_reward"]) for r in rows if "probe_reward" in r]
        if probe:  # fixed prompts and seeds: the curve that shows learning (gvu.py --probe-every)
            ax_r.plot(*zip(*probe), "o-", color=line.get_color(), label=f"{label}: probe reward")
        ax_k.plot(steps, smooth([r["kl"] for r in rows]), label=label)
    ax_r.set(xlabel="step", ylabel=f"reward (lines: {args.smooth}-step running mean; dots: probe)")
    ax_k.set(xlabel="step", ylabel="KL to the base (k3, per token)")
    ax_r.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


def failure_counts(results: list[dict]) -> dict[str, tuple[int, int, int]]:
    """{tag: (images, wrong, wrong with a named object missing)} from the results.jsonl rows of
    `eval_geneval.py score`."""
    counts = {}
    for r in results:
        images, wrong, missing = counts.get(r["tag"], (0, 0, 0))
        bad = r["correct"] is False
        counts[r["tag"]] = (
            images + 1,
            wrong + bad,
            missing + (bad and lacks_an_object(r["reason"])),
        )
    return counts


def cmd_failures(args) -> None:
    """failures: why a scored folder's images are wrong, per tag: a named object missing, or every
    object drawn and one of its attributes (colour, size, relation, region) wrong."""
    for folder in args.folders:
        path = Path(folder) / "results.jsonl"
        if not path.is_file():
            raise GenEvalError(
                f"{folder}: no results.jsonl (run eval_geneval.py score on it first)"
            )
        counts = failure_counts(
            [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        )
        print(
            f"{folder}\n| tag | images | wrong | an object missing "
            "| every object drawn, an attribute wrong |"
        )
        print("|---|---:|---:|---:|---:|")
        for tag, (images, wrong, missing) in sorted(counts.items()):
            print(f"| {tag} | {images} | {wrong} | {missing} | {wrong - missing} |")


def cmd_grid(args) -> None:
    """grid: the same prompts and seeds of two generate folders side by side, with the scorer's
    verdicts in green/red frames."""
    classes = scorer_classes(args.scorer)
    runs = [list(iter_samples(folder, classes=classes)) for folder in (args.run_a, args.run_b)]
    scorer, px, n = make_scorer(args), 96, args.images
    by_prompt = [{} for _ in runs]
    for d, run in zip(by_prompt, runs):
        for index, meta, path in run:
            d.setdefault(index, (meta, []))[1].append(path)
    indices = sorted(by_prompt[0])[:: max(1, len(by_prompt[0]) // args.prompts)][: args.prompts]
    grid = Image.new("RGB", (2 * n * px + 12, len(indices) * (px + 14)), "white")
    draw = ImageDraw.Draw(grid)
    for row, index in enumerate(indices):
        y = row * (px + 14)
        draw.text((2, y), by_prompt[0][index][0]["prompt"], fill="black")
        for side, d in enumerate(by_prompt):
            meta, paths = d[index]
            for j, path in enumerate(paths[:n]):
                image = load_image(path)
                ok, _ = scorer(image, meta)
                x = side * (n * px + 12) + j * px
                grid.paste(image.resize((px - 4, px - 4), Image.NEAREST), (x + 2, y + 12))
                draw.rectangle(
                    [x + 1, y + 11, x + px - 2, y + px - 2],
                    outline="green" if ok else "red",
                    width=2,
                )
    grid.save(args.out)
    print(f"wrote {args.out}: left {args.run_a}, right {args.run_b}; green = correct, red = wrong")


# ------------------------------------------------------------------------ oracle-reward upper bound


def oracle_reward_fn(train_metadata):
    """A gvu reward_fn: the pixel oracle's verdict (1 or 0) on each image, given its prompt's
    metadata."""
    by_prompt = {m["prompt"]: m for m in read_metadata(train_metadata, classes=shapes.SHAPES)}

    def oracle_rewards(umm, images, prompts, args):
        missing = sorted({p for p in prompts if p not in by_prompt})
        if missing:
            raise InputError(f"no metadata for prompt {missing[0]!r} in {train_metadata}")
        return torch.tensor(
            [float(shapes.oracle(im, by_prompt[p])[0]) for im, p in zip(images, prompts)]
        )

    return oracle_rewards


def cmd_oracle_train(args, gvu_argv) -> None:
    """oracle-train: gvu.py unchanged except that the reward is the pixel oracle's verdict (1 or 0).
    Same RL, a perfect judge: the gap to GvU separates "the reward is weak" from "the RL cannot
    learn this". --dynamic-sampling N attaches DAPO's dynamic sampling as gvu_step's sampler."""
    if args.dynamic_sampling < 0:
        raise GenEvalError(
            f"--dynamic-sampling must be >= 0 (0 = off; got {args.dynamic_sampling})"
        )
    sampler = dynamic_sampler(args.dynamic_sampling) if args.dynamic_sampling else None
    gvu.main(gvu_argv, oracle_reward_fn(args.train_metadata), sampler or gvu.sample_and_reward)


# ---------------------------------------------------------------- where: can the LM read positions?


def add_cell_embedding(umm, scale, seed=1234):
    """Hand the LM where each image code sits: a fixed random row embedding + column embedding
    (norm about `scale`) added to each code's input embedding, through a forward hook on the LM's
    input embeddings."""
    g, d = umm.grid[0], umm.lm.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    rows, cols = torch.randn(g, d, generator=gen), torch.randn(g, d, generator=gen)
    # (h*w, D), row-major cells
    table = (rows[:, None] + cols[None]).reshape(g * g, d) * scale / (2 * d) ** 0.5

    # inputs[0]: ids (B, T); each run of image ids is one image, cell 0 first
    def hook(module, inputs, embeds):
        img = inputs[0] >= umm.image_offset
        seen = img.long().cumsum(1)
        # image ids before this image
        start = torch.where(~img, seen, torch.zeros_like(seen)).cummax(1).values
        cell = (seen - start - 1).clamp(0, g * g - 1)
        return embeds + table.to(embeds.dtype)[cell] * img[..., None]

    return umm.lm.get_input_embeddings().register_forward_hook(hook)


def region_line(rng):
    """'a photo of a red circle on the left': one object in one half (a caption family only this
    probe uses)."""
    req = shapes.item(
        str(rng.choice(shapes.SHAPES)),
        color=str(rng.choice(list(shapes.COLORS))),
        region=str(rng.choice(shapes.REGIONS)),
    )
    return shapes.make_line("color_spatial_attr", [req])


@torch.no_grad()
def region_direction(umm, rng, others, n=120):
    """Mean over n held-out scenes of p(true half) / (p(true half) + p(opposite half)) for the
    word after 'a photo of a red circle on the', each scene with one of `others` extra objects of
    other shapes (0.5: blind)."""
    words = list(shapes.REGIONS)
    ids = [umm.tokenizer.convert_tokens_to_ids(w) for w in words]
    umm.set_generation_mode("text")
    out = []
    for _ in range(n):
        m = region_line(rng)
        req = m["include"][0]
        image = shapes.render(
            shapes.sample_scene(m, rng, extra=int(rng.choice(others))), jitter=1, rng=rng
        )
        text = (
            umm.caption_prompt(image, make.INSTRUCTION)
            + f"a photo of a {req['color']} {req['class']} on the"
        )
        x = torch.tensor([umm.tokenizer(text, add_special_tokens=False).input_ids])
        p = torch.softmax(umm.logits(umm.hidden_states(x, torch.ones_like(x))[:, -1]), -1)[0, ids]
        t = words.index(req["region"])
        out.append((p[t] / (p[t] + p[words.index(shapes.OPPOSITE[req["region"]])])).item())
    return float(np.mean(out))


def cmd_where(args) -> None:
    """where: fine-tune a copy of the LM (never saved) on one-object region captions, with
    `--others` extra objects in each training scene, then read the region word with no other object
    and with 1-2 others. Alone, the LM only has to find the one object; among others it must find
    the one the caption names."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    umm = TinyUMM.from_pretrained(args.model)
    if args.cell_embedding:
        add_cell_embedding(umm, args.cell_embedding)
    rng = np.random.default_rng(args.seed)
    params = list(umm.lm.parameters())
    umm.lm.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, args.lr, total_steps=max(1, args.steps), pct_start=0.05
    )
    for step in range(args.steps):
        i2t = make.i2t_batch(
            umm, [region_line(rng) for _ in range(args.batch)], rng, False, extras=args.others
        )
        logp, n = make.lm_loss(umm, [(ctx + ans, len(ctx)) for ctx, ans, _ in i2t])
        loss = -logp.sum() / n.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"where step {step:4d}  caption nll {loss.item():.4f}", flush=True)
    umm.lm.eval().requires_grad_(False)
    # held-out scenes, the same for every variant of a seed
    test = np.random.default_rng(10_000 + args.seed)
    alone = region_direction(umm, test, [0], args.scenes)
    among = region_direction(umm, test, [1, 2], args.scenes)
    print(
        f"where: right half named {alone:.3f} alone, {among:.3f} among 1-2 others (0.5: blind; "
        f"steps {args.steps}, others {args.others}, cell embedding {args.cell_embedding})"
    )


# ------------------------------------------------------------- what the reward sees, token by token


def word_classes(shapes_world):
    """(class, interchangeable words) for prompt edits: the shapes world's own lists
    (world/shapes.py), else GenEval's colours and relations. Counts stay plural (two..seven) and
    shapes keep their number, so one word changes."""
    colours = list(shapes.COLORS) if shapes_world else GENEVAL_COLORS
    nouns = (
        [("shape", list(shapes.SHAPES)), ("shape", list(shapes.PLURALS.values()))]
        if shapes_world
        else []
    )
    return (
        [("colour", colours), ("count", list(shapes.NUMBERS[2:]))]
        + nouns
        + [
            ("relation", list(shapes.RELATIONS)),
            ("region", list(shapes.REGIONS)),
            ("size", list(shapes.SIZES)),
        ]
    )


def word_edits(prompt, classes):
    """Every prompt that differs from `prompt` in one attribute word (or relation phrase):
    [(class, edited)]. A region ("on the left") is told from a relation ("left of", "above") by the
    "the" before it; an article before the changed word follows it (a red / an orange)."""
    words, edits = prompt.split(), []
    for name, options in classes:
        for i in range(len(words)):
            for old in options:
                k = len(old.split())
                if words[i : i + k] != old.split():
                    continue
                after_the = i > 0 and words[i - 1] == "the"
                if name in ("relation", "region") and (name == "region") != after_the:
                    continue
                for new in options:
                    if new != old:
                        edited = words[:i] + new.split() + words[i + k :]
                        if i > 0 and edited[i - 1] in ("a", "an"):
                            edited[i - 1] = "an" if new[0] in "aeiou" else "a"
                        edits.append((name, " ".join(edited)))
    return edits


def edit_table(umm, images, prompts, instruction):
    """Per word class: how many (image, edit) pairs, mean reward for the image's own prompt and
    for the edited one, the mean drop, and how often the edit lowers the reward. images[i] is
    scored against prompts[i] and its edits."""
    shapes_world = all(w in shapes.PROMPT_WORDS for p in prompts for w in p.split())
    classes, by_class = word_classes(shapes_world), {}
    for image, prompt in zip(images, prompts):
        edits = word_edits(prompt, classes)
        texts = [prompt] + [e for _, e in edits]
        with torch.no_grad():
            r = gvu.intrinsic_reward(
                *gvu.caption_token_logprobs(umm, [image] * len(texts), texts, instruction)
            ).tolist()
        for (name, _), r_edit in zip(edits, r[1:]):
            by_class.setdefault(name, []).append((r[0], r_edit))
    return {
        name: {
            "edits": len(pairs),
            "reward": float(np.mean([a for a, _ in pairs])),
            "reward_edited": float(np.mean([b for _, b in pairs])),
            "drop": float(np.mean([a - b for a, b in pairs])),
            "lowered": float(np.mean([b < a for a, b in pairs])),
        }
        for name, pairs in by_class.items()
    }


def cmd_token_view(args) -> None:
    """token-view: images of a generate folder x their prompt's tokens, shaded by
    p(token | image, earlier tokens)."""
    if args.prompts < 1 or args.images < 1 or args.px < 16:
        raise GenEvalError("--prompts and --images must be >= 1 and --px >= 16")
    if not Path(args.out).resolve().parent.is_dir():
        raise GenEvalError(f"--out: folder {Path(args.out).parent} does not exist")
    samples = list(iter_samples(args.folder, classes=None))
    groups = {}
    for index, meta, path in samples:
        groups.setdefault(index, (meta, []))[1].append(path)
    if args.correct_only and (
        args.prompt
        or any(r["class"] not in shapes.SHAPES for m, _ in groups.values() for r in m["include"])
    ):
        raise GenEvalError(
            "--correct-only needs a shapes-world folder scored against its own prompts "
            "(no --prompt)"
        )
    n = min(args.images, *(len(paths) for _, paths in groups.values()))
    by_tag = {}
    for k in sorted(groups):
        by_tag.setdefault(groups[k][0]["tag"], []).append(k)
    turns = zip_longest(*by_tag.values())  # tags take turns
    shown = [k for turn in turns for k in turn if k is not None][: args.prompts]
    prompts = [args.prompt or groups[k][0]["prompt"] for k in shown for _ in range(n)]
    umm = load_model(args)
    try:
        runio.check_vocabulary(
            umm, sorted({args.prompt or m["prompt"] for m, _ in groups.values()})
        )
    except InputError as e:
        raise GenEvalError(str(e)) from None
    images = [load_image(p) for k in shown for p in groups[k][1][:n]]
    with torch.no_grad():
        token_logp, mask = gvu.caption_token_logprobs(umm, images, prompts, args.instruction)
    rewards = gvu.intrinsic_reward(token_logp, mask).tolist()
    loggers.save_grid(
        args.out,
        prompts,
        images,
        rewards,
        n,
        rows=len(shown),
        px=args.px,
        texts=[loggers.token_texts(umm.tokenizer, gvu.answer_ids(umm, [p])[0]) for p in prompts],
        token_logp=token_logp,
    )
    print(
        f"wrote {args.out}: {len(shown)} prompts x {n} images; "
        "tokens shaded white (p=1) to red (p=0), the least likely one framed"
    )
    if not args.edits:
        return
    pairs = [
        (load_image(p), args.prompt or meta["prompt"], meta)
        for meta, paths in groups.values()
        for p in paths
    ]
    if args.correct_only:
        pairs = [(im, p, meta) for im, p, meta in pairs if shapes.oracle(im, meta)[0]]
    table = edit_table(umm, [im for im, _, _ in pairs], [p for _, p, _ in pairs], args.instruction)
    print(
        f"\nreward when one word of the prompt changes ({len(pairs)} images"
        f"{', those the oracle marks correct' if args.correct_only else ''}):"
    )
    print(
        "| word class | edits | reward | reward, word changed | mean drop | edits that lower it |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in table.items():
        print(
            f"| {name} | {row['edits']} | {row['reward']:.3f} | {row['reward_edited']:.3f} "
            f"| {row['drop']:.3f} | {row['lowered']:.0%} |"
        )


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    au = sub.add_parser(
        "audit", help="within-group agreement of the intrinsic reward with a scorer, per tag"
    )
    add_model_flags(au, "--group-size", 8, "G: images per prompt, as in training")
    au.add_argument(
        "--scorer", choices=["geneval", "shapes"], default="shapes", help="who decides correctness"
    )
    au.add_argument(
        "--instruction", default="Describe the image in detail.", help="as gvu.py --instruction"
    )
    au.add_argument(
        "--end-of-turn",
        choices=["on", "off"],
        default="on",
        help="score the end-of-turn token too (gvu.py --score-end-of-turn); "
        "off: the paper's T_1..T_L",
    )
    add_detector_flags(au)
    au.set_defaults(func=cmd_audit)
    cv = sub.add_parser("curve", help="plot reward and KL vs step from gvu.py logs (matplotlib)")
    cv.add_argument("logs", nargs="+", help="log.jsonl files, optionally LABEL=path")
    cv.add_argument("--out", default="reward_curve.png", help="PNG to write")
    cv.add_argument("--smooth", type=int, default=10, help="running-mean window in steps")
    cv.set_defaults(func=cmd_curve)
    fl = sub.add_parser(
        "failures", help="per tag, wrong images with a named object missing vs an attribute wrong"
    )
    fl.add_argument(
        "folders", nargs="+", help="folders scored by eval_geneval.py score (with results.jsonl)"
    )
    fl.set_defaults(func=cmd_failures)
    gr = sub.add_parser(
        "grid", help="before/after sample grid from two generate folders (same prompts and seeds)"
    )
    gr.add_argument("run_a", help="generate folder of the base model")
    gr.add_argument("run_b", help="generate folder of the trained model")
    gr.add_argument("--out", default="before_after.png", help="PNG to write")
    gr.add_argument("--prompts", type=int, default=8, help="rows: prompts, spread over the file")
    gr.add_argument("--images", type=int, default=4, help="images per prompt and side")
    gr.add_argument(
        "--scorer", choices=["shapes"], default="shapes", help="draws a green/red frame per image"
    )
    gr.set_defaults(func=cmd_grid)
    ot = sub.add_parser(
        "oracle-train",
        help="run gvu.py with the pixel oracle as the reward (upper bound); "
        "other flags go to gvu.py",
    )
    ot.add_argument(
        "--train-metadata", default="prompts/train.jsonl", help="metadata of every training prompt"
    )
    ot.add_argument(
        "--dynamic-sampling",
        type=int,
        default=0,
        help="DAPO's dynamic sampling: up to N more batches of fresh prompts a step (0 = off)",
    )
    ot.set_defaults(func=cmd_oracle_train)
    tv = sub.add_parser(
        "token-view",
        help="a generate folder's images with the prompt's tokens shaded by the "
        "judge's probability; --edits: reward drop per changed word class",
    )
    tv.add_argument(
        "folder",
        help="an eval_geneval.py generate folder (00000/metadata.jsonl, 00000/samples/0000.png)",
    )
    # the judge: any model gvu.py loads, as generate
    add_load_flags(tv, model_default="checkpoints/tiny-umm")
    tv.add_argument(
        "--instruction", default="Describe the image in detail.", help="as gvu.py --instruction"
    )
    tv.add_argument("--prompt", help="score every image against this prompt instead of its own")
    tv.add_argument(
        "--prompts",
        type=int,
        default=6,
        help="rows: N prompts, the tags taking turns (the first "
        "prompt of each tag, then the second, ...)",
    )
    tv.add_argument("--images", type=int, default=4, help="images per prompt")
    tv.add_argument("--px", type=int, default=96, help="image size in the grid")
    tv.add_argument(
        "--edits",
        action="store_true",
        help="also score every image of the folder against its prompt with one "
        "colour / count / shape / relation / region / size word changed; print the mean drop",
    )
    tv.add_argument(
        "--correct-only",
        action="store_true",
        help="--edits on the images the shapes oracle marks correct",
    )
    tv.add_argument("--out", default="token_view.png", help="PNG to write")
    tv.set_defaults(func=cmd_token_view)
    wh = sub.add_parser(
        "where",
        help="can the LM learn to read where an object is? (fine-tunes a copy, saves nothing)",
    )
    wh.add_argument("--model", default="checkpoints/tiny-umm", help="a tiny UMM folder")
    wh.add_argument(
        "--steps", type=int, default=400, help="fine-tuning steps (0: read the model as it is)"
    )
    wh.add_argument("--batch", type=int, default=64, help="captions per step")
    wh.add_argument(
        "--lr",
        type=float,
        default=2e-3,
        help="peak learning rate (one-cycle, as world/make_tiny_umm.py)",
    )
    wh.add_argument(
        "--others",
        type=int,
        nargs="+",
        default=[0, 0, 1, 2],
        help="extra objects per training scene, drawn from this list "
        "(world/make_tiny_umm.py's draw by default)",
    )
    wh.add_argument(
        "--cell-embedding",
        type=float,
        default=0.0,
        help="norm of a fixed row + column embedding added to each image code (0: none)",
    )
    wh.add_argument(
        "--scenes", type=int, default=120, help="held-out scenes read, alone and among others"
    )
    wh.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the fine-tuning data; held-out scenes use 10000 + seed",
    )
    wh.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    wh.set_defaults(func=cmd_where)
    return p


def main(argv=None) -> int:
    """Entry point; oracle-train hands unknown flags to gvu.py; errors are one line."""
    args, rest = build_parser().parse_known_args(argv)
    if rest and args.command != "oracle-train":
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        args.func(args, rest) if args.command == "oracle-train" else args.func(args)
    except GenEvalError as e:
        sys.exit(f"error: {e}")
    return 0


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- DAPO's dynamic
# sampling


def reserve_batches(prompts, step, n_batches, args):
    """The fresh prompts of `step`: n_batches of B from a second stream, shuffled with other seeds
    (a CPU generator keeps a seed's low 32 bits, so the offset must change them). They are a
    function of step (resume-safe), and the main stream is the same with or without them."""
    B = args.batch_prompts
    return [
        gvu.prompt_batch(prompts, step * n_batches + k, B, args.seed + 0x5BD1E995)
        for k in range(n_batches)
    ]


def left_pad(tensors, value):
    """Left-pad (n_i, P_i) tensors to the longest P, as the rollout pads its prefixes."""
    P = max(t.shape[1] for t in tensors)
    return [F.pad(t, (P - t.shape[1], 0), value=value) for t in tensors]


def dynamic_sampler(n_batches):
    """DAPO's dynamic sampling as gvu_step's sampler: roll out the step's batch, then up to
    n_batches more batches of fresh prompts while fewer than B groups have rewards that differ
    (a group without spread has advantage 0 and teaches nothing). Keeps the first B groups with
    spread, in order, filled up with groups without spread (the first batch's first) when the
    batches run out, so B stays fixed. Logs `rollout_batches`. torchrun: each rank refills its own
    B/W groups from its slice of the reserve, with its own sampling streams."""

    read = {}  # the prompt file, read once (the reserve is a stream over all its prompts)

    def sample(umm, policy, batch, step, args, reward_fn, decode=True, lap=None, rank=0):
        if args.prompts not in read:
            read[args.prompts] = runio.read_prompts(args.prompts)[0]
        reserve = reserve_batches(read[args.prompts], step, n_batches, args)
        if torch.distributed.is_initialized():  # this rank's slice of each reserve batch
            n = len(batch)
            reserve = [b[rank * n : (rank + 1) * n] for b in reserve]
        B, G, outs = len(batch), args.group_size, []
        for stream, prompts_r in enumerate([batch, *reserve]):
            out = gvu.sample_and_reward(
                umm, policy, prompts_r, step, args, reward_fn, decode, lap, rank, stream
            )
            outs.append(out)
            if not torch.isfinite(out["rewards"]).all():  # gvu_step stops on it; never swapped out
                return dict(out, stats=dict(rollout_batches=len(outs)))
            spread = torch.cat([o["rewards"].view(-1, G).std(1).cpu() > 0 for o in outs])
            if spread.sum() >= B:
                break
        if len(outs) == 1:
            return dict(outs[0], stats=dict(rollout_batches=1))
        # the first B groups with spread, then those without, in rollout order
        keep = torch.cat([spread.nonzero()[:, 0], (~spread).nonzero()[:, 0]])[:B].sort().values
        rows = (keep[:, None] * G + torch.arange(G)).view(-1)  # (B*G,) their samples
        pads = dict(prefix_ids=umm.tokenizer.pad_token_id, prefix_mask=0)  # left-padded prefixes
        ros = [o["rollout"] for o in outs]
        ro = {}
        for k in ros[0]:
            parts = [r[k] for r in ros]
            ro[k] = torch.cat(left_pad(parts, pads[k]) if k in pads else parts)[rows]
        images = None
        if outs[0]["images"] is not None:
            images = [im for o in outs for im in o["images"]]
            images = [images[i] for i in rows.tolist()]
        token_logp = None
        if outs[0]["token_logp"] is not None:  # each batch's (N, L_r), right-padded to the longest
            terms = [t for o in outs for t in o["token_logp"]]
            token_logp = torch.nn.utils.rnn.pad_sequence(terms, batch_first=True)[rows]
        groups = [p for o in outs for p in o["batch"]]
        return dict(
            batch=[groups[i] for i in keep.tolist()],
            rollout=ro,
            images=images,
            rewards=torch.cat([o["rewards"] for o in outs])[rows],
            token_logp=token_logp,
            stats=dict(rollout_batches=len(outs)),
        )

    return sample
