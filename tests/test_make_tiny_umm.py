"""The tiny-UMM recipe (world/make_tiny_umm.py): the training batches and loss, its warm-ups, the
understanding and draw probes, the semantic inits, the train CLI, and the shipped bases it made."""

import argparse
import json
import os
import re

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from models.tiny_umm import TinyUMM
from standins import ROOT, SHIPPED
from world import make_tiny_umm as make
from world import shapes

# peft's pre-v6 names


def test_lm_batch_t2i_sees_train_lines_only_while_captions_span_every_tag():
    """make_tiny_umm.lm_batch: T2I sequences come from the train lines alone; I2T captions are drawn
    from every tag's whole space (so mostly texts that are not train lines)."""
    # a code per cell kind
    umm = TinyUMM.random(seed=0, hidden=64, layers=2, num_codes=len(make.KINDS))
    space = make.caption_space()
    read = lambda f: make.read_jsonl(os.path.join(ROOT, f))
    train, evals = read("prompts/train.jsonl"), [m for f in make.EVAL_FILES for m in read(f)]
    assert {m["tag"] for m in train + evals} <= {tag for _, tag in space}
    # in their tag's phrasing
    assert all(shapes.make_line(m["tag"], m["include"]) == m for m in train + evals)
    seqs, i2t = make.lm_batch(
        umm, train[:1], space, np.random.default_rng(0), batch=48, n_t2i=8, with_distractor=False
    )
    prefix = umm.tokenizer(umm.t2i_prompt(train[0]["prompt"]), add_special_tokens=False).input_ids
    assert len(seqs) == 8 and all(s == len(prefix) and q[:s] == prefix for q, s in seqs)
    train_answers = {
        tuple(ids)
        for ids in umm.tokenizer(
            [m["prompt"] + umm.answer_suffix for m in train], add_special_tokens=False
        ).input_ids
    }
    assert len(i2t) == 40 and sum(tuple(ans) not in train_answers for _, ans, _ in i2t) >= 20


def test_understanding_scores_regions_against_the_swap_that_only_the_image_rules_out():
    """Region lines always name an opposite pair, so a one-region distractor names a pair no caption
    has (language rejects it). regions_swapped keeps the pair opposite, and the oracle rejects it on
    every scene."""
    rng = np.random.default_rng(0)
    lines = [
        m
        for m in make.read_jsonl(os.path.join(ROOT, "prompts/shapes_geneval_plus.jsonl"))
        if sum("region" in r for r in m["include"]) == 2
    ]
    assert (
        lines
        and make.regions_swapped({"tag": "position", "include": [{"class": "circle", "count": 1}]})
        is None
    )
    for m in lines[:20]:
        regions = [r["region"] for r in m["include"]]
        swapped = make.regions_swapped(m)
        assert [r["region"] for r in swapped["include"]] == [shapes.OPPOSITE[g] for g in regions]
        pairs = [[r["region"] for r in d["include"]] for d in make.distractors(m)["position"]]
        assert shapes.OPPOSITE[regions[0]] == regions[1] and all(
            shapes.OPPOSITE[a] != b for a, b in pairs
        )
        dets = shapes.detect(shapes.render(shapes.sample_scene(m, rng), jitter=1, rng=rng))
        assert shapes.judge(dets, m)[0] and not shapes.judge(dets, swapped)[0]


def test_understanding_scores_colours_against_their_rotation_that_only_binding_rules_out():
    """colours_rotated moves each named colour one object on: the same colours and the same shapes
    are named, so a judge reading a bag of colours cannot reject it, but the oracle rejects it on
    every scene of the line."""
    rng, seen = np.random.default_rng(0), 0
    circle = {"class": "circle", "count": 1, "color": "red"}
    assert make.colours_rotated({"tag": "colors", "include": [circle]}) is None
    assert (
        make.colours_rotated({"tag": "color_attr", "include": [circle, dict(circle, color="blue")]})
        is None
    )
    for m in make.read_jsonl(os.path.join(ROOT, "prompts/shapes_geneval_plus.jsonl"))[:120]:
        rotated = make.colours_rotated(m)
        if rotated is None:
            continue
        seen += 1
        colours, new = [r["color"] for r in m["include"]], [r["color"] for r in rotated["include"]]
        assert new == colours[-1:] + colours[:-1] and [r["class"] for r in rotated["include"]] == [
            r["class"] for r in m["include"]
        ]
        dets = shapes.detect(shapes.render(shapes.sample_scene(m, rng), jitter=1, rng=rng))
        assert shapes.judge(dets, m)[0] and not shapes.judge(dets, rotated)[0]
    assert seen >= 20


def test_binding_views_change_only_the_colours_or_drop_one_object_of_one_jittered_scene():
    """binding_views: the line's scene, its colours rotated, one object short, all with the same
    jitter; the oracle accepts the first only, and the rotated view has the same objects in the same
    places."""
    rng, seen = np.random.default_rng(0), 0
    # 2-4 objects, counted groups, regions
    for m in [m for f in make.EVAL_FILES for m in make.read_jsonl(f)]:
        scene, line = shapes.sample_scene(m, rng), make.colours_rotated(m)
        if line is None:
            continue
        own, rotated, short = (shapes.detect(v) for v in make.binding_views(scene, line, [0, seen]))
        seen += 1
        assert [shapes.judge(d, m)[0] for d in (own, rotated, short)] == [True, False, False]
        where = lambda dets: sorted((d.shape, d.size, d.box) for d in dets)
        assert where(own) == where(rotated) and len(short) == len(own) - 1 == len(scene) - 1
        # the same colours, on other objects
        assert {d.color for d in own} == {d.color for d in rotated}
    assert seen >= 150


def test_understanding_pairs_each_swap_with_its_own_reward(capsys, monkeypatch, one_thread):
    """understand scores the region swap and the colour rotation as the last prompts of a line's
    batch: each kind's verdict must read its own. With the rotation made the true caption itself,
    its verdict is never a win (a tie), while the region swap, read from the same batches, still
    wins sometimes."""
    rotated = make.colours_rotated
    monkeypatch.setattr(make, "colours_rotated", lambda meta: meta if rotated(meta) else None)
    make.understand(
        argparse.Namespace(model=SHIPPED, adapter="", n=60, seed=3, threads=1, paired=False)
    )
    out = capsys.readouterr().out
    regions = float(re.search(r"regions, both swapped (\S+)", out).group(1))
    assert re.search(r"colours, rotated 0.000 +\(n=\d+", out) and regions > 0
    assert re.search(r"reward of a colour line on its scene \S+, with its colours rotated", out)


def test_paired_understanding_reads_the_same_comparisons_with_the_adapter_off(
    tmp_path, capsys, one_thread
):
    """understand --paired: its base column is exactly `understand` without the adapter, its adapter
    column `understand` with it, and the printed lost / gained counts are the two columns'
    disagreements."""
    folder = SHIPPED
    lm = TinyUMM.from_pretrained(folder).lm
    torch.manual_seed(0)  # peft's lora_A init (torch >= 2.13 seeds each process at random)
    policy = get_peft_model(lm, LoraConfig(r=4, lora_alpha=16, target_modules=TinyUMM.lora_targets))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                # a LoRA that moves the judge
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    policy.save_pretrained(tmp_path / "adapter")
    run = lambda adapter, paired: make.understand(
        argparse.Namespace(model=folder, adapter=adapter, n=12, seed=3, threads=1, paired=paired)
    )
    on, base = run(str(tmp_path / "adapter"), True)
    printed = capsys.readouterr().out
    assert base == run("", False) and on == run(str(tmp_path / "adapter"), False)
    assert on != base  # the adapter changes some verdicts, so the counts below are not trivially 0
    for attr in base:
        lost = sum(b and not x for b, x in zip(base[attr], on[attr]))
        gained = sum(x and not b for b, x in zip(base[attr], on[attr]))
        assert re.search(
            rf"paired with the base {attr} .*lost {lost}, gained {gained} of {len(base[attr])};",
            printed,
        )
    # the interval, by hand: 7 lost and 2 gained of 216 -> d = -5/216, var = (9/216 - d^2) / 216
    lost, gained, n, d, lo, hi = make.paired_change(
        [True] * 9 + [True] * 205 + [False] * 2,
        [False] * 7 + [True] * 2 + [True] * 205 + [True] * 2,
    )
    half = 1.96 * ((9 / 216 - (5 / 216) ** 2) / 216) ** 0.5
    assert (lost, gained, n) == (7, 2, 216) and d == pytest.approx(-5 / 216)
    assert (lo, hi) == pytest.approx((-5 / 216 - half, -5 / 216 + half)) and (
        round(100 * lo, 1),
        round(100 * hi, 1),
    ) == (-5.0, 0.4)


@pytest.mark.parametrize(
    "init, rows",
    [
        ("semantic_code_init", lambda lm: lm.get_input_embeddings().weight),
        ("semantic_head_init", lambda lm: lm.lm_head.weight),
    ],
)
def test_semantic_inits_start_each_code_as_its_words_and_leave_the_rest_alone(init, rows):
    """make_tiny_umm --semantic-codes (input embeddings) and --semantic-head (output rows): code k's
    row = (shape + colour + size word rows) / sqrt 3 of the same matrix, computed here from the word
    rows; the empty code, the unused codes, every text row and the other matrix keep their init."""
    umm = TinyUMM.random(seed=0, hidden=64, layers=2, num_codes=len(make.KINDS) + 3)
    other = {
        "semantic_code_init": umm.lm.lm_head.weight,
        "semantic_head_init": umm.lm.get_input_embeddings().weight,
    }
    before, other_before = rows(umm.lm).detach().clone(), other[init].detach().clone()
    getattr(make, init)(umm)
    after = rows(umm.lm).detach()
    for kind in [
        ("circle", "red", "large"),
        ("heart", "white", "small"),
        ("cross", "brown", "large"),
    ]:
        words = before[[umm.tokenizer.vocab[w] for w in kind]]
        torch.testing.assert_close(
            after[umm.image_offset + make.KIND_ID[kind]], words.sum(0) / 3**0.5
        )
    kept = list(range(umm.image_offset + 1)) + list(
        range(umm.image_offset + len(make.KINDS), len(after))
    )
    assert torch.equal(after[kept], before[kept]) and torch.equal(other[init], other_before)


def test_draw_reads_the_named_shape_and_colour_off_the_full_lm_logits(tmp_path, capsys):
    """make_tiny_umm draw: for one colours line, its two numbers equal the ones computed here from
    the LM's full- vocabulary logits (HF forward, image slice, softmax) after the prompt and the
    empty cells before the object."""
    umm = TinyUMM.random(seed=0, hidden=64, layers=2, num_codes=len(make.KINDS))
    umm.save_pretrained(tmp_path / "m")
    meta = {
        "tag": "colors",
        "include": [{"class": "heart", "count": 1, "color": "green"}],
        "prompt": "a photo of a green heart",
    }
    (tmp_path / "one.jsonl").write_text(json.dumps(meta) + "\n")
    make.draw(
        make.parser().parse_args(
            [
                "draw",
                "--model",
                str(tmp_path / "m"),
                "--metadata",
                str(tmp_path / "one.jsonl"),
                "--seed",
                "5",
                "--threads",
                "1",
            ]
        )
    )
    shape, colour = map(
        float,
        re.search(r"named shape ([\d.]+)  named colour ([\d.]+)", capsys.readouterr().out).groups(),
    )
    (o,) = shapes.sample_scene(meta, np.random.default_rng(5))
    prefix = umm.tokenizer(umm.t2i_prompt(meta["prompt"]), add_special_tokens=False).input_ids
    ids = prefix + [umm.image_offset] * (o.row * shapes.GRID + o.col)  # code 0 = empty cell
    with torch.no_grad():
        p = umm.lm(input_ids=torch.tensor([ids])).logits[0, -1, umm.image_offset :].softmax(-1)
    kinds = make.KINDS
    is_obj = torch.tensor([k is not None for k in kinds])
    heart = torch.tensor([k is not None and k[0] == "heart" for k in kinds])
    heart_size = torch.tensor([k is not None and k[0] == "heart" and k[2] == o.size for k in kinds])
    assert shape == pytest.approx((p[heart].sum() / p[is_obj].sum()).item(), abs=1e-3)
    assert colour == pytest.approx(
        (p[make.KIND_ID[("heart", "green", o.size)]] / p[heart_size].sum()).item(), abs=1e-3
    )


@pytest.mark.parametrize("empty_weight", [1.0, 0.05])
def test_lm_loss_weighs_each_empty_cell_target_by_empty_weight_and_every_other_target_by_one(
    empty_weight,
):
    """make_tiny_umm.lm_loss on one T2I and one I2T sequence: per sequence, the sum of weight x
    log-prob and the sum of weights, recomputed here token by token from the HF model's full logits
    (each target over its own mode's slice of the vocabulary), with weight empty_weight on the empty
    code (code 0) and 1 elsewhere."""
    umm = TinyUMM.random(seed=0, hidden=64, layers=2, num_codes=len(make.KINDS))
    rng = np.random.default_rng(0)
    meta = {
        "tag": "colors",
        "include": [{"class": "star", "count": 1, "color": "blue"}],
        "prompt": "a photo of a blue star",
    }
    t2i = make.t2i_example(umm, meta, rng)
    ctx = umm.tokenizer(
        umm.caption_prompt_text(umm.codes_to_text(torch.zeros(16, dtype=torch.long)), "describe"),
        add_special_tokens=False,
    ).input_ids
    i2t = (
        ctx + umm.tokenizer("a photo of a star<|im_end|>", add_special_tokens=False).input_ids,
        len(ctx),
    )
    with torch.no_grad():
        lp, n = make.lm_loss(umm, [t2i, i2t], empty_weight)
        for k, (ids, start) in enumerate([t2i, i2t]):
            logits = umm.lm(input_ids=torch.tensor([ids])).logits[0]
            want_lp = want_n = 0.0
            for j in range(start, len(ids)):
                row, t = logits[j - 1], ids[j]
                img = t >= umm.image_offset
                row = (
                    row[umm.image_offset : umm.image_offset + len(make.KINDS)]
                    if img
                    else row[: umm.image_offset]
                )
                w = empty_weight if t == umm.image_offset else 1.0
                want_lp += w * row.log_softmax(-1)[t - umm.image_offset if img else t].item()
                want_n += w
            assert lp[k].item() == pytest.approx(want_lp, rel=1e-4) and n[
                k
            ].item() == pytest.approx(want_n)
    assert (n[0] < 16) == (empty_weight < 1)  # the T2I scene is one object and 15 empty cells


def test_warm_ups_last_their_share_of_the_steps_then_the_loss_is_plain_nll_over_every_line(
    monkeypatch,
):
    """train_lm --empty-weight 0.05 --empty-until 0.5 --colour-first 0.25 over 4 steps: lm_loss gets
    0.05 on steps 0-1 and 1 after; T2I draws only the one-object lines that name a colour on step 0
    (not color_attr's two) and every line after."""
    seen, lines = [], []

    def spy(umm, seqs, empty_weight=1.0):
        seen.append(empty_weight)
        return real(umm, seqs, empty_weight)

    def batch_spy(umm, metas, *args, **kw):
        lines.append(len(metas))
        return real_batch(umm, metas, *args, **kw)

    real, real_batch = make.lm_loss, make.lm_batch
    monkeypatch.setattr(make, "lm_loss", spy)
    monkeypatch.setattr(make, "lm_batch", batch_spy)
    umm = TinyUMM.random(seed=0, hidden=32, layers=1, num_codes=len(make.KINDS))
    metas = make.read_jsonl(os.path.join(ROOT, "prompts/train.jsonl"))
    metas = [m for m in metas if m["tag"] == "colors"][:2] + [
        m for m in metas if m["tag"] == "color_attr"
    ][:3]
    make.train_lm(
        umm,
        metas,
        [("geneval", "colors")],
        np.random.default_rng(0),
        steps=4,
        batch=4,
        t2i_frac=0.5,
        lr=1e-3,
        rank_weight=0.0,
        empty_weight=0.05,
        empty_until=0.5,
        colour_first=0.25,
    )
    assert seen == [0.05, 0.05, 1.0, 1.0]
    coloured = sum(
        len(m["include"]) == 1 and m["include"][0]["count"] == 1 and "color" in m["include"][0]
        for m in metas
    )
    assert 0 < coloured < len(metas) and lines == [coloured] + [len(metas)] * 3


@pytest.mark.parametrize(
    "colour_share, pair_share, later_tags",
    [(0.0, 0.0, {"colors", "color_attr"}), (1.0, 0.0, {"colors"}), (0.0, 1.0, {"color_attr"})],
)
def test_after_the_colour_curriculum_the_kept_shares_of_t2i_stay_on_their_lines(
    monkeypatch, colour_share, pair_share, later_tags
):
    """train_lm --colour-first 0.25 --colour-share S --pair-share P, 2 T2I sequences a step over 8
    steps: step 0's T2I prompts are all one-object colour lines; after it every line is offered (S =
    P = 0: color_attr's 3 of 5 come back), S = 1 keeps every T2I prompt on the one-object colour
    lines and P = 1 on the two-colour lines (color_attr's). Read off the sequences' own tokens."""
    metas = make.read_jsonl(os.path.join(ROOT, "prompts/train.jsonl"))
    metas = [m for m in metas if m["tag"] == "colors"][:2] + [
        m for m in metas if m["tag"] == "color_attr"
    ][:3]
    umm = TinyUMM.random(seed=0, hidden=32, layers=1, num_codes=len(make.KINDS))
    prompts_of = {
        umm.tokenizer.decode(
            umm.tokenizer(umm.t2i_prompt(m["prompt"]), add_special_tokens=False).input_ids
        ): m["tag"]
        for m in metas
    }
    tags = []

    def batch_spy(*args, **kw):
        seqs, i2t = real_batch(*args, **kw)
        tags.append([prompts_of[umm.tokenizer.decode(ids[:start])] for ids, start in seqs])
        return seqs, i2t

    real_batch = make.lm_batch
    monkeypatch.setattr(make, "lm_batch", batch_spy)
    make.train_lm(
        umm,
        metas,
        [("geneval", "colors")],
        np.random.default_rng(0),
        steps=8,
        batch=4,
        t2i_frac=0.5,
        lr=1e-3,
        rank_weight=0.0,
        colour_first=0.125,
        colour_share=colour_share,
        pair_share=pair_share,
    )
    assert tags[0] == ["colors", "colors"]
    later = [t for step in tags[1:] for t in step]
    assert len(later) == 14 and set(later) == later_tags


def test_a_draw_probe_inside_train_lm_logs_draw_rates_and_leaves_the_run_unchanged(capsys):
    """train_lm --draw-every 2 over 3 steps: the same weights as without the probe (its own rng,
    train mode restored), and a probe line after steps 0 and 2; draw_rates of the trained LM is what
    the last line says."""
    metas = make.read_jsonl(os.path.join(ROOT, "prompts/train.jsonl"))
    metas = [m for m in metas if m["tag"] == "colors"][:3] + [
        m for m in metas if m["tag"] == "two_object"
    ][:2]
    trained = []
    for every in (0, 2):
        umm = TinyUMM.random(seed=0, hidden=32, layers=1, num_codes=len(make.KINDS))
        # dropout: a probe that left eval mode on would change the next steps
        for layer in umm.lm.model.layers:
            layer.self_attn.attention_dropout = 0.5
        make.train_lm(
            umm,
            metas,
            [("geneval", "colors")],
            np.random.default_rng(0),
            steps=3,
            batch=4,
            t2i_frac=0.5,
            lr=1e-2,
            rank_weight=1.0,
            draw_every=every,
        )
        trained.append(umm)
    a, b = (dict(u.lm.named_parameters()) for u in trained)
    assert all(torch.equal(a[k], b[k]) for k in a)
    probes = [line for line in capsys.readouterr().out.splitlines() if "] draw " in line]
    assert len(probes) == 2  # after steps 0 and 2 (the last)
    shape, colour, n = make.draw_rates(trained[1], metas, n=50)["colors"]
    assert n == 3 and f"colors shape {shape:.3f} colour {colour:.3f}" in probes[-1]


def test_binding_rates_read_each_objects_own_cell_of_the_teacher_forced_scene():
    """binding_rates against a loop that feeds the LM only the codes before each object's cell (no
    look-ahead) and reads its next-code distribution there: the same own-colour and
    other-named-colour probabilities."""
    from world import shapes

    metas = [
        m
        for m in make.read_jsonl(os.path.join(ROOT, "prompts/train.jsonl"))
        if m["tag"] == "color_attr"
    ][:3]
    umm = TinyUMM.random(seed=0, hidden=32, layers=1, num_codes=len(make.KINDS))
    own, other, n = make.binding_rates(umm, metas, seed=7)
    rng, want = np.random.default_rng(7), []
    umm.set_generation_mode("image")
    for meta in metas:
        objs = shapes.sample_scene(meta, rng)
        codes = make.scene_codes(objs)
        named = {r["color"] for r in meta["include"]}
        for o in objs:
            cell = o.row * make.GRID + o.col
            ids = umm.tokenizer(umm.t2i_prompt(meta["prompt"]), add_special_tokens=False).input_ids
            ids += [umm.image_offset + k for k in codes[:cell]]
            with torch.no_grad():
                p = torch.softmax(
                    umm.logits(
                        umm.lm.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
                    ),
                    -1,
                )
            colour = {c: p[make.KIND_ID[(o.shape, c, o.size)]].item() for c in shapes.COLORS}
            total = sum(colour.values())
            want.append(
                (colour[o.color] / total, sum(colour[c] for c in named - {o.color}) / total)
            )
    assert n == 3 and len(want) >= 6
    assert np.allclose([own, other], np.mean(want, 0), atol=1e-5)


def test_make_tiny_umm_train_refuses_bad_flags_and_a_non_empty_out_before_writing_anything(
    tmp_path, capsys
):
    """One error line naming every bad flag, exit 2, nothing created; a folder that holds anything
    is never a target."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "lm").mkdir()
    for argv, words in [
        (["--t2i-frac", "1.0"], ["--t2i-frac"]),
        (["--steps", "0", "--empty-weight", "0"], ["--steps", "--empty-weight"]),
        (["--colour-first", "1.5", "--draw-every", "-1"], ["--colour-first", "--draw-every"]),
        (["--colour-share", "0.6", "--pair-share", "0.5"], ["--colour-share + --pair-share"]),
        (
            ["--lm-from", str(tmp_path / "full"), "--vision-from", "x"],
            [
                "--vision-from, --semantic-codes and --semantic-head do not apply",
                "not a tiny UMM folder",
            ],
        ),
        (
            ["--lm-from", str(tmp_path / "full"), "--hidden", "256", "--decode-steps", "3"],
            ["--lm-from keeps the folder's model: --hidden, --decode-steps do not apply"],
        ),
    ]:
        p = make.parser()
        a = p.parse_args(["train", "--out", str(tmp_path / "new")] + argv)
        with pytest.raises(SystemExit) as e:
            make.check_train_args(p, a)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and all(w in err for w in words), err
    p = make.parser()
    with pytest.raises(SystemExit):
        make.check_train_args(p, p.parse_args(["train", "--out", str(tmp_path / "full")]))
    assert "not empty" in capsys.readouterr().err
    (tmp_path / "full" / "bad.jsonl").write_text(
        '{"tag": "colors", "include": []}\n{"tag": "colors", "inc\n'
    )
    for prompts, words in [
        (tmp_path / "full" / "bad.jsonl", "not GenEval-format JSON lines"),
        (tmp_path / "full" / "none.jsonl", "No such file"),
        (tmp_path / "full", "Is a directory"),
    ]:
        with pytest.raises(SystemExit) as e:
            make.check_train_args(
                p,
                p.parse_args(["train", "--out", str(tmp_path / "new"), "--prompts", str(prompts)]),
            )
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            e.value.code == 2
            and f"--prompts {prompts}: {words}" in err[-1]
            and "Traceback" not in "".join(err)
        )
    assert sorted(os.listdir(tmp_path)) == ["full"]
    # good flags pass
    make.check_train_args(p, p.parse_args(["train", "--out", str(tmp_path / "new")]))


def test_shipped_bases_share_one_vision_stage_differ_in_the_lm_and_fit_in_20_mb():
    """checkpoints/tiny-umm and tiny-umm-weak: the same image tokenizer and decoder tensor for
    tensor (the weak base is trained --vision-from the normal one, so only its LM differs), and all
    weights under 20 MB."""
    from safetensors.torch import load_file

    root = os.path.join(ROOT, "checkpoints")
    normal, weak = (os.path.join(root, name) for name in ("tiny-umm", "tiny-umm-weak"))
    for part in (
        "image_tokenizer/diffusion_pytorch_model.safetensors",
        "decoder/diffusion_pytorch_model.safetensors",
    ):
        a, b = load_file(os.path.join(normal, part)), load_file(os.path.join(weak, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    lm_a, lm_b = (load_file(os.path.join(m, "lm", "model.safetensors")) for m in (normal, weak))
    assert lm_a.keys() == lm_b.keys() and not all(torch.equal(lm_a[k], lm_b[k]) for k in lm_a)
    with open(os.path.join(weak, "train_args.json")) as f:
        assert json.load(f)["vision_from"] == "checkpoints/tiny-umm"
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)
    assert size < 20 * 2**20


def test_train_lm_from_a_folder_trains_only_its_lm_further(tmp_path):
    """train --lm-from X: starts from X's LM, tokenizer, decoder and decode steps, trains the LM
    only, and records where it began."""
    from safetensors.torch import load_file

    start, out = tmp_path / "start", tmp_path / "next"
    TinyUMM.random(0, hidden=32, layers=1, num_codes=len(make.KINDS)).save_pretrained(str(start))
    p = make.parser()
    a = p.parse_args(
        [
            "train",
            "--lm-from",
            str(start),
            "--out",
            str(out),
            "--steps",
            "1",
            "--batch",
            "2",
            "--t2i-frac",
            "0.5",
            "--draw-every",
            "0",
            "--threads",
            "1",
        ]
    )
    make.check_train_args(p, a)
    make.train(a)
    for part in (
        "image_tokenizer/diffusion_pytorch_model.safetensors",
        "decoder/diffusion_pytorch_model.safetensors",
        "lm/model.safetensors",
    ):
        before, after = load_file(str(start / part)), load_file(str(out / part))
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before) == (
            not part.startswith("lm")
        ), part
    assert json.load(open(out / "train_args.json"))["lm_from"] == str(start)
    assert (
        json.load(open(start / "tiny_umm.json"))["decode_steps"]
        == json.load(open(out / "tiny_umm.json"))["decode_steps"]
        == 10
    )


def test_make_tiny_umm_train_defaults_are_the_shipped_default_base_recipe():
    """`world/make_tiny_umm.py train --out checkpoints/tiny-umm --seed 0 --threads 1` is the default
    base's recipe: every setting its train_args.json records, except where it was written and where
    its vision stage came from, is the parser's default (and the weak base's differ, so the check
    can fail)."""
    defaults = vars(make.parser().parse_args(["train", "--out", "X", "--threads", "1"]))
    for name, differs in (("tiny-umm", False), ("tiny-umm-weak", True)):
        with open(os.path.join(ROOT, "checkpoints", name, "train_args.json")) as f:
            recorded = json.load(f)
        keys = set(recorded) - {"out", "vision_from"}
        assert keys <= set(defaults)
        assert any(recorded[k] != defaults[k] for k in keys) == differs, name
