"""Figures and experiments around a GvU run: what the README's pictures and tables are made of.

    audit         per tag, does the model's own intrinsic reward rank its images like the scorer?
    curve         reward (and KL) vs step from gvu.py log.jsonl files
    grid          the same prompts and seeds from two `eval_geneval.py generate` folders side by side
    oracle-train  gvu.py with the shapes world's pixel oracle as the reward (gvu_step's reward_fn):
                  same RL, a perfect judge, meant as an upper bound for the intrinsic reward

    python experiments.py audit --model checkpoints/tiny-umm --metadata prompts/shapes_geneval.jsonl --out runs/audit_base
    python experiments.py curve "GvU=runs/A/log.jsonl" --out assets/reward_curve.png --smooth 20
    python experiments.py grid runs/eval_base/geneval runs/eval_A/geneval --out assets/before_after.png
    python experiments.py oracle-train --out runs/O          # other flags go to gvu.py
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import gvu
import shapes
from adapters import InputError
from eval_geneval import (GenEvalError, add_detector_flags, add_model_flags, iter_samples, load_image, load_model,
                          make_scorer, read_metadata, sample_groups, scorer_classes)


# --------------------------------------------------------------------------- reward audit

def group_auc(rewards, correct):
    """P(reward of a correct image > reward of a wrong one) within one group, ties count half; None if undefined."""
    pos = [r for r, c in zip(rewards, correct) if c]
    neg = [r for r, c in zip(rewards, correct) if not c]
    if not pos or not neg:
        return None
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def audit_table(rows):
    """Per tag: within-group AUC, share of groups the scorer cannot split, mean reward of correct vs wrong."""
    by_tag = {}
    for r in rows:
        by_tag.setdefault(r["tag"], []).append(r)
    out = {}
    for tag, groups in sorted(by_tag.items()):
        aucs = [a for g in groups if (a := group_auc(g["rewards"], g["correct"])) is not None]
        good = [x for g in groups for x, c in zip(g["rewards"], g["correct"]) if c]
        bad = [x for g in groups for x, c in zip(g["rewards"], g["correct"]) if not c]
        out[tag] = {"groups": len(groups), "auc": float(np.mean(aucs)) if aucs else None,
                    "no_difference": 1 - len(aucs) / len(groups),
                    "reward_correct": float(np.mean(good)) if good else None,
                    "reward_wrong": float(np.mean(bad)) if bad else None,
                    "accuracy": len(good) / (len(good) + len(bad))}
    return out


def cmd_audit(args) -> None:
    """audit: does the model's own reward rank its images the way the scorer does?"""
    classes = scorer_classes(args.scorer)
    metas = read_metadata(args.metadata, classes)
    umm, scorer, rows = load_model(args), make_scorer(args), []
    for index, meta, images in sample_groups(umm, metas, args.group_size, args):
        with torch.no_grad():
            rewards = gvu.intrinsic_reward(*gvu.caption_token_logprobs(umm, images, [meta["prompt"]] * len(images),
                                                                        args.instruction,
                                                                        end_of_turn=args.end_of_turn == "on"))
        verdicts = [scorer(im, meta) for im in images]
        rows.append({"index": index, "tag": meta["tag"], "prompt": meta["prompt"], "rewards": rewards.tolist(),
                     "correct": [bool(c) for c, _ in verdicts]})
    table = audit_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit_groups.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "audit.json").write_text(json.dumps(table, indent=2) + "\n")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    md = ["| tag | groups | accuracy | within-group AUC | groups with no difference | reward correct | reward wrong |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {t} | {v['groups']} | {v['accuracy']:.3f} | {fmt(v['auc'])} | {v['no_difference']:.2f} | "
           f"{fmt(v['reward_correct'])} | {fmt(v['reward_wrong'])} |" for t, v in table.items()]
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
        smooth = lambda xs, k=args.smooth: [float(np.mean(xs[max(0, i - k + 1):i + 1])) for i in range(len(xs))]
        ax_r.plot(steps, smooth([r["reward_mean"] for r in rows]), label=label)
        ax_k.plot(steps, smooth([r["kl"] for r in rows]), label=label)
    ax_r.set(xlabel="step", ylabel=f"mean reward ({args.smooth}-step running mean)")
    ax_k.set(xlabel="step", ylabel="KL to the base (k3, per token)")
    ax_r.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


def cmd_grid(args) -> None:
    """grid: the same prompts and seeds from two generate folders side by side, with the scorer's verdicts."""
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
                draw.rectangle([x + 1, y + 11, x + px - 2, y + px - 2], outline="green" if ok else "red", width=2)
    grid.save(args.out)
    print(f"wrote {args.out}: left {args.run_a}, right {args.run_b}; green = correct, red = wrong")

# --------------------------------------------------------------------------- oracle-reward upper bound

def oracle_reward_fn(train_metadata):
    """A gvu reward_fn: the pixel oracle's verdict (1 or 0) for each image, from the prompt's metadata."""
    by_prompt = {m["prompt"]: m for m in read_metadata(train_metadata, classes=shapes.SHAPES)}

    def oracle_rewards(umm, images, prompts, args):
        missing = sorted({p for p in prompts if p not in by_prompt})
        if missing:
            raise InputError(f"no metadata for prompt {missing[0]!r} in {train_metadata}")
        return torch.tensor([float(shapes.oracle(im, by_prompt[p])[0]) for im, p in zip(images, prompts)])
    return oracle_rewards


def cmd_oracle_train(args, gvu_argv) -> None:
    """oracle-train: gvu.py unchanged except that the reward is the pixel oracle's verdict (1 or 0).
    Same RL, a perfect judge: the gap to GvU separates "the reward is weak" from "the RL cannot learn this"."""
    gvu.main(gvu_argv, reward_fn=oracle_reward_fn(args.train_metadata))


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    au = sub.add_parser("audit", help="within-group agreement of the intrinsic reward with a scorer, per tag")
    add_model_flags(au, "--group-size", 8, "G: images per prompt, as in training")
    au.add_argument("--scorer", choices=["geneval", "shapes"], default="shapes", help="who decides correctness")
    au.add_argument("--instruction", default="Describe the image in detail.", help="as gvu.py --instruction")
    au.add_argument("--end-of-turn", choices=["on", "off"], default="on",
                    help="score the end-of-turn token too (gvu.py --score-end-of-turn); off: the paper's T_1..T_L")
    add_detector_flags(au)
    au.set_defaults(func=cmd_audit)
    cv = sub.add_parser("curve", help="plot reward and KL vs step from gvu.py logs (matplotlib)")
    cv.add_argument("logs", nargs="+", help="log.jsonl files, optionally LABEL=path")
    cv.add_argument("--out", default="reward_curve.png", help="PNG to write")
    cv.add_argument("--smooth", type=int, default=10, help="running-mean window in steps")
    cv.set_defaults(func=cmd_curve)
    gr = sub.add_parser("grid", help="before/after sample grid from two generate folders (same prompts and seeds)")
    gr.add_argument("run_a", help="generate folder of the base model")
    gr.add_argument("run_b", help="generate folder of the trained model")
    gr.add_argument("--out", default="before_after.png", help="PNG to write")
    gr.add_argument("--prompts", type=int, default=8, help="rows: prompts, spread over the file")
    gr.add_argument("--images", type=int, default=4, help="images per prompt and side")
    gr.add_argument("--scorer", choices=["shapes"], default="shapes", help="draws a green/red frame per image")
    gr.set_defaults(func=cmd_grid)
    ot = sub.add_parser("oracle-train", help="run gvu.py with the pixel oracle as the reward (upper bound); "
                                             "other flags go to gvu.py")
    ot.add_argument("--train-metadata", default="prompts/train.jsonl", help="metadata of every training prompt")
    ot.set_defaults(func=cmd_oracle_train)
    return p


def main(argv=None) -> int:
    """Entry point; oracle-train passes the flags it does not know to gvu.py. Errors are one line."""
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
