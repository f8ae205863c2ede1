"""Tests for what the reward shows: the per-token view of the sample grids, tools/experiments.py token-view's prompt
edits, and the optional trackers (--report-to). CPU only, tiny random models; each test compares against an
independent computation (a slow per-token loop, hand-written values, tensorboard's own event reader)."""

import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import eval_geneval
from tools import experiments
import gvu
from tools import loggers
from conftest import write_jsonl
from models.tiny_umm import TinyUMM

PROMPTS = [
    "a photo of a red circle",
    "a photo of two squares",
    "a photo of a blue triangle left of a large circle",
]
INSTRUCTION = "Describe the image in detail."


@pytest.fixture(scope="module")
def umm():
    return TinyUMM.random(seed=0, hidden=64, layers=2)


def images_for(umm, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return umm.decode_images(torch.randint(0, umm.image_vocab_size, (n, 16), generator=g), g)


def slow_token_logprobs(umm, image, prompt):
    """One full uncached forward per answer token (the official code's loop): [log p(T_j | image, T_<j)]."""
    tok = umm.tokenizer
    ctx = tok(umm.caption_prompt(image, INSTRUCTION), add_special_tokens=False).input_ids
    ans = tok(prompt + "<|im_end|>", add_special_tokens=False).input_ids
    return [
        F.log_softmax(
            umm.lm(input_ids=torch.tensor([ctx + ans[:j]]))
            .logits[0, -1, : umm.image_offset]
            .double(),
            -1,
        )[a].item()
        for j, a in enumerate(ans)
    ]


def run_main(argv, **kw):
    """Run gvu.main in-process; return the SystemExit message (None if it finished)."""
    try:
        gvu.main(argv, **kw)
    except SystemExit as e:
        return e.code
    return None


@pytest.fixture
def fast_decoder(monkeypatch):
    """Runs through gvu.main decode codes to flat images: these tests check plumbing, and the tiny UMM's
    diffusion decoder is most of a CPU step."""
    monkeypatch.setattr(
        TinyUMM,
        "decode_images",
        lambda self, codes, generator=None, prompts=None: [
            Image.new("RGB", (self.image_size,) * 2, (int(c[0]) * 3, 90, 160)) for c in codes
        ],
    )


def small_run(tmp_path, out, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red circle\na photo of two squares\n")
    return [
        "--model",
        "tiny-random",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-prompts",
        "2",
        "--group-size",
        "2",
        "--sample-every",
        "1",
        "--probe-every",
        "0",
        *extra,
    ]


# --- the per-token view ---------------------------------------------------------------------
def test_shaded_tokens_are_the_rewards_own_terms(umm):
    """The grid's per-token probabilities are the default reward's terms: equal to a slow per-token loop, and
    the reward is their geometric mean; the token texts are the prompt's words plus the end-of-turn token."""
    images = images_for(umm, len(PROMPTS))
    args = gvu.Args()
    rewards, token_logp, mask = gvu.intrinsic_rewards(umm, images, PROMPTS, args)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
        with torch.no_grad():
            slow = slow_token_logprobs(umm, image, prompt)
        texts = loggers.token_texts(umm.tokenizer, gvu.answer_ids(umm, [prompt])[0])
        assert texts == prompt.split() + ["<|im_end|>"]  # the tiny UMM is word-level
        boxes = loggers.token_layout(measure, texts, token_logp[i], width=92)
        assert [b[2] for b in boxes] == texts
        assert [b[3] for b in boxes] == pytest.approx([math.exp(s) for s in slow], rel=1e-5)
        assert rewards[i].item() == pytest.approx(math.exp(sum(slow) / len(slow)), rel=1e-5)


def test_grid_shades_white_to_red_and_frames_the_least_likely_token(tmp_path):
    """Each token box is filled (255, 60 + 195p, 60 + 195p) and only the least likely token has a black frame."""
    probs = [0.9, 0.05, 0.5, 1.0]
    texts, px = ["a", "red", "circle", "<|im_end|>"], 96
    image = Image.new("RGB", (8, 8), "gray")
    grid = loggers.save_grid(
        str(tmp_path / "grid.png"),
        ["p"],
        [image],
        [0.3],
        G=1,
        px=px,
        texts=[texts],
        token_logp=torch.log(torch.tensor([probs])),
    )
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = loggers.token_layout(measure, texts, torch.log(torch.tensor(probs)), px - 4)
    for (x, y, _, _), p in zip(boxes, probs):
        corner = grid.getpixel(
            (2 + int(x), 24 + px + int(y))
        )  # the box's top-left pixel: frame or fill
        shade = int(60 + 195 * p)
        assert corner == ((0, 0, 0) if p == min(probs) else (255, shade, shade))


def test_grid_uses_the_steps_kept_terms_and_a_fork_reward_needs_none(
    tmp_path, monkeypatch, fast_decoder
):
    """train() shades the grid with the log-probs its reward_fn returned (no second reward pass), and a reward_fn
    that returns only (N,) rewards still trains and writes grids (without token shading)."""
    returned, drawn, calls = [], [], []
    real_caption, real_grid = gvu.caption_token_logprobs, loggers.save_grid
    monkeypatch.setattr(
        gvu, "caption_token_logprobs", lambda *a, **k: calls.append(1) or real_caption(*a, **k)
    )
    monkeypatch.setattr(
        loggers, "save_grid", lambda *a, **k: drawn.append(k["token_logp"]) or real_grid(*a, **k)
    )

    def recording_reward(*a):
        returned.append(gvu.intrinsic_rewards(*a))
        return returned[-1]

    assert run_main(small_run(tmp_path, tmp_path / "a"), reward_fn=recording_reward) is None
    assert len(calls) == 2 and len(drawn) == 2  # one reward pass per step, the grid adds none
    assert all(d is r[1] for d, r in zip(drawn, returned))

    drawn.clear()
    assert (
        run_main(
            small_run(tmp_path, tmp_path / "b"),
            reward_fn=lambda umm, ims, ps, args: torch.rand(len(ims)),
        )
        is None
    )
    assert drawn == [None, None] and sorted(os.listdir(tmp_path / "b" / "samples")) == [
        "step_00000.png",
        "step_00001.png",
    ]


def test_word_edits_change_one_attribute_word_and_fix_the_article():
    """Edits of a shapes prompt: each colour / count / shape / relation / region / size alternative, hand-listed."""
    edits = experiments.word_edits(
        "a photo of an orange circle left of two squares on the right",
        experiments.word_classes(shapes_world=True),
    )
    by_class = {}
    for name, text in edits:
        by_class.setdefault(name, []).append(text)
    stem = "a photo of {} circle left of two squares on the right"
    # the v2 world: GenEval's 10 colours in GenEval's order, counts up to seven, 8 shapes (plural "crosses")
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


# --- trackers -------------------------------------------------------------------------------
def test_tensorboard_run_is_read_back_by_tensorboards_event_reader(tmp_path, fast_decoder):
    """--report-to tensorboard: every log.jsonl scalar, at its step and value, and the sample grids as images."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert run_main(small_run(tmp_path, out, "--report-to", "tensorboard")) is None
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert set(events.Tags()["scalars"]) == set(rows[0]) - {"step"}
    for key in set(rows[0]) - {"step"}:
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [r["step"] for r in rows] == [0, 1]
        assert [e.value for e in logged] == pytest.approx(
            [r[key] for r in rows], rel=1e-6, abs=1e-12
        )
    assert [e.step for e in events.Images("samples")] == [0, 1]


@pytest.mark.parametrize(
    "backend, module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")]
)
def test_missing_backend_is_a_one_line_error_before_anything_is_created(
    tmp_path, monkeypatch, backend, module
):
    """Without the package, --report-to says how to install it, in one line, and writes nothing."""
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    out = tmp_path / "run"
    msg = run_main(small_run(tmp_path, out, "--report-to", backend))
    assert msg == f"error: --report-to {backend} needs the {backend} package: pip install {backend}"
    assert not out.exists()


def test_only_the_main_process_logs(tmp_path):
    """A non-main process gets the no-op logger: its calls write nothing, whatever --report-to says."""
    logger = loggers.make_logger("tensorboard", str(tmp_path), {}, is_main=False)
    logger.scalars({"step": 0, "reward_mean": 0.5}, 0)
    logger.image("samples", Image.new("RGB", (4, 4)), 0)
    logger.close()
    assert os.listdir(tmp_path) == []


def test_wandb_offline_run_logs_scalars_and_grids(tmp_path, monkeypatch, fast_decoder):
    """--report-to wandb with WANDB_MODE=offline and no network: an offline run with the sample grids as media."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    assert run_main(small_run(tmp_path, out, "--report-to", "wandb")) is None
    [run] = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    media = os.listdir(out / "wandb" / run / "files" / "media" / "images")
    assert sorted(m.split("_")[1] for m in media) == ["0", "1"]


def test_token_view_cli_draws_the_grid_and_prints_the_edit_table_of_its_folder(tmp_path, capsys):
    """tools/experiments.py token-view end to end on a generate folder: it writes the PNG, and its printed edit table is
    edit_table's on the same images and prompts (the CLI once crashed on a flag its parser lacked)."""
    metas = [
        {
            "tag": "colors",
            "include": [{"class": "circle", "count": 1, "color": "red"}],
            "prompt": PROMPTS[0],
        },
        {"tag": "counting", "include": [{"class": "square", "count": 2}], "prompt": PROMPTS[1]},
    ]
    meta_file = write_jsonl(tmp_path / "m.jsonl", metas)
    gen = tmp_path / "gen"
    eval_geneval.main(
        ["generate", "--metadata", str(meta_file), "--out", str(gen), "--n", "2", "--any-class"]
    )
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
