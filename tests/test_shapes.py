"""
Tests for world/shapes.py: the renderer, the scene sampler, the prompt sets and the pixel oracle.
The oracle is always compared against truth known independently of it: the symbolic list of
objects that was rendered (see `truth` below) or hand-computed numbers.
Run: python -m pytest -q test_shapes.py
"""

import dataclasses
import json
import os

import numpy as np
import pytest

from standins import ROOT
from world import geneval_rules as R
from world import shapes as S

EVAL_FILES = ("shapes_geneval.jsonl", "shapes_geneval_plus.jsonl")

# -----------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def prompt_sets():
    return S.make_prompt_sets(seed=0)


@pytest.fixture(scope="module")
def eval_metas(prompt_sets):
    _, geneval, plus = prompt_sets
    return geneval + plus


def tokens(prompt):
    """The tiny model's tokenization: whitespace split, with ',' and '.' split off."""
    return prompt.replace(",", " , ").replace(".", " . ").split()


def true_box(o):
    """Exact pixel box (x0, y0, x1, y1), exclusive ends, of an un-jittered object: the bbox of the
    pixels that differ from the background in a render of the object alone (no detector
    involved)."""
    ys, xs = np.nonzero(np.any(np.asarray(S.render([o])) != S.BACKGROUND, axis=-1))
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def truth(objs, meta):
    """GenEval's rules on the symbolic scene (no pixels involved, written independently of
    geneval_rules.evaluate): per include, the first `count` objects of the class in reading order
    must exist and carry the asked-for colour / size / region, each must be `rel` of every object
    of the target group, comparative sizes compare mean box areas, excludes count the class."""
    half = S.GRID // 2
    in_region = {
        "left": lambda o: o.col < half,
        "right": lambda o: o.col >= half,
        "above": lambda o: o.row < half,
        "below": lambda o: o.row >= half,
    }
    area = lambda group: np.mean([(b[2] - b[0]) * (b[3] - b[1]) for b in map(true_box, group)])
    inc = meta["include"]
    groups = []
    for req in inc:
        top = sorted((o for o in objs if o.shape == req["class"]), key=lambda o: (o.row, o.col))[
            : req["count"]
        ]
        if len(top) < req["count"] or any(
            req.get("color", o.color) != o.color
            or req.get("size", o.size) not in (o.size, "larger", "smaller")
            or ("region" in req and not in_region[req["region"]](o))
            for o in top
        ):
            return False
        if "position" in req:
            rel, j = req["position"]
            if not all(
                rel in R.relative_position(true_box(a), true_box(b)) for a in top for b in groups[j]
            ):
                return False
        groups.append(top)
    sized = {r["size"]: g for r, g in zip(inc, groups) if r.get("size") in ("larger", "smaller")}
    if sized and not area(sized["larger"]) > area(sized["smaller"]):
        return False
    return all(
        sum(o.shape == r["class"] for o in objs) < r["count"] for r in meta.get("exclude", [])
    )


def first_meta(metas, tag, pred=lambda m: True):
    return next(m for m in metas if m["tag"] == tag and pred(m))


def scene_for(meta, seed=0):
    return S.sample_scene(meta, np.random.default_rng(seed))


# -----------------------------------------------------------------------------
# the oracle agrees with the truth


def test_oracle_accepts_clean_scene_for_every_eval_prompt(eval_metas):
    """For every eval prompt, a clean render of a sampled scene is judged correct."""
    rng = np.random.default_rng(0)
    for meta in eval_metas:
        objs = S.sample_scene(meta, rng, extra=int(rng.integers(0, 3)))
        assert truth(objs, meta), (meta["prompt"], objs)  # the sampler honours the metadata
        ok, reason = S.oracle(S.render(objs), meta)
        assert ok, (meta["prompt"], reason, objs)


def test_oracle_at_least_99pct_on_jittered_noisy_renders(eval_metas):
    """With +-1 px jitter and pixel noise std 10, the oracle accepts >= 99% of valid scenes."""
    rng = np.random.default_rng(1)
    results = []
    for meta in eval_metas * 2:
        objs = S.sample_scene(meta, rng, extra=int(rng.integers(0, 3)))
        results.append(S.oracle(S.render(objs, jitter=1, noise=10.0, rng=rng), meta)[0])
    assert len(results) >= 300 and np.mean(results) >= 0.99, np.mean(results)


def test_oracle_matches_truth_on_random_scenes(eval_metas):
    """On random (mostly non-matching) clean scenes the oracle's verdict equals the truth."""
    rng = np.random.default_rng(2)
    cells = [(r, c) for r in range(S.GRID) for c in range(S.GRID)]
    n_true = 0
    for i in range(300):
        meta = eval_metas[int(rng.integers(len(eval_metas)))]
        if i % 2:  # a valid scene with one random attribute flipped: near misses
            objs = S.sample_scene(meta, rng)
            k = int(rng.integers(len(objs)))
            field = str(rng.choice(["shape", "color", "size"]))
            pool = {"shape": S.SHAPES, "color": list(S.COLORS), "size": S.SIZES}[field]
            objs[k] = dataclasses.replace(objs[k], **{field: str(rng.choice(pool))})
        else:  # a fully random scene of 1..5 objects
            picks = rng.permutation(len(cells))[: int(rng.integers(1, 6))]
            objs = [
                S.Obj(
                    str(rng.choice(S.SHAPES)),
                    str(rng.choice(list(S.COLORS))),
                    str(rng.choice(S.SIZES)),
                    *cells[p],
                )
                for p in picks
            ]
        expected = truth(objs, meta)
        n_true += expected
        assert S.oracle(S.render(objs), meta)[0] == expected, (meta["prompt"], objs)
    assert 20 < n_true < 280  # both verdicts were exercised


def test_detect_recovers_rendered_objects_exactly(eval_metas):
    """On clean renders, detect() returns exactly the rendered (shape, colour, size, cell, box)."""
    rng = np.random.default_rng(3)
    for meta in eval_metas[:150]:
        objs = S.sample_scene(meta, rng, extra=2)
        dets = S.detect(S.render(objs))
        got = sorted((d.shape, d.color, d.size, d.cell, d.box) for d in dets)
        want = sorted((o.shape, o.color, o.size, (o.row, o.col), true_box(o)) for o in objs)
        assert got == want


def test_detect_every_shape_colour_size_and_cell():
    """Each (shape, colour, size) is recognised in every cell, clean and jittered+noisy."""
    rng = np.random.default_rng(4)
    for shape in S.SHAPES:
        for color in S.COLORS:
            for size in S.SIZES:
                for cell in [(0, 0), tuple(int(v) for v in rng.integers(0, S.GRID, 2))]:
                    o = S.Obj(shape, color, size, *cell)
                    for jitter, noise in ((0, 0.0), (1, 10.0)):
                        dets = S.detect(S.render([o], jitter, noise, rng))
                        assert [(d.shape, d.color, d.size, d.cell) for d in dets] == [
                            (shape, color, size, cell)
                        ]


# -----------------------------------------------------------------------------
# the oracle rejects what is wrong


def test_oracle_rejects_wrong_count(eval_metas):
    """Too few objects, or one too many for a counting prompt, is rejected."""
    meta = first_meta(eval_metas, "counting")
    objs = scene_for(meta)
    ok, reason = S.oracle(S.render(objs[:-1]), meta)
    n = meta["include"][0]["count"]
    assert not ok and reason == f"expected {meta['include'][0]['class']}>={n}, found {n - 1}"
    free = [
        (r, c)
        for r in range(S.GRID)
        for c in range(S.GRID)
        if (r, c) not in {(o.row, o.col) for o in objs}
    ]
    extra = dataclasses.replace(objs[0], row=free[0][0], col=free[0][1])
    assert truth(objs, meta) and not truth(objs + [extra], meta)
    assert not S.oracle(S.render(objs + [extra]), meta)[0]


def test_oracle_rejects_wrong_colour(eval_metas):
    """The right shape in another colour is rejected, with a readable reason."""
    meta = first_meta(eval_metas, "colors")
    want = meta["include"][0]["color"]
    other = next(c for c in S.COLORS if c != want)
    objs = [dataclasses.replace(o, color=other) for o in scene_for(meta)]
    ok, reason = S.oracle(S.render(objs), meta)
    assert not ok and reason == f"expected {want} {meta['include'][0]['class']}>=1, found 1 {other}"


def test_oracle_rejects_mirrored_position(eval_metas):
    """Mirroring a scene across the relation's axis flips every position verdict to false."""
    for meta in [m for m in eval_metas if m["tag"] == "position"]:
        rel = meta["include"][1]["position"][0]
        objs = scene_for(meta)
        flip = (
            (lambda o: dataclasses.replace(o, col=S.GRID - 1 - o.col))
            if rel in ("left of", "right of")
            else (lambda o: dataclasses.replace(o, row=S.GRID - 1 - o.row))
        )
        assert S.oracle(S.render(objs), meta)[0]
        ok, reason = S.oracle(S.render([flip(o) for o in objs]), meta)
        assert not ok and rel in reason


def test_oracle_rejects_wrong_region_and_size_order(eval_metas):
    """GenEval++ regions (mirrored scene) and larger/smaller (sizes swapped) are enforced."""
    meta = first_meta(
        eval_metas, "color_spatial_attr", lambda m: m["include"][0]["region"] == "left"
    )
    objs = [dataclasses.replace(o, col=S.GRID - 1 - o.col) for o in scene_for(meta)]
    assert not S.oracle(S.render(objs), meta)[0]
    meta = first_meta(eval_metas, "size_spatial_attr")
    objs = scene_for(meta)
    swapped = [dataclasses.replace(o, size="small" if o.size == "large" else "large") for o in objs]
    assert S.oracle(S.render(objs), meta)[0]
    ok, reason = S.oracle(S.render(swapped), meta)
    assert not ok and "(box area" in reason


def test_oracle_rejects_wrong_shape(eval_metas):
    """Replacing the asked-for shape with each other shape is rejected."""
    for meta in [m for m in eval_metas if m["tag"] == "single_object"]:
        want = meta["include"][0]["class"]
        for other in S.SHAPES:
            objs = [dataclasses.replace(o, shape=other) for o in scene_for(meta)]
            assert S.oracle(S.render(objs), meta)[0] == (other == want)


def test_oracle_ignores_extra_objects_of_other_classes():
    """As in GenEval, unrelated extra objects don't change a correct verdict."""
    meta = {
        "tag": "colors",
        "include": [{"class": "circle", "count": 1, "color": "blue"}],
        "prompt": "a photo of a blue circle",
    }
    objs = [
        S.Obj("circle", "blue", "large", 1, 1),
        S.Obj("square", "red", "small", 2, 3),
        S.Obj("triangle", "blue", "large", 0, 3),
    ]
    assert S.oracle(S.render(objs), meta) == (True, "ok")


# -----------------------------------------------------------------------------
# prompt files


def test_metadata_lines_have_geneval_format(prompt_sets):
    """Every line has GenEval's fields and value types; our lines reproduce GenEval's examples."""
    train, geneval, plus = prompt_sets
    sizes = set(S.SIZES) | {"larger", "smaller"}
    for tags, metas in (
        (S.GENEVAL_TAGS, geneval),
        (S.GENEVAL_PLUS_TAGS, plus),
        (S.GENEVAL_TAGS + S.GENEVAL_PLUS_TAGS + S.TRAIN_ONLY_TAGS, train),
    ):
        for m in metas:
            assert list(m)[0] == "tag" and list(m)[-1] == "prompt" and m["tag"] in tags
            assert set(m) <= {"tag", "include", "exclude", "prompt"} and m["prompt"].startswith(
                "a photo of "
            )
            assert 1 <= sum(r["count"] for r in m["include"]) <= S.MAX_OBJECTS
            for i, r in enumerate(m["include"] + m.get("exclude", [])):
                assert set(r) <= {"class", "count", "color", "position", "size", "region"}
                assert r["class"] in S.SHAPES and isinstance(r["count"], int) and r["count"] >= 1
                assert r.get("color", "red") in S.COLORS and r.get("size", "small") in sizes
                assert r.get("region", "left") in S.REGIONS
                if "position" in r:
                    assert r["position"][0] in S.RELATIONS and 0 <= r["position"][1] < i
    examples = [  # GenEval's own examples with shapes as classes
        {
            "tag": "single_object",
            "include": [{"class": "circle", "count": 1}],
            "prompt": "a photo of a circle",
        },
        {
            "tag": "two_object",
            "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
            "prompt": "a photo of a circle and a square",
        },
        {
            "tag": "counting",
            "include": [{"class": "triangle", "count": 3}],
            "exclude": [{"class": "triangle", "count": 4}],
            "prompt": "a photo of three triangles",
        },
        {
            "tag": "colors",
            "include": [{"class": "circle", "count": 1, "color": "blue"}],
            "prompt": "a photo of a blue circle",
        },
        {
            "tag": "position",
            "include": [
                {"class": "circle", "count": 1},
                {"class": "square", "count": 1, "position": ["left of", 0]},
            ],
            "prompt": "a photo of a square left of a circle",
        },
        {
            "tag": "color_attr",
            "include": [
                {"class": "square", "count": 1, "color": "purple"},
                {"class": "circle", "count": 1, "color": "red"},
            ],
            "prompt": "a photo of a purple square and a red circle",
        },
    ]
    for ex in examples:
        assert json.dumps(ex) in {json.dumps(m) for m in S.enumerate_tag("geneval", ex["tag"])}


def test_eval_prompts_never_in_train(prompt_sets):
    """No eval prompt text (GenEval or GenEval++) appears in train.txt."""
    train, geneval, plus = prompt_sets
    assert not {m["prompt"] for m in geneval + plus} & {m["prompt"] for m in train}
    with open(os.path.join(ROOT, "prompts", "train.txt")) as f:
        train_txt = set(f.read().splitlines())
    for name in EVAL_FILES:
        with open(os.path.join(ROOT, "prompts", name)) as f:
            assert not {json.loads(line)["prompt"] for line in f} & train_txt


def test_dev_split_is_distinct_training_lines(prompt_sets):
    """prompts/shapes_dev.jsonl (the tuning split) holds distinct lines of train.jsonl, so no eval
    prompt."""
    train = {json.dumps(m, sort_keys=True) for m in prompt_sets[0]}
    with open(os.path.join(ROOT, "prompts", "shapes_dev.jsonl")) as f:
        dev = [json.dumps(json.loads(line), sort_keys=True) for line in f]
    assert dev and len(set(dev)) == len(dev) and set(dev) <= train


def test_every_prompt_uses_only_prompt_words():
    """Every prompt in every prompt file tokenizes into PROMPT_WORDS only."""
    vocab = set(S.PROMPT_WORDS)
    for name in ("train.txt", "train.jsonl") + EVAL_FILES:
        with open(os.path.join(ROOT, "prompts", name)) as f:
            lines = f.read().splitlines()
        assert lines
        for line in lines:
            prompt = line if name.endswith(".txt") else json.loads(line)["prompt"]
            assert set(tokens(prompt)) <= vocab, prompt


def test_prompt_sets_follow_geneval_tag_counts(prompt_sets):
    """Per tag: GenEval's count (GenEval++: 40), capped at 3/4 of the tag's prompt space (counted
    here by hand), all of single_object; unique eval texts; 300 train lines per (set, tag)."""
    from collections import Counter

    train, geneval, plus = prompt_sets
    n, c = len(S.SHAPES), len(S.COLORS)
    pairs, cpairs = n * (n - 1), c * (c - 1)
    geneval_space = {
        "single_object": n,
        "two_object": pairs,
        "counting": n * 3,
        "colors": n * c,
        "position": pairs * 4,
        "color_attr": pairs * cpairs,
    }
    # GenEval's evaluation_metadata.jsonl
    geneval_want = {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }
    want = {
        t: n if t == "single_object" else min(geneval_want[t], 3 * geneval_space[t] // 4)
        for t in geneval_space
    }
    got = Counter(m["tag"] for m in geneval)
    assert want == {
        "single_object": 8,
        "two_object": 42,
        "counting": 18,
        "colors": 60,
        "position": 100,
        "color_attr": 100,
    }
    assert {t: v for t, v in got.items() if t != "counting"} == {
        t: v for t, v in want.items() if t != "counting"
    }
    # counting: each plural occurs in only 3 lines, so the keep-every-word-trainable rule binds
    # below 18
    assert 2 * geneval_space["counting"] // 3 <= got["counting"] <= want["counting"]
    assert Counter(m["tag"] for m in plus) == {t: 40 for t in S.GENEVAL_PLUS_TAGS} | {
        "counting": 3 * (n * 4) // 4
    }
    for metas in (geneval, plus):
        assert len({m["prompt"] for m in metas}) == len(metas)  # no repeats in eval
    # single_object: eval only
    n_keys = len(S.GENEVAL_TAGS) - 1 + len(S.GENEVAL_PLUS_TAGS) + len(S.TRAIN_ONLY_TAGS)
    assert len(train) == S.TRAIN_PER_TAG * n_keys
    train_words = {w for m in train for w in tokens(m["prompt"])}
    assert {w for m in geneval + plus for w in tokens(m["prompt"])} <= train_words


def test_geneval_plus_structure_matches_geneval_plus(prompt_sets):
    """Each GenEval++ tag has GenEval++'s include fields, number of objects and exclude structure
    (written out from geneval_plus_plus.jsonl: only counting has an exclude)."""
    fields = {
        "color_attr": {"class", "count", "color"},
        "color_count_attr": {"class", "count", "color"},
        "color_spatial_attr": {"class", "count", "color", "region"},
        "counting": {"class", "count"},
        "multi_object_count_attr": {"class", "count"},
        "size_spatial_attr": {"class", "count", "size", "region"},
        "spatial_count_attr": {"class", "count", "region"},
    }
    n_items = {"color_attr": {3, 4}, "multi_object_count_attr": {2, 3}, "counting": {1}}
    plus = prompt_sets[2]
    for m in plus:
        assert all(set(r) == fields[m["tag"]] for r in m["include"]), m
        assert len(m["include"]) in n_items.get(m["tag"], {2}), m
        assert ("exclude" in m) == (m["tag"] == "counting"), m
        assert len({r["class"] for r in m["include"]}) == len(m["include"])  # distinct classes
    assert {m["include"][0]["count"] for m in plus if m["tag"] == "counting"} == {4, 5, 6, 7}


def test_prompt_cli_is_deterministic_and_files_are_current(tmp_path):
    """Same seed -> byte-identical files, and the checked-in prompts/ equal the seed-0 output."""
    S.write_prompt_files(tmp_path / "a", seed=0)
    S.write_prompt_files(tmp_path / "b", seed=0)
    S.write_prompt_files(tmp_path / "c", seed=1)
    names = ("train.txt", "train.jsonl") + EVAL_FILES
    read = lambda d, n: open(os.path.join(d, n), "rb").read()
    for n in names:
        assert (
            read(tmp_path / "a", n)
            == read(tmp_path / "b", n)
            == read(os.path.join(ROOT, "prompts"), n)
        )
    assert any(read(tmp_path / "a", n) != read(tmp_path / "c", n) for n in names)
    with open(tmp_path / "a" / "train.txt") as f, open(tmp_path / "a" / "train.jsonl") as g:
        assert f.read().splitlines() == [json.loads(line)["prompt"] for line in g]  # same order
