"""Tests for eval_geneval.py: pure GenEval rules, folder I/O, CLI errors, prompts, and an
end-to-end `score` run on tiny random Mask2Former / CLIP models built in-process (no downloads)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import eval_geneval as E
from conftest import run_error, write_jsonl
from tools import experiments as X
from eval_geneval import Detection


def det(cls, box, score=0.95, color=None):
    """A hand-made detection."""
    return Detection(cls, score, box, None, color)


def meta(tag, include, exclude=None, prompt="p"):
    """A hand-made GenEval metadata dict."""
    m = {"tag": tag, "include": include, "prompt": prompt}
    return m | ({"exclude": exclude} if exclude else {})


# --------------------------------------------------------------------------- rules


def test_count_passes_only_with_enough_detections_of_the_class():
    """An include clause needs at least `count` detections of its class."""
    m = meta("counting", [{"class": "dog", "count": 2}])
    assert E.evaluate(m, {"dog": [det("dog", (0, 0, 1, 1))] * 2}, (64, 64))[0]
    ok, reason = E.evaluate(
        m, {"dog": [det("dog", (0, 0, 1, 1))], "cat": [det("cat", (0, 0, 1, 1))] * 3}, (64, 64)
    )
    assert not ok and reason == "expected dog>=2, found 1"


def test_exclude_fails_when_detected_number_reaches_its_count():
    """exclude {count: 3} fails at 3 detections and passes at 2 ('exactly two')."""
    m = meta("counting", [{"class": "dog", "count": 2}], [{"class": "dog", "count": 3}])
    assert E.evaluate(m, {"dog": [det("dog", (0, 0, 1, 1))] * 2}, (64, 64))[0]
    ok, reason = E.evaluate(m, {"dog": [det("dog", (0, 0, 1, 1))] * 3}, (64, 64))
    assert not ok and reason == "expected dog<3, found 3"


def test_select_detections_thresholds_caps_and_sorts():
    """Keep score > 0.3 (0.9 for 'counting'), best first, at most 16 per class, no NMS."""
    raw = [det("dog", (0, 0, 1, 1), s) for s in (0.2, 0.5, 0.95, 0.3)] + [
        det("cat", (0, 0, 1, 1), 0.1)
    ]
    assert [d.score for d in E.select_detections(raw, "two_object")["dog"]] == [0.95, 0.5]
    assert [d.score for d in E.select_detections(raw, "counting")["dog"]] == [0.95]
    assert "cat" not in E.select_detections(raw, "two_object")
    many = [det("dog", (0, 0, 1, 1), 0.99)] * 20  # identical boxes: nothing suppressed
    assert len(E.select_detections(many, "counting")["dog"]) == 16


@pytest.mark.parametrize(
    "box_a, relation",
    [
        ((0, 40, 10, 50), "left of"),
        ((90, 40, 100, 50), "right of"),
        ((40, 0, 50, 10), "above"),
        ((40, 90, 50, 100), "below"),
    ],
)
def test_relative_position_gives_each_relation(box_a, relation):
    """A box far to one side of B (centre 45,45) gets exactly that relation."""
    assert E.relative_position(box_a, (40, 40, 50, 50)) == {relation}


def test_relative_position_margin_cancels_small_offsets_and_keeps_diagonals():
    """Offsets inside the 0.1*(dimA+dimB) margin give no relation; a clear diagonal gives two."""
    # centres 3 px apart; margin = 0.1 * (10 + 10) = 2 per axis -> revised (1, 0), dx = 1/3 -> none
    assert E.relative_position((3, 0, 13, 10), (0, 0, 10, 10)) == set()
    assert E.relative_position((0, 0, 10, 10), (0, 0, 10, 10)) == set()
    # offset (-50, -50), margin 2: revised/|offset| = (-48, -48)/70.7 = -0.68 on both axes
    assert E.relative_position((0, 0, 10, 10), (50, 50, 60, 60)) == {"left of", "above"}


def test_position_rule_compares_to_the_target_group():
    """position ['right of', 0] holds when every object is right of every target object."""
    m = meta(
        "position",
        [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    )
    cat, dog_r, dog_l = (
        det("cat", (0, 0, 10, 10)),
        det("dog", (80, 0, 90, 10)),
        det("dog", (0, 80, 10, 90)),
    )
    assert E.evaluate(m, {"cat": [cat], "dog": [dog_r]}, (100, 100)) == (True, "")
    assert E.evaluate(m, {"cat": [cat], "dog": [dog_l]}, (100, 100)) == (
        False,
        "expected dog right of target, found below",
    )
    assert (
        E.evaluate(m, {"dog": [dog_r]}, (100, 100))[1]
        == "expected cat>=1, found 0; no target for dog to be right of"
    )


def test_position_and_region_rules_read_only_the_count_best_detections():
    """As GenEval, a clause reads its class's `count` highest-scoring detections (best first): a weaker dog on the
    wrong side or in the wrong half, or a weaker extra cat as target, changes nothing; the best one decides."""
    m = meta(
        "position",
        [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    )
    cat, cat_weak = (
        det("cat", (40, 40, 50, 50)),
        det("cat", (90, 40, 100, 50), 0.4),
    )  # the weak cat: right of the dog
    dog_right, dog_left = det("dog", (70, 40, 80, 50)), det("dog", (0, 40, 10, 50), 0.5)
    assert E.evaluate(m, {"cat": [cat, cat_weak], "dog": [dog_right, dog_left]}, (100, 100)) == (
        True,
        "",
    )
    best_left = det("dog", (0, 40, 10, 50), 0.99)
    assert not E.evaluate(m, {"cat": [cat], "dog": [best_left, dog_right]}, (100, 100))[0]
    r = meta("spatial_count_attr", [{"class": "dog", "count": 1, "region": "right"}])
    assert E.evaluate(r, {"dog": [dog_right, dog_left]}, (100, 100))[0]
    assert not E.evaluate(r, {"dog": [best_left, dog_right]}, (100, 100))[0]


def test_color_votes_need_count_crops_of_the_target_colour():
    """A count-2 red clause needs 2 of the top-2 crops to be red; only the top `count` are voted."""
    m = meta("color_count_attr", [{"class": "car", "count": 2, "color": "red"}])
    reds = [det("car", (0, 0, 1, 1), color="red")] * 2
    assert E.evaluate(m, {"car": reds + [det("car", (0, 0, 1, 1), 0.5, "blue")]}, (8, 8))[0]
    ok, reason = E.evaluate(m, {"car": [reds[0], det("car", (0, 0, 1, 1), color="blue")]}, (8, 8))
    assert not ok and reason == "expected red car>=2, found 1 red, 1 blue"
    called = []
    E.evaluate(
        m,
        {"car": reds},
        (8, 8),
        color_fn=lambda objs, cls: called.append(cls) or ["red"] * len(objs),
    )
    assert called == ["car"]


def test_regions_use_box_centre_half_of_the_image():
    """GenEval++ region proxy: centre x < W/2 is left, y > H/2 is below, etc."""
    assert E.image_regions((0, 0, 20, 20), (100, 100)) == {"left", "above"}
    assert E.image_regions((60, 70, 100, 100), (100, 100)) == {"right", "below"}
    m = meta("spatial_count_attr", [{"class": "dog", "count": 2, "region": "left"}])
    assert E.evaluate(
        m, {"dog": [det("dog", (0, 0, 10, 10)), det("dog", (0, 50, 10, 60))]}, (100, 100)
    )[0]
    assert not E.evaluate(
        m, {"dog": [det("dog", (0, 0, 10, 10)), det("dog", (80, 0, 90, 10))]}, (100, 100)
    )[0]


def test_sizes_compare_box_areas_between_groups():
    """GenEval++ size proxy: the 'larger' group's mean box area must exceed the 'smaller' one's."""
    m = meta(
        "size_spatial_attr",
        [
            {"class": "bench", "count": 1, "size": "larger"},
            {"class": "spoon", "count": 1, "size": "smaller"},
        ],
    )
    big, small = (0, 0, 50, 50), (0, 0, 10, 10)
    assert E.evaluate(
        m, {"bench": [det("bench", big)], "spoon": [det("spoon", small)]}, (100, 100)
    )[0]
    ok, reason = E.evaluate(
        m, {"bench": [det("bench", small)], "spoon": [det("spoon", big)]}, (100, 100)
    )
    assert not ok and "expected bench larger" in reason and "expected spoon smaller" in reason


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


# --------------------------------------------------------------------------- metadata, folders, CLI errors


def test_read_metadata_rejects_bad_lines_with_a_one_line_error(tmp_path):
    """Unknown tags, unknown classes and broken JSON name the file and line."""
    good = meta("colors", [{"class": "car", "count": 1, "color": "red"}])
    assert E.read_metadata(write_jsonl(tmp_path / "ok.jsonl", [good, ""])) == [good]
    for bad, msg in [
        (meta("nope", [{"class": "car", "count": 1}]), "unknown tag 'nope'"),
        (meta("colors", [{"class": "unicorn", "count": 1}]), "unknown class 'unicorn'"),
        (meta("colors", [{"class": "car", "count": 1, "color": "teal"}]), "unknown color"),
        ("{not json", "invalid JSON"),
    ]:
        with pytest.raises(E.GenEvalError, match=msg) as exc:
            E.read_metadata(write_jsonl(tmp_path / "bad.jsonl", [good, bad]))
        assert "bad.jsonl:2" in str(exc.value)


def test_folder_roundtrip_and_cli_errors_exit_with_one_line(tmp_path):
    """write_prompt_folder/iter_samples round-trip; missing folder, count mismatch, bad image fail cleanly."""
    metas = [meta("single_object", [{"class": "dog", "count": 1}], prompt="a photo of a dog")]
    E.write_prompt_folder(tmp_path / "run", 0, metas[0], [Image.new("RGB", (8, 8))] * 2)
    assert [(i, p.name) for i, _, p in E.iter_samples(tmp_path / "run", metas)] == [
        (0, "0000.png"),
        (0, "0001.png"),
    ]
    assert "image folder not found" in run_error(["score", str(tmp_path / "missing")])
    two = write_jsonl(tmp_path / "two.jsonl", metas * 2)
    assert "1 prompt folders but the metadata file has 2" in run_error(
        ["score", str(tmp_path / "run"), "--metadata", str(two)]
    )
    (tmp_path / "run" / "00000" / "samples" / "0001.png").write_text("not a png")
    assert "cannot read image" in run_error(
        ["score", str(tmp_path / "run"), "--detector", "never/loaded"]
    )
    with pytest.raises(E.GenEvalError, match="cannot read image"):
        E.load_image(tmp_path / "run" / "00000" / "samples" / "0001.png")


def test_compare_prints_per_tag_deltas(tmp_path, capsys):
    """compare shows base, trained and delta per tag, from files or score folders."""
    a = {
        "tags": {"counting": {"images": 4, "accuracy": 0.25}},
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
        "| counting | 0.2500 | 0.7500 | +0.5000 |" in out and "| colors | - | 1.0000 | - |" in out
    )


# --------------------------------------------------------------------------- prompts


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
    """Same seed -> same file; prompts in the --exclude metadata never appear (all single objects here)."""
    held_out = [E.make_meta("single_object", i) for i in range(80)] + [
        E.make_meta("counting", i) for i in range(100)
    ]
    ex = write_jsonl(tmp_path / "eval.jsonl", held_out)
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


# --------------------------------------------------------------------------- end to end on tiny models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Save a tiny random 80-class Mask2Former (biased to predict 'dog') and a tiny CLIP; return their dirs."""
    import torch
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
    """Detections carry COCO names, masks at image size, boxes = mask extents (x2 exclusive), score <= 1."""
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
    """`score` over 2 prompts x 2 images writes 4 result rows, summary.json/md with per-tag means."""
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
    md = write_jsonl(tmp_path / "meta.jsonl", metas)
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
    assert all(
        "expected cat>=1, found 0" in r["reason"] for r in rows[2:]
    )  # the detector only sees dogs
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert set(summary["tags"]) == {"colors", "size_spatial_attr"} and summary["images"] == 4
    assert summary["prompts"] == 2 and summary["notes"] == [E.PROXY_NOTE]
    assert "| **overall** (mean of tag means) |" in (tmp_path / "scores" / "summary.md").read_text()
    assert "| colors | 2 |" in capsys.readouterr().out


# --------------------------------------------------------------------------- generate / audit on a tiny model


def test_group_auc_counts_pairs_where_correct_images_score_higher():
    """AUC = share of (correct, wrong) pairs ordered right, ties half; undefined when the scorer sees no difference."""
    assert X.group_auc([0.9, 0.2, 0.5, 0.5], [True, False, True, False]) == pytest.approx(
        (1 + 1 + 1 + 0.5) / 4
    )
    assert X.group_auc([0.1, 0.2], [True, True]) is None


def test_generate_then_score_and_audit_on_a_tiny_model(tmp_path):
    """generate writes GenEval's layout that score --scorer shapes reads; audit reports every tag it saw."""
    metas = [
        {
            "tag": "colors",
            "include": [{"class": "circle", "count": 1, "color": "red"}],
            "prompt": "a photo of a red circle",
        },
        {
            "tag": "counting",
            "include": [{"class": "square", "count": 2}],
            "exclude": [{"class": "square", "count": 3}],
            "prompt": "a photo of two squares",
        },
    ]
    meta_file = write_jsonl(tmp_path / "m.jsonl", metas)
    E.main(
        [
            "generate",
            "--metadata",
            str(meta_file),
            "--out",
            str(tmp_path / "gen"),
            "--n",
            "2",
            "--any-class",
        ]
    )
    assert sorted(p.name for p in (tmp_path / "gen" / "00001" / "samples").iterdir()) == [
        "0000.png",
        "0001.png",
    ]
    assert json.loads((tmp_path / "gen" / "00001" / "metadata.jsonl").read_text()) == metas[1]
    E.main(["score", str(tmp_path / "gen"), "--scorer", "shapes", "--metadata", str(meta_file)])
    summary = json.loads((tmp_path / "gen" / "summary.json").read_text())
    assert summary["images"] == 4 and set(summary["tags"]) == {"colors", "counting"}
    X.main(
        [
            "audit",
            "--metadata",
            str(meta_file),
            "--out",
            str(tmp_path / "audit"),
            "--group-size",
            "2",
        ]
    )
    table = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert set(table) == {"colors", "counting"} and all(v["groups"] == 1 for v in table.values())
    groups = [
        json.loads(line)
        for line in (tmp_path / "audit" / "audit_groups.jsonl").read_text().splitlines()
    ]
    assert all(len(g["rewards"]) == 2 and all(0 < r < 1 for r in g["rewards"]) for g in groups)


def test_generate_names_words_the_model_does_not_know(tmp_path):
    """Prompts outside the tiny vocabulary fail with one line naming the words."""
    meta_file = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "tag": "single_object",
                "include": [{"class": "dog", "count": 1}],
                "prompt": "a photo of a dog",
            }
        ],
    )
    msg = run_error(["generate", "--metadata", str(meta_file), "--out", str(tmp_path / "gen")])
    assert "dog" in msg and "\n" not in msg


def test_oracle_reward_fn_gives_one_to_correct_renders_and_zero_to_wrong_ones(tmp_path):
    """experiments.oracle_reward_fn (oracle-train's gvu reward_fn) returns the oracle's verdict per image as 1.0 / 0.0
    for renders whose truth is known: right colour / count pass, wrong ones fail; an unknown prompt is an InputError."""
    from world import shapes
    from models.adapters import InputError

    metas = [
        {
            "tag": "colors",
            "include": [{"class": "circle", "count": 1, "color": "red"}],
            "prompt": "a photo of a red circle",
        },
        {
            "tag": "counting",
            "include": [{"class": "square", "count": 2}],
            "exclude": [{"class": "square", "count": 3}],
            "prompt": "a photo of two squares",
        },
    ]
    reward_fn = X.oracle_reward_fn(str(write_jsonl(tmp_path / "m.jsonl", metas)))
    sq = lambda *cells: [shapes.Obj("square", "green", "small", r, c) for r, c in cells]
    images = [
        shapes.render([shapes.Obj("circle", "red", "large", 1, 1)]),
        shapes.render([shapes.Obj("circle", "blue", "large", 1, 1)]),
        shapes.render(sq((0, 0), (2, 3))),
        shapes.render(sq((0, 0), (2, 3), (3, 1))),
    ]
    prompts = ["a photo of a red circle"] * 2 + ["a photo of two squares"] * 2
    rewards = reward_fn(None, images, prompts, None)
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(InputError, match="no metadata for prompt 'a photo of a circle'"):
        reward_fn(None, images[:1], ["a photo of a circle"], None)


def test_oracle_train_rewards_are_the_oracle_verdicts(tmp_path, one_thread):
    """oracle-train runs gvu.py end to end with reward = the pixel oracle's verdict (the verdicts themselves:
    test_oracle_reward_fn_gives_one_to_correct_renders_and_zero_to_wrong_ones)."""
    metas = [
        {
            "tag": "colors",
            "include": [{"class": "circle", "count": 1, "color": "red"}],
            "prompt": "a photo of a red circle",
        }
    ]
    meta_file = write_jsonl(tmp_path / "m.jsonl", metas)
    (tmp_path / "p.txt").write_text("a photo of a red circle\n")
    X.main(
        [
            "oracle-train",
            "--train-metadata",
            str(meta_file),
            "--model",
            "tiny-random",
            "--prompts",
            str(tmp_path / "p.txt"),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "1",
            "--batch-prompts",
            "1",
            "--group-size",
            "2",
        ]
    )
    row = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert row["reward_mean"] == 0.0  # a random model draws noise: every verdict is 0
