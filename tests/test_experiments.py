"""tools/experiments.py, the figures and experiments around a GvU run: audit (and its group AUC),
failures, the oracle reward and oracle-train, the where probe and its cell embedding, and token-view
with its prompt edits. CPU only, tiny models; each test compares against hand-written values or an
independent computation."""

import json
import os
import re

import pytest
import torch
from PIL import Image

import eval_geneval as E
from models.adapters import InputError
from models.tiny_umm import TinyUMM
from standins import INSTRUCTION, SHIPPED, TINY_PROMPTS, write_lines
from tools import experiments
from world import geneval_rules as R
from world import shapes


# --- audit and failures ---------------------------------------------------------------------------
def test_group_auc_counts_pairs_where_correct_images_score_higher():
    """AUC = share of (correct, wrong) pairs ordered right, ties half; undefined when the scorer
    sees no difference."""
    assert experiments.group_auc([0.9, 0.2, 0.5, 0.5], [True, False, True, False]) == pytest.approx(
        (1 + 1 + 1 + 0.5) / 4
    )
    assert experiments.group_auc([0.1, 0.2], [True, True]) is None


def test_generate_then_score_and_audit_on_a_tiny_model(tmp_path):
    """generate writes GenEval's layout that score --scorer shapes reads; audit reports every tag it
    saw."""
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
    meta_file = write_lines(tmp_path / "m.jsonl", metas)
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
    experiments.main(
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


def test_failures_split_wrong_images_into_a_missing_object_or_a_wrong_attribute():
    """experiments.failure_counts on the pixel oracle's verdicts for four renders of "a red circle
    and a blue square", each built to be right or wrong in a known way: right; square missing;
    square green; circle missing and square green. Wrong: 3; of them, an object missing: 2.
    lacks_an_object also reads the count rule's reason for multi-word classes and counts above one,
    and not the colour rule's."""
    meta = shapes.make_line(
        "color_attr", [shapes.item("circle", color="red"), shapes.item("square", color="blue")]
    )
    circle, square, green = (
        shapes.Obj("circle", "red", "large", 0, 0),
        shapes.Obj("square", "blue", "large", 2, 2),
        shapes.Obj("square", "green", "large", 2, 2),
    )
    scenes = [
        ([circle, square], True, False),
        ([circle], False, True),
        ([circle, green], False, False),
        ([green], False, True),
    ]
    rows = []
    for objects, correct, missing in scenes:
        ok, reason = shapes.oracle(shapes.render(objects), meta)
        assert ok == correct and (not ok and R.lacks_an_object(reason)) == missing, reason
        rows.append({"tag": meta["tag"], "correct": ok, "reason": reason})
    assert experiments.failure_counts(rows) == {"color_attr": (4, 3, 2)}
    assert R.lacks_an_object(
        "expected traffic light>=3, found 2; expected red car>=1, found 1 blue"
    )
    assert not R.lacks_an_object("expected red traffic light>=1, found 1 green, 1 red")


# --- the oracle's reward (oracle-train) -----------------------------------------------------------
def test_oracle_reward_fn_gives_one_to_correct_renders_and_zero_to_wrong_ones(tmp_path):
    """experiments.oracle_reward_fn (oracle-train's gvu reward_fn) returns the oracle's verdict per
    image as 1.0 / 0.0 for renders whose truth is known: right colour / count pass, wrong ones fail;
    an unknown prompt is an InputError."""
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
    reward_fn = experiments.oracle_reward_fn(str(write_lines(tmp_path / "m.jsonl", metas)))
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
    """oracle-train runs gvu.py end to end with reward = the pixel oracle's verdict (the verdicts
    themselves: test_oracle_reward_fn_gives_one_to_correct_renders_and_zero_to_wrong_ones)."""
    metas = [
        {
            "tag": "colors",
            "include": [{"class": "circle", "count": 1, "color": "red"}],
            "prompt": "a photo of a red circle",
        }
    ]
    meta_file = write_lines(tmp_path / "m.jsonl", metas)
    (tmp_path / "p.txt").write_text("a photo of a red circle\n")
    experiments.main(
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


# --- where ----------------------------------------------------------------------------------------
def test_cell_embedding_adds_each_codes_row_plus_column_and_leaves_words_alone():
    """tools/experiments.py where --cell-embedding: code j of every image gets
    row(j // 4) + col(j % 4), scaled to the asked norm; words (the instruction, the caption) and the
    hook's removal leave embeddings as they were."""
    umm = TinyUMM.random(seed=0, hidden=64, layers=2)
    codes = torch.randint(
        0, umm.image_vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    text = (
        umm.caption_prompt_text(umm.codes_to_text(codes[0]), "describe")
        + umm.codes_to_text(codes[1])
        + " a circle"
    )
    ids = torch.tensor([umm.tokenizer(text, add_special_tokens=False).input_ids])
    embed = umm.lm.get_input_embeddings()
    before = embed(ids).detach()
    handle = experiments.add_cell_embedding(umm, scale=2.0)
    added = (embed(ids).detach() - before)[0]
    handle.remove()
    assert torch.equal(embed(ids), before)
    is_code = ids[0] >= umm.image_offset
    assert is_code.sum() == 32 and added[~is_code].abs().max() == 0
    cells = added[is_code].reshape(2, 4, 4, -1)  # (image, row, col, D)
    torch.testing.assert_close(cells[0], cells[1])  # the same cell in either image
    row0, col0 = cells[0, :, :1] - cells[0, :1, :1], cells[0, :1, :] - cells[0, :1, :1]
    # additive: row part + column part
    torch.testing.assert_close(cells[0], cells[0, :1, :1] + row0 + col0)
    assert 1.5 < cells[0].norm(dim=-1).mean() < 2.5 and (cells[0, 0, 0] - cells[0, 1, 2]).norm() > 1


def test_where_fine_tunes_a_copy_and_prints_how_often_the_named_half_wins(capsys, one_thread):
    """tools/experiments.py where on the shipped checkpoint: one step, two scenes; nothing is
    written next to it."""
    folder = SHIPPED
    listing = sorted(os.listdir(folder))
    experiments.main(
        [
            "where",
            "--model",
            folder,
            "--steps",
            "1",
            "--batch",
            "2",
            "--scenes",
            "2",
            "--cell-embedding",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "where step    0" in out and sorted(os.listdir(folder)) == listing
    alone, among = map(float, re.search(r"named ([\d.]+) alone, ([\d.]+) among", out).groups())
    assert 0 < alone < 1 and 0 < among < 1


# --- token-view -----------------------------------------------------------------------------------
def test_word_edits_change_one_attribute_word_and_fix_the_article():
    """Edits of a shapes prompt: each colour / count / shape / relation / region / size alternative,
    hand-listed."""
    edits = experiments.word_edits(
        "a photo of an orange circle left of two squares on the right",
        experiments.word_classes(shapes_world=True),
    )
    by_class = {}
    for name, text in edits:
        by_class.setdefault(name, []).append(text)
    stem = "a photo of {} circle left of two squares on the right"
    # the v2 world: GenEval's 10 colours in GenEval's order, counts up to seven, 8 shapes (plural
    # "crosses")
    assert by_class["colour"] == [
        stem.format(f"{'an' if c[0] in 'aeiou' else 'a'} {c}")
        for c in ["red", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
    ]
    assert by_class["count"] == [
        f"a photo of an orange circle left of {n} squares on the right"
        for n in ["three", "four", "five", "six", "seven"]
    ]
    assert by_class["shape"] == [
        f"a photo of an orange {s} left of two squares on the right"
        for s in ["square", "triangle", "diamond", "cross", "ring", "star", "heart"]
    ] + [
        f"a photo of an orange circle left of two {s} on the right"
        for s in ["circles", "triangles", "diamonds", "crosses", "rings", "stars", "hearts"]
    ]
    assert by_class["relation"] == [
        f"a photo of an orange circle {r} two squares on the right"
        for r in ["right of", "above", "below"]
    ]
    assert by_class["region"] == [
        f"a photo of an orange circle left of two squares on the {r}"
        for r in ["left", "above", "below"]
    ]
    assert set(by_class) == {"colour", "count", "shape", "relation", "region"}


def test_token_view_cli_draws_the_grid_and_prints_the_edit_table_of_its_folder(tmp_path, capsys):
    """tools/experiments.py token-view end to end on a generate folder: it writes the PNG, and its
    printed edit table is edit_table's on the same images and prompts (the CLI once crashed on a
    flag its parser lacked)."""
    metas = [
        {
            "tag": "colors",
            "include": [{"class": "circle", "count": 1, "color": "red"}],
            "prompt": TINY_PROMPTS[0],
        },
        {
            "tag": "counting",
            "include": [{"class": "square", "count": 2}],
            "prompt": TINY_PROMPTS[1],
        },
    ]
    meta_file = write_lines(tmp_path / "m.jsonl", metas)
    gen = tmp_path / "gen"
    E.main(["generate", "--metadata", str(meta_file), "--out", str(gen), "--n", "2", "--any-class"])
    capsys.readouterr()
    assert experiments.main(
        [
            "token-view",
            str(gen),
            "--model",
            "tiny-random",
            "--edits",
            "--out",
            str(tmp_path / "tv.png"),
        ]
    ) in (None, 0)
    assert Image.open(tmp_path / "tv.png").size[0] > 0
    printed = {
        line.split("|")[1].strip(): line.split("|")[2:6]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and not line.startswith("| word class")
    }
    umm = TinyUMM.random(seed=0)
    images = [
        Image.open(gen / f"0000{i}" / "samples" / f"000{j}.png") for i in range(2) for j in range(2)
    ]
    want = experiments.edit_table(
        umm, images, [m["prompt"] for m in metas for _ in range(2)], INSTRUCTION
    )
    assert set(printed) == set(want) and want
    for name, row in want.items():
        edits, reward, _, drop = (c.strip() for c in printed[name])
        assert int(edits) == row["edits"] and float(reward) == pytest.approx(
            row["reward"], abs=6e-4
        )
        assert float(drop) == pytest.approx(row["drop"], abs=6e-4)
