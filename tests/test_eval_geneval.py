"""Tests for eval_geneval.py: summaries, folder I/O, CLI errors, compare (with bootstrap intervals
over prompts), prompts, generate, and `score` end to end on tiny random Mask2Former / CLIP models
built in-process (no downloads). The rule engine it scores with is test_geneval_rules.py's."""

import json
import os
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

import eval_geneval as E
import gvu
from models import adapters
from standins import TINY_PROMPTS, eval_error, meta, read_jsonl, run_main, write_lines


# --- crops and summaries --------------------------------------------------------------------------
def test_crop_on_grey_keeps_mask_pixels_and_greys_the_rest():
    """Colour crops paste the mask onto #999999 and crop to the box."""
    image = Image.new("RGB", (4, 4), "red")
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = True
    crop = E.crop_on_grey(image, mask, (1, 1, 3, 3))
    assert (
        crop.size == (2, 2)
        and crop.getpixel((0, 0)) == (255, 0, 0)
        and crop.getpixel((1, 1)) == (153,) * 3
    )


def test_summary_overall_is_the_unweighted_mean_of_tag_means():
    """overall = mean over tags (not images); prompts_any_correct counts prompts with >= 1 hit."""
    rows = [
        {"index": 0, "tag": "a", "correct": True},
        {"index": 0, "tag": "a", "correct": False},
        {"index": 1, "tag": "b", "correct": False},
        {"index": 1, "tag": "b", "correct": False},
        {"index": 2, "tag": "b", "correct": True},
        {"index": 2, "tag": "b", "correct": True},
    ]
    s = E.summarize(rows)
    assert s["tags"]["a"]["accuracy"] == 0.5 and s["tags"]["b"]["accuracy"] == 0.5
    assert s["overall"] == 0.5 and s["prompts_any_correct"] == pytest.approx(2 / 3)
    assert "| **overall** (mean of tag means) | 6 | 0.5000 |" in E.format_table(s)


# --- metadata, folders, CLI errors ----------------------------------------------------------------
def test_read_metadata_rejects_bad_lines_with_a_one_line_error(tmp_path):
    """Unknown tags, unknown classes and broken JSON name the file and line."""
    good = meta("colors", [{"class": "car", "count": 1, "color": "red"}])
    assert E.read_metadata(write_lines(tmp_path / "ok.jsonl", [good, ""])) == [good]
    for bad, msg in [
        (meta("nope", [{"class": "car", "count": 1}]), "unknown tag 'nope'"),
        (meta("colors", [{"class": "unicorn", "count": 1}]), "unknown class 'unicorn'"),
        (meta("colors", [{"class": "car", "count": 1, "color": "teal"}]), "unknown color"),
        ("{not json", "invalid JSON"),
    ]:
        with pytest.raises(E.GenEvalError, match=msg) as exc:
            E.read_metadata(write_lines(tmp_path / "bad.jsonl", [good, bad]))
        assert "bad.jsonl:2" in str(exc.value)


def test_folder_roundtrip_and_cli_errors_exit_with_one_line(tmp_path):
    """write_prompt_folder/iter_samples round-trip; missing folder, count mismatch, bad image fail
    cleanly."""
    metas = [meta("single_object", [{"class": "dog", "count": 1}], prompt="a photo of a dog")]
    E.write_prompt_folder(tmp_path / "run", 0, metas[0], [Image.new("RGB", (8, 8))] * 2)
    assert [(i, p.name) for i, _, p in E.iter_samples(tmp_path / "run", metas)] == [
        (0, "0000.png"),
        (0, "0001.png"),
    ]
    assert "image folder not found" in eval_error(["score", str(tmp_path / "missing")])
    two = write_lines(tmp_path / "two.jsonl", metas * 2)
    assert "00001 is missing (the metadata file has 2 prompts)" in eval_error(
        ["score", str(tmp_path / "run"), "--metadata", str(two)]
    )
    (tmp_path / "run" / "00000" / "samples" / "0001.png").write_text("not a png")
    assert "cannot read image" in eval_error(
        ["score", str(tmp_path / "run"), "--detector", "never/loaded"]
    )
    with pytest.raises(E.GenEvalError, match="cannot read image"):
        E.load_image(tmp_path / "run" / "00000" / "samples" / "0001.png")


# --- compare: one or several runs against a base --------------------------------------------------
def test_compare_prints_per_tag_deltas(tmp_path, capsys):
    """compare shows base, trained and delta per tag, from files or score folders."""
    a = {
        "tags": {
            "counting": {"images": 4, "accuracy": 0.25},
            "colors": {"images": 4, "accuracy": 0.5},
        },
        "overall": 0.25,
        "prompts_any_correct": 0.5,
    }
    b = {
        "tags": {
            "counting": {"images": 4, "accuracy": 0.75},
            "colors": {"images": 4, "accuracy": 1.0},
        },
        "overall": 0.875,
        "prompts_any_correct": 1.0,
    }
    (tmp_path / "b").mkdir()
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b" / "summary.json").write_text(json.dumps(b))
    E.main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert (
        "| counting | 0.2500 | 0.7500 | +0.5000 |" in out
        and "| colors | 0.5000 | 1.0000 | +0.5000 |" in out
    )


def write_results(folder, per_prompt):
    """A score output folder: results.jsonl with one row per image; per_prompt: {(tag, index):
    [correct, ...]}."""
    folder.mkdir(parents=True)
    rows = [
        {"index": i, "sample": f"{k:04d}", "tag": t, "prompt": f"p{i}", "correct": c, "reason": ""}
        for (t, i), cs in per_prompt.items()
        for k, c in enumerate(cs)
    ]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_a_constant_per_prompt_gain_has_a_zero_width_interval_at_that_gain():
    """If every prompt gains exactly the same, every resample does too: the interval is that
    gain."""
    base = {"colors": {i: 0.25 for i in range(10)}}
    run = {"colors": {i: 0.75 for i in range(10)}}
    draws = E.bootstrap_deltas(base, [run], n_boot=200)
    assert np.allclose(draws["colors"], 0.5) and np.allclose(draws["overall"], 0.5)


def test_interval_width_matches_the_standard_error_of_the_mean_delta():
    """With many prompts the 95% percentile interval is about mean ± 1.96 * sd / sqrt(P) (normal
    approximation)."""
    rng = np.random.default_rng(1)
    P = 400
    b, r = rng.random(P), rng.random(P)
    draws = E.bootstrap_deltas(
        {"t": dict(enumerate(b))}, [{"t": dict(enumerate(r))}], n_boot=4000, seed=3
    )
    d = r - b
    se = statistics.pstdev(d.tolist()) / P**0.5
    lo, hi = np.percentile(draws["t"], [2.5, 97.5])
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(d.mean(), abs=0.2 * se)


def test_bootstrap_is_paired_so_an_unchanged_tag_has_no_spread():
    """The same prompts are drawn for base and runs: a tag the runs did not change has delta 0 in
    every draw."""
    base = {"a": {0: 0.0, 1: 1.0, 2: 0.5}, "b": {0: 0.0, 1: 1.0}}
    run = {"a": {0: 0.0, 1: 1.0, 2: 0.5}, "b": {0: 1.0, 1: 1.0}}
    draws = E.bootstrap_deltas(base, [run], n_boot=300)
    assert np.all(draws["a"] == 0) and draws["b"].std() > 0
    assert np.allclose(draws["overall"], (draws["a"] + draws["b"]) / 2)


def test_overall_is_the_mean_of_tag_deltas_and_runs_are_averaged_per_prompt():
    """The delta of several runs is the mean over runs; overall is the mean of the tag deltas
    (GenEval's overall)."""
    base = {"a": {0: 0.0, 1: 0.0}, "b": {0: 0.5}}
    runs = [{"a": {0: 1.0, 1: 0.0}, "b": {0: 0.5}}, {"a": {0: 0.0, 1: 0.0}, "b": {0: 1.0}}]
    draws = E.bootstrap_deltas(base, runs, n_boot=50)
    # per-prompt deltas 0.5 and 0, averaged over 2 prompts
    assert set(np.round(draws["a"], 6)) <= {0.0, 0.25, 0.5}
    assert np.allclose(draws["b"], 0.25)


def test_compare_cli_prints_mean_std_across_runs_and_the_interval(tmp_path, capsys):
    """compare BASE RUN1 RUN2 on score folders: per tag base, mean ± std over runs (hand values),
    delta, interval."""
    base = write_results(
        tmp_path / "base", {("colors", 0): [0, 0], ("colors", 1): [1, 0], ("counting", 2): [0, 0]}
    )
    r1 = write_results(
        tmp_path / "r1", {("colors", 0): [1, 1], ("colors", 1): [1, 0], ("counting", 2): [1, 0]}
    )
    r2 = write_results(
        tmp_path / "r2", {("colors", 0): [1, 0], ("colors", 1): [1, 0], ("counting", 2): [1, 1]}
    )
    E.main(["compare", str(base), str(r1), str(r2), "--bootstrap", "500"])
    out = capsys.readouterr().out
    # colors: base (0 + 0.5) / 2 = 0.25; runs 0.75 and 0.5 -> mean 0.625, sample std 0.1768; delta
    # +0.375
    assert "| colors | 2 | 0.2500 | 0.6250 ± 0.1768 | +0.3750 |" in out
    # counting: one prompt, base 0, runs 0.5 and 1.0: a single prompt gives a zero-width interval at
    # +0.75
    assert "| counting | 1 | 0.0000 | 0.7500 ± 0.3536 | +0.7500 | [+0.7500, +0.7500] |" in out
    assert "| **overall** | 3 | 0.1250 | 0.6875 ± 0.0884 | +0.5625 (+450.0%) |" in out


def test_compare_of_several_runs_without_results_is_a_one_line_error(tmp_path):
    """Several runs need per-prompt results for the statistics; bare summaries are refused with one
    line."""
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(
            json.dumps({"tags": {}, "overall": 0, "prompts_any_correct": 0})
        )
    with pytest.raises(SystemExit) as e:
        E.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")])
    assert "results.jsonl" in str(e.value) and "\n" not in str(e.value)


# --- prompts --------------------------------------------------------------------------------------
def test_prompt_phrasing_follows_geneval():
    """Generated metadata uses GenEval's phrasing: articles, naive plurals, position order."""
    prompts = {
        E.make_meta(t, i)["prompt"]: E.make_meta(t, i)
        for t in ("single_object", "counting", "colors", "position")
        for i in range(7000)
        if i < E.math.prod(E.TAG_SPACES[t])
    }
    assert prompts["a photo of two clocks"]["exclude"] == [{"class": "clock", "count": 3}]
    assert "a photo of four benchs" in prompts and "a photo of three buses" in prompts
    assert "a photo of an orange cow" in prompts and "a photo of a blue umbrella" in prompts
    assert prompts["a photo of a dog right of a teddy bear"]["include"] == [
        {"class": "teddy bear", "count": 1},
        {"class": "dog", "count": 1, "position": ["right of", 0]},
    ]


def test_prompts_are_deterministic_and_skip_excluded_texts(tmp_path):
    """Same seed -> same file; prompts in the --exclude metadata never appear (all single objects
    here)."""
    held_out = [E.make_meta("single_object", i) for i in range(80)] + [
        E.make_meta("counting", i) for i in range(100)
    ]
    ex = write_lines(tmp_path / "eval.jsonl", held_out)
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        E.main(
            [
                "prompts",
                "--seed",
                str(seed),
                "--n",
                "600",
                "--exclude",
                str(ex),
                "--out",
                str(tmp_path / name),
            ]
        )
    a = (tmp_path / "a.jsonl").read_text()
    assert a == (tmp_path / "b.jsonl").read_text() and a != (tmp_path / "c.jsonl").read_text()
    metas = [json.loads(line) for line in a.splitlines()]
    texts = (tmp_path / "a.txt").read_text().splitlines()
    assert len(metas) == 600 and len(set(texts)) == 600 and texts == [m["prompt"] for m in metas]
    assert not set(texts) & {m["prompt"] for m in held_out}
    assert {m["tag"] for m in metas} == set(E.GENEVAL_TAGS) - {"single_object"}
    assert all(E.validate_meta(m, "gen") for m in metas)


# --- score end to end on tiny models --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Save a tiny random 80-class Mask2Former (biased to predict 'dog') and a tiny CLIP; return
    their dirs."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    swin = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = Mask2FormerConfig(
        backbone_config=swin,
        num_queries=6,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=64,
        encoder_feedforward_dim=64,
        num_labels=80,
        common_stride=4,
    )
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():  # every query says "dog" with probability ~1, so detections pass 0.3
        model.class_predictor.bias[E.GENEVAL_CLASSES.index("dog")] = 30.0
    model.save_pretrained(root / "det")
    det_proc = Mask2FormerImageProcessor(
        size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32
    )
    det_proc.save_pretrained(root / "det")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz-":
        vocab |= {ch: len(vocab), ch + "</w>": len(vocab) + 1}
    (root / "clip").mkdir()
    (root / "clip" / "vocab.json").write_text(json.dumps(vocab))
    (root / "clip" / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(
        vocab_file=str(root / "clip" / "vocab.json"), merges_file=str(root / "clip" / "merges.txt")
    )
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(root / "clip")
    image_proc = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(root / "clip")
    return str(root / "det"), str(root / "clip")


def test_detect_boxes_are_mask_extents_and_scores_are_probabilities(tiny_models):
    """Detections carry COCO names, masks at image size, boxes = mask extents (x2 exclusive), score
    <= 1."""
    scorer = E.GenEvalScorer(*tiny_models, "cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8))
    dets = scorer.detect(image)
    assert dets and {d.cls for d in dets} == {"dog"} and len(dets) <= 6
    for d in dets:
        ys, xs = np.nonzero(d.mask)
        assert d.mask.shape == (60, 80) and 0 < d.score <= 1
        assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert set(scorer.colors(image, dets, "dog")) <= set(E.COLORS)


def test_score_cli_writes_results_and_summaries_on_tiny_models(tmp_path, tiny_models, capsys):
    """`score` over 2 prompts x 2 images writes 4 result rows, summary.json/md with per-tag
    means."""
    metas = [
        meta(
            "colors", [{"class": "dog", "count": 1, "color": "red"}], prompt="a photo of a red dog"
        ),
        meta(
            "size_spatial_attr",
            [
                {"class": "dog", "count": 1, "size": "larger", "region": "left"},
                {"class": "cat", "count": 1, "size": "smaller", "region": "right"},
            ],
            prompt="a photo of a larger dog on the left and a smaller cat on the right",
        ),
    ]
    rng = np.random.default_rng(1)
    for i, m in enumerate(metas):
        E.write_prompt_folder(
            tmp_path / "run",
            i,
            m,
            [Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)) for _ in range(2)],
        )
    md = write_lines(tmp_path / "meta.jsonl", metas)
    det_dir, clip_dir = tiny_models
    assert (
        E.main(
            [
                "score",
                str(tmp_path / "run"),
                "--metadata",
                str(md),
                "--detector",
                det_dir,
                "--clip",
                clip_dir,
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "scores"),
            ]
        )
        == 0
    )
    rows = [
        json.loads(line)
        for line in (tmp_path / "scores" / "results.jsonl").read_text().splitlines()
    ]
    assert [(r["index"], r["sample"], r["tag"]) for r in rows] == [
        (0, "0000", "colors"),
        (0, "0001", "colors"),
        (1, "0000", "size_spatial_attr"),
        (1, "0001", "size_spatial_attr"),
    ]
    assert all(isinstance(r["correct"], bool) and isinstance(r["reason"], str) for r in rows)
    # the detector only sees dogs
    assert all("expected cat>=1, found 0" in r["reason"] for r in rows[2:])
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert set(summary["tags"]) == {"colors", "size_spatial_attr"} and summary["images"] == 4
    assert summary["prompts"] == 2 and summary["notes"] == [E.PROXY_NOTE]
    assert "| **overall** (mean of tag means) |" in (tmp_path / "scores" / "summary.md").read_text()
    assert "| colors | 2 |" in capsys.readouterr().out


def test_counting_threshold_reaches_the_scorer(tmp_path, tiny_models):
    """score --counting-threshold T: a counting prompt whose detections all score between 0.3 and
    the default 0.9 counts none of them by default and all of them with T = 0.3, so its verdict
    flips."""
    det_dir, clip_dir = tiny_models
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    scores = [d.score for d in E.GenEvalScorer(det_dir, clip_dir, "cpu").detect(image)]
    n = len(scores)
    assert n and all(0.3 < s < 0.9 for s in scores), scores  # the case this test is about
    m = meta(
        "counting",
        [{"class": "dog", "count": n}],
        [{"class": "dog", "count": n + 1}],
        prompt=f"a photo of {E.NUMBER_WORDS[n]} dogs",
    )
    E.write_prompt_folder(tmp_path / "run", 0, m, [image])
    md = write_lines(tmp_path / "meta.jsonl", [m])
    verdicts = []
    for flags in ([], ["--counting-threshold", "0.3"]):
        out = tmp_path / f"scores{len(verdicts)}"
        score = ["score", tmp_path / "run", "--metadata", md, "--out", out, "--device", "cpu"]
        E.main([str(a) for a in score + ["--detector", det_dir, "--clip", clip_dir, *flags]])
        [row] = read_jsonl(out / "results.jsonl")
        verdicts.append((row["correct"], row["reason"]))
    assert verdicts == [(False, f"expected dog>={n}, found 0"), (True, "")]


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """Two colour prompts the tiny UMM spells."""
    include = lambda c: [{"class": "circle", "count": 1, "color": c}]
    rows = [meta("colors", include(c), prompt=f"a photo of a {c} circle") for c in ("red", "blue")]
    return str(write_lines(tmp_path_factory.mktemp("meta") / "m.jsonl", rows))


def test_failed_score_keeps_the_previous_results_and_summaries(tmp_path, metadata, monkeypatch):
    """score writes results.jsonl and the summaries beside their names and renames them at the end:
    a score that fails half-way leaves the previous three files byte for byte."""
    gen = tmp_path / "gen"
    E.main(["generate", "--metadata", metadata, "--out", str(gen), "--any-class", "--n", "2"])
    E.main(["score", str(gen), "--scorer", "shapes"])
    before = {n: (gen / n).read_bytes() for n in ("results.jsonl", "summary.json", "summary.md")}
    calls = []

    def failing(path):
        calls.append(path)
        if len(calls) == 3:
            raise E.GenEvalError(f"cannot read image {path}")
        return E.Image.open(path).convert("RGB")

    monkeypatch.setattr(E, "load_image", failing)
    assert "cannot read image" in eval_error(["score", str(gen), "--scorer", "shapes"])
    assert {n: (gen / n).read_bytes() for n in before} == before


# --- generate -------------------------------------------------------------------------------------
def test_generate_names_words_the_model_does_not_know(tmp_path):
    """Prompts outside the tiny vocabulary fail with one line naming the words."""
    meta_file = write_lines(
        tmp_path / "m.jsonl",
        [
            {
                "tag": "single_object",
                "include": [{"class": "dog", "count": 1}],
                "prompt": "a photo of a dog",
            }
        ],
    )
    msg = eval_error(["generate", "--metadata", str(meta_file), "--out", str(tmp_path / "gen")])
    assert "dog" in msg and "\n" not in msg


def test_eval_generate_uses_the_trainers_precision_rule(monkeypatch, tmp_path):
    """eval_geneval.py generate: --dtype bfloat16 loads with bf16 and samples under bf16 autocast,
    'auto' on the CPU neither (gvu.train's rule); --image-size and --decoder-text reach load_umm."""
    seen = {}
    load = adapters.load_umm
    monkeypatch.setattr(E, "load_umm", lambda *a: seen.update(load_args=a) or load(*a))
    rollout = gvu.rollout
    monkeypatch.setattr(
        gvu,
        "rollout",
        lambda *a: seen.update(autocast=torch.is_autocast_enabled("cpu")) or rollout(*a),
    )
    meta = tmp_path / "m.jsonl"
    meta.write_text(
        json.dumps(
            {
                "tag": "single_object",
                "prompt": "a photo of a circle",
                "include": [{"class": "circle", "count": 1}],
            }
        )
        + "\n"
    )
    for dtype, bf16 in (("bfloat16", True), ("auto", False)):
        out = tmp_path / dtype
        E.main(
            [
                "generate",
                "--model",
                "tiny-random",
                "--metadata",
                str(meta),
                "--out",
                str(out),
                "--n",
                "2",
                "--any-class",
                "--device",
                "cpu",
                "--dtype",
                dtype,
                "--image-size",
                "64",
            ]
        )
        # the v2 world's 64 px
        assert seen["load_args"][5:] == (bf16, 64, "none") and seen["autocast"] is bf16


def test_generate_refuses_a_non_empty_out_and_overwrite_replaces_it(tmp_path, metadata):
    """Images of an earlier generate never mix with new ones: a non-empty --out is refused;
    --overwrite replaces it whole (3 images per prompt, then 1: exactly 1 left); other files are
    never cleared."""
    gen = ["generate", "--metadata", metadata, "--out", str(tmp_path / "gen"), "--any-class"]
    E.main(gen + ["--n", "3"])
    assert "is not empty" in eval_error(gen + ["--n", "1"])
    E.main(gen + ["--n", "1", "--overwrite"])
    assert [sorted(os.listdir(tmp_path / "gen" / d / "samples")) for d in ("00000", "00001")] == [
        ["0000.png"]
    ] * 2
    (tmp_path / "gen" / "notes.txt").write_text("mine")
    assert "also holds notes.txt" in eval_error(gen + ["--n", "1", "--overwrite"])
    assert (tmp_path / "gen" / "notes.txt").read_text() == "mine"


def test_generate_refuses_an_adapter_trained_on_another_base(tmp_path, metadata, monkeypatch):
    """An adapter trained on tiny-random seed 0 is refused for seed 1 (same path, other weights) and
    for the shipped tiny UMM; a missing local --adapter is one line with no hub lookup."""
    out = tmp_path / "run"
    prompts = write_lines(tmp_path / "p.txt", TINY_PROMPTS[:3])
    flags = ["--steps", 1, "--batch-prompts", 1, "--group-size", 2, "--sample-every", 100]
    assert run_main("--model", "tiny-random", "--prompts", prompts, "--out", out, *flags) is None
    gen = [
        "generate",
        "--metadata",
        metadata,
        "--n",
        "1",
        "--any-class",
        "--adapter",
        str(out / "adapter"),
    ]
    msg = eval_error(gen + ["--out", str(tmp_path / "g1"), "--seed", "1"])
    assert (
        msg == f"error: --adapter {out / 'adapter'} was trained on tiny-random (seed 0) "
        "(its gvu.json), not on --model tiny-random with --seed 1"
    )
    assert "was trained on tiny-random (seed 0)" in eval_error(
        gen + ["--out", str(tmp_path / "g2"), "--model", "checkpoints/tiny-umm"]
    )
    E.main(gen + ["--out", str(tmp_path / "g3")])  # the right base loads
    monkeypatch.setattr(
        E.PeftModel, "from_pretrained", lambda *a, **k: pytest.fail("looked up the hub")
    )
    monkeypatch.chdir(tmp_path)
    assert (
        eval_error(gen[:-1] + ["runs/adapter", "--out", "g4"])
        == "error: --adapter runs/adapter: no such folder"
    )
    assert not os.path.exists(tmp_path / "g4")
