"""The probe reward (gvu.py --probe-every): the mean reward on fixed training prompts with fixed sampling seeds,
logged every N steps, so a curve can show learning that the per-step reward (new prompts, new seeds) hides."""

import json
import os

import pytest
import torch

import gvu
from models.tiny_umm import TinyUMM

PROMPTS = [
    "a photo of a red circle",
    "a photo of two squares",
    "a photo of a blue triangle",
    "a photo of a circle",
]


def test_probe_is_logged_every_n_steps_and_equals_the_base_reward_on_the_first_prompts_at_step_0(
    tmp_path, one_thread
):
    """Rows 0 and 2 (every 2) carry probe_reward, row 3 does not; at step 0 (LoRA B = 0: the base) it equals the mean
    intrinsic reward of the first step's prompts sampled with the probe's fixed seed, computed here by hand."""
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    model = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "tiny-umm"
    )
    args = [
        "--model",
        model,
        "--prompts",
        str(tmp_path / "p.txt"),
        "--steps",
        "4",
        "--batch-prompts",
        "2",
        "--group-size",
        "2",
        "--probe-every",
        "2",
        "--seed",
        "3",
        "--out",
        str(tmp_path / "run"),
    ]
    gvu.main(args)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "probe_reward" in r] == [0, 2]
    umm = TinyUMM.from_pretrained(model)
    batch = gvu.prompt_batch(PROMPTS, 0, 2, 3)
    seed = 4 * 1_000_003 - 1
    with torch.no_grad():
        ro = gvu.rollout(umm, batch, 2, generator=torch.Generator().manual_seed(seed))
        images = umm.decode_images(ro["codes"], torch.Generator().manual_seed(seed))
        logp, mask = gvu.caption_token_logprobs(
            umm, images, [p for p in batch for _ in range(2)], "Describe the image in detail."
        )
    want = torch.exp((logp * mask).sum(1) / mask.sum(1)).mean().item()
    assert rows[0]["probe_reward"] == pytest.approx(want, rel=1e-5)
    assert rows[0]["probe_reward"] != pytest.approx(
        rows[0]["reward_mean"], rel=1e-3
    )  # same prompts, its own seed
