"""tools/loggers.py, what a run shows besides log.jsonl: the sample grids with each prompt's words
shaded by the reward's own per-token terms, and the optional trackers (--report-to). CPU only, tiny
random models; each test compares against an independent computation (the official per-token loop,
hand-written values, tensorboard's own event reader)."""

import math
import os
import sys

import pytest
import torch
from PIL import Image, ImageDraw

import gvu
from models.tiny_umm import TinyUMM
from standins import TINY_PROMPTS, images_for, log_rows, run_main, tiny_token_logprobs, write_lines
from tools import loggers


@pytest.fixture
def fast_decoder(monkeypatch):
    """Runs through gvu.main decode codes to flat images: these tests check plumbing, and the tiny
    UMM's diffusion decoder is most of a CPU step."""
    monkeypatch.setattr(
        TinyUMM,
        "decode_images",
        lambda self, codes, generator=None, prompts=None: [
            Image.new("RGB", (self.image_size,) * 2, (int(c[0]) * 3, 90, 160)) for c in codes
        ],
    )


def small_run(tmp_path, out, *extra):
    prompts = write_lines(tmp_path / "prompts.txt", TINY_PROMPTS[:2])
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


# --- the per-token view ---------------------------------------------------------------------------
def test_shaded_tokens_are_the_rewards_own_terms(umm):
    """The grid's per-token probabilities are the default reward's terms: equal to a slow per-token
    loop, and the reward is their geometric mean; the token texts are the prompt's words plus the
    end-of-turn token."""
    prompts = TINY_PROMPTS[:3]
    images = images_for(umm, len(prompts))
    args = gvu.Args()
    rewards, token_logp, mask = gvu.intrinsic_rewards(umm, images, prompts, args)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        with torch.no_grad():
            slow = tiny_token_logprobs(umm, [image], [prompt])[0].tolist()
        texts = loggers.token_texts(umm.tokenizer, gvu.answer_ids(umm, [prompt])[0])
        assert texts == prompt.split() + ["<|im_end|>"]  # the tiny UMM is word-level
        boxes = loggers.token_layout(measure, texts, token_logp[i], width=92)
        assert [b[2] for b in boxes] == texts
        assert [b[3] for b in boxes] == pytest.approx([math.exp(s) for s in slow], rel=1e-5)
        assert rewards[i].item() == pytest.approx(math.exp(sum(slow) / len(slow)), rel=1e-5)


def test_grid_shades_white_to_red_and_frames_the_least_likely_token(tmp_path):
    """Each token box is filled (255, 60 + 195p, 60 + 195p) and only the least likely token has a
    black frame."""
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
        # the box's top-left pixel: frame or fill
        corner = grid.getpixel((2 + int(x), 24 + px + int(y)))
        shade = int(60 + 195 * p)
        assert corner == ((0, 0, 0) if p == min(probs) else (255, shade, shade))


def test_grid_uses_the_steps_kept_terms_and_a_fork_reward_needs_none(
    tmp_path, monkeypatch, fast_decoder
):
    """train() shades the grid with the log-probs its reward_fn returned (no second reward pass),
    and a reward_fn that returns only (N,) rewards still trains and writes grids (without token
    shading)."""
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

    assert run_main(*small_run(tmp_path, tmp_path / "a"), reward_fn=recording_reward) is None
    assert len(calls) == 2 and len(drawn) == 2  # one reward pass per step, the grid adds none
    assert all(d is r[1] for d, r in zip(drawn, returned))

    drawn.clear()
    assert (
        run_main(
            *small_run(tmp_path, tmp_path / "b"),
            reward_fn=lambda umm, ims, ps, args: torch.rand(len(ims)),
        )
        is None
    )
    assert drawn == [None, None] and sorted(os.listdir(tmp_path / "b" / "samples")) == [
        "step_00000.png",
        "step_00001.png",
    ]


# --- trackers -------------------------------------------------------------------------------------
def test_tensorboard_run_is_read_back_by_tensorboards_event_reader(tmp_path, fast_decoder):
    """--report-to tensorboard: every log.jsonl scalar, at its step and value, and the sample grids
    as images."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert run_main(*small_run(tmp_path, out, "--report-to", "tensorboard")) is None
    rows = log_rows(out)
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
    msg = run_main(*small_run(tmp_path, out, "--report-to", backend))
    assert msg == f"error: --report-to {backend} needs the {backend} package: pip install {backend}"
    assert not out.exists()


def test_only_the_main_process_logs(tmp_path):
    """A non-main process gets the no-op logger: its calls write nothing, whatever --report-to
    says."""
    logger = loggers.make_logger("tensorboard", str(tmp_path), {}, is_main=False)
    logger.scalars({"step": 0, "reward_mean": 0.5}, 0)
    logger.image("samples", Image.new("RGB", (4, 4)), 0)
    logger.close()
    assert os.listdir(tmp_path) == []


def test_wandb_offline_run_logs_scalars_and_grids(tmp_path, monkeypatch, fast_decoder):
    """--report-to wandb with WANDB_MODE=offline and no network: an offline run with the sample
    grids as media."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    assert run_main(*small_run(tmp_path, out, "--report-to", "wandb")) is None
    [run] = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    media = os.listdir(out / "wandb" / run / "files" / "media" / "images")
    assert sorted(m.split("_")[1] for m in media) == ["0", "1"]
