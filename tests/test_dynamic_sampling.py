"""DAPO's dynamic sampling (tools/experiments.py's dynamic_sampler), attached to gvu_step as its
sampler: the groups it keeps, their own rewards and codes, and its reserve prompt stream."""

import copy

import numpy as np
import pytest
import torch

import gvu
from models.tiny_umm import TinyUMM
from tools import experiments

PROMPTS = [
    "a photo of a red circle",
    "a photo of two squares",
    "a photo of a blue triangle left of a large circle",
    "a photo of a circle and a square",
]


def moved_lora(seed=1):
    """A tiny UMM, an untouched copy of its LM, and a policy whose LoRA B weights moved off zero."""
    u = TinyUMM.random(seed=seed, hidden=64, layers=2)
    u.decode_steps = 2  # the pixels' quality does not matter here; the time does
    base = copy.deepcopy(u.lm).eval()
    torch.manual_seed(seed)
    policy, _, _ = gvu.add_lora(u, gvu.Args(lora_r=4, lora_alpha=16))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    return u, base, policy


def base_logprobs(umm, base, prompts, codes):
    """(N, N_img) fp64 log pi_base(code_t | prompt, code_<t): one unpadded full forward per row."""
    rows = []
    for p, c in zip(prompts, codes):
        ids = umm.tokenizer(umm.t2i_prompt(p)).input_ids + (c + umm.image_offset).tolist()
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([ids])).logits[0, -len(c) - 1 : -1].double()
        logits = logits[:, umm.image_offset : umm.image_offset + umm.image_vocab_size]
        rows.append(logits.log_softmax(-1).gather(1, c[:, None])[:, 0])
    return torch.stack(rows)


def pixel_mean_rewards(umm, images, prompts, args):
    """A distinct reward per image (mean pixel / 255): every group has spread."""
    return torch.tensor([np.asarray(im, dtype=np.float64).mean() / 255 for im in images]).float()


@pytest.fixture
def reserve(monkeypatch):
    """The sampler's reserve, fixed: step 0's further batches are PROMPTS[2:], then a flat one."""
    batches = [PROMPTS[2:], [PROMPTS[0], PROMPTS[2]]]
    monkeypatch.setattr(experiments, "reserve_batches", lambda prompts, step, n, args: batches)
    monkeypatch.setattr(experiments.runio, "read_prompts", lambda path: (PROMPTS, [1, 2, 3, 4]))
    return batches


def test_dynamic_sampling_trains_on_the_first_b_groups_whose_rewards_differ(
    monkeypatch, reserve, one_thread
):
    """Groups whose G rewards are all equal are swapped for the reserve's groups with spread, in
    order. The kept groups carry their own rollout's rewards (each batch rolled out alone on its
    own stream) and their own codes, read through re-padded prefixes: the reference log-probs the
    loss gets equal one unpadded base forward per kept sample. Without spread anywhere the first
    batch is trained on; a non-finite reward is never swapped out unseen."""
    u, base, policy = moved_lora()
    flat = {PROMPTS[0], PROMPTS[2]}  # a reward without spread for these two prompts

    def rewards_fn(umm, images, prompts, args):
        r = pixel_mean_rewards(umm, images, prompts, args)
        return torch.where(torch.tensor([p in flat for p in prompts]), torch.full_like(r, 0.5), r)

    losses, real = [], gvu.grpo_loss
    monkeypatch.setattr(gvu, "grpo_loss", lambda *a: losses.append(a) or real(*a))
    args, sampler = gvu.Args(group_size=2), experiments.dynamic_sampler(2)
    sgd = lambda: torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    step = lambda reward_fn: gvu.gvu_step(
        u, policy, sgd(), PROMPTS[:2], 0, args, reward_fn=reward_fn, sampler=sampler
    )
    out = step(rewards_fn)
    assert out["batch"] == [PROMPTS[1], PROMPTS[3]]
    assert out["stats"]["rollout_batches"] == 2  # the third batch was never rolled out
    alone = [
        gvu.sample_and_reward(u, policy, b, 0, args, rewards_fn, True, None, stream=r)
        for r, b in enumerate([PROMPTS[:2], PROMPTS[2:]])
    ]
    want = torch.cat([alone[0]["rewards"][2:], alone[1]["rewards"][2:]])
    torch.testing.assert_close(out["rewards"], want, atol=0, rtol=0)
    codes = torch.cat([alone[0]["rollout"]["codes"][2:], alone[1]["rollout"]["codes"][2:]])
    _, _, ref, adv, *_ = losses[0]
    u.lm.eval()
    want = base_logprobs(u, base, [p for p in out["batch"] for _ in range(2)], codes)
    torch.testing.assert_close(ref.double(), want, atol=1e-5, rtol=0)
    assert (adv.abs() > 0.5).all()  # every kept group teaches

    nan = lambda umm, images, prompts, args: torch.where(
        torch.tensor([p == PROMPTS[3] for p in prompts]),
        float("nan"),
        rewards_fn(umm, images, prompts, args),
    )
    with pytest.raises(gvu.TrainingError, match="non-finite reward"):
        step(nan)

    flat |= set(PROMPTS)  # no group has spread: the first batch stays, after every reserve
    out = step(rewards_fn)
    assert out["batch"] == PROMPTS[:2] and out["stats"]["rollout_batches"] == 3


def test_reserve_is_a_stream_of_its_own_that_covers_each_epoch():
    """The reserve is not the main prompt stream read ahead (an offset of 2**32 on the shuffle's
    seed would be: a CPU generator keeps the low 32 bits), and each of its epochs holds every
    prompt once."""
    prompts, args = [f"p{i}" for i in range(24)], gvu.Args(batch_prompts=4, seed=3)
    batches = [experiments.reserve_batches(prompts, step, 2, args) for step in range(3)]
    reserve = [p for bs in batches for b in bs for p in b]  # one epoch
    main = [p for step in range(6) for p in gvu.prompt_batch(prompts, step, 4, 3)]
    assert sorted(reserve) == sorted(prompts) and reserve != main


def test_oracle_train_refuses_a_negative_dynamic_sampling_in_one_line(capsys):
    """--dynamic-sampling -1 is one line and a non-zero exit, before anything is loaded."""
    with pytest.raises(SystemExit) as e:
        experiments.main(["oracle-train", "--dynamic-sampling", "-1", "--out", "/nonexistent/x"])
    assert "--dynamic-sampling must be >= 0" in str(e.value.code) and "\n" not in str(e.value.code)
