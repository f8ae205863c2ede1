"""The probe reward (gvu.py --probe-every): the mean reward on fixed training prompts with fixed
sampling seeds, logged every N steps, so a curve can show learning that the per-step reward (new
prompts, new seeds) hides."""

import json
import os

import pytest
import torch

import gvu
from models.tiny_umm import TinyUMM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle"]


def run(tmp_path, out, *extra):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS + ["a photo of a circle"]) + "\n")
    flags = ["--model", os.path.join(ROOT, "checkpoints", "tiny-umm"), "--prompts",
             tmp_path / "p.txt", "--batch-prompts", 2, "--group-size", 2, "--probe-every", 2,
             "--save-every", 2, "--seed", 3, "--out", tmp_path / out, *extra]  # fmt: skip
    assert gvu.main([str(f) for f in flags]) is not None  # the log's path: it finished
    return [json.loads(line) for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]


def test_probe_uses_fixed_seeds_no_step_uses_and_the_same_policy_gives_the_same_probe(
    tmp_path, monkeypatch, one_thread
):
    """Every probe samples step 0's prompts with one seed that no training step of the run samples
    with; at step 0 (LoRA B = 0: the base model) it equals the base's mean reward for those samples,
    computed here from the rollout's own seed; and a resumed run logs the same probe as an
    uninterrupted one (the same policy, the same probe)."""
    calls, real = [], gvu.rollout

    def spy(*a, **k):  # rollout(umm, prompts, G, temperature, top_k, min_p, cfg_scale, generator)
        calls.append((list(a[1]), a[7].initial_seed()))
        return real(*a, **k)

    monkeypatch.setattr(gvu, "rollout", spy)
    rows = run(tmp_path, "a", "--steps", 4)
    assert [r["step"] for r in rows if "probe_reward" in r] == [0, 2]
    probes, steps = [calls[0], calls[3]], calls[1:3] + calls[4:]  # probe, 0, 1, probe, 2, 3
    assert probes[0] == probes[1] and probes[0][0] == steps[0][0]  # fixed: step 0's prompts
    assert probes[0][1] not in {seed for _, seed in steps} and len({s for _, s in steps}) == 4

    umm, seed = TinyUMM.from_pretrained(os.path.join(ROOT, "checkpoints", "tiny-umm")), probes[0][1]
    with torch.no_grad():
        ro = real(umm, probes[0][0], 2, generator=torch.Generator().manual_seed(seed))
        images = umm.decode_images(ro["codes"], torch.Generator().manual_seed(seed))
        prompts = [p for p in probes[0][0] for _ in range(2)]
        logp, mask = gvu.caption_token_logprobs(
            umm, images, prompts, "Describe the image in detail."
        )
    want = torch.exp((logp * mask).sum(1) / mask.sum(1)).mean().item()
    assert rows[0]["probe_reward"] == pytest.approx(want, rel=1e-5)

    run(tmp_path, "b", "--steps", 2)
    resumed = run(tmp_path, "b", "--steps", 4, "--resume")
    assert resumed[2]["probe_reward"] == rows[2]["probe_reward"]
