"""The UMM interface's contract, written once and checked on every model: the tiny UMM, the
Janus-Pro stand-in and the X-Omni stand-in (conftest.stand_in). Each test compares gvu's batched,
KV-cached code paths against the model's own slow ones (unbatched per-token forwards), or checks
where LoRA lands and what one update moves."""

import re

import pytest
import torch

import gvu
from models import InputError
from standins import INSTRUCTION, PROMPTS

# peft's pre-v6 names


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@torch.no_grad()
def test_rollout_old_logprobs_equal_teacher_forced_logprobs(stand_in, cfg_scale):
    """The KV-cached, left-padded, (CFG-)sampled rollout's old log-probs equal the teacher-forced
    conditional ones (untruncated, same temperature), so the first ratio is 1."""
    umm = stand_in.umm
    ro = gvu.rollout(
        umm,
        PROMPTS,
        G=2,
        temperature=0.7,
        top_k=20,
        min_p=0.05,
        cfg_scale=cfg_scale,
        generator=torch.Generator().manual_seed(1),
    )
    codes = ro["codes"]
    assert (
        codes.shape == (2 * len(PROMPTS), umm.grid[0] * umm.grid[1])
        and ro["prefix_mask"].eq(0).any()
    )
    assert 0 <= codes.min() and codes.max() < umm.image_vocab_size
    logp = gvu.image_token_logprobs(
        umm, ro["prefix_ids"], ro["prefix_mask"], codes, temperature=0.7
    )
    torch.testing.assert_close(logp, ro["old_logp"], atol=1e-5, rtol=0)


@torch.no_grad()
def test_reward_pass_equals_the_per_token_reference_loop(stand_in):
    """gvu's teacher-forced reward pass, at any micro-batch (uneven ones included), equals the
    model's own loop of one uncached forward per prompt token (+ end of turn), and counts the same
    number of tokens."""
    umm, images = stand_in.umm, stand_in.images
    want, lengths = stand_in.reference(umm, images, PROMPTS)
    for micro_batch in (64, 2, 1):
        logp, mask = gvu.caption_token_logprobs(
            umm, images, PROMPTS, INSTRUCTION, micro_batch=micro_batch
        )
        assert mask.sum(1).tolist() == lengths
        torch.testing.assert_close(
            gvu.intrinsic_reward(logp, mask).double(), want, atol=1e-5, rtol=0
        )


def test_lora_lands_in_the_lm_blocks_and_one_update_moves_only_lora(stand_in):
    """gvu.add_lora wraps the 7 linear layers of every LM block and nothing else; with checkpointing
    on the first ratio is 1, and one grpo_loss backward + AdamW step changes LoRA weights only (B
    included)."""
    umm = stand_in.build(1)
    policy, opt, _ = gvu.add_lora(umm, gvu.Args(lora_r=4, lora_alpha=16, lr=1e-2))
    wrapped = {n.rsplit(".lora_", 1)[0] for n, _ in umm.lm.named_modules() if ".lora_A" in n}
    assert len(wrapped) == stand_in.n_lora and all(
        re.search(stand_in.lora_scope, n) for n in wrapped
    ), wrapped
    assert all("lora_" in n for n, p in umm.lm.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in umm.lm.named_parameters()}

    ro = gvu.rollout(
        umm, PROMPTS[:2], G=2, cfg_scale=3.0, generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad(), policy.disable_adapter():
        ref = gvu.image_token_logprobs(umm, ro["prefix_ids"], ro["prefix_mask"], ro["codes"])
    umm.lm.train()
    logp = gvu.image_token_logprobs(umm, ro["prefix_ids"], ro["prefix_mask"], ro["codes"])
    loss, stats = gvu.grpo_loss(logp, ro["old_logp"], ref, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    assert abs(stats["ratio"] - 1) < 1e-5 and stats["clip_frac"] == 0
    loss.backward()
    opt.step()
    changed = {n for n, p in umm.lm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed) and any("lora_B" in n for n in changed)


def test_lora_targets_narrows_lora_to_the_named_layers_of_the_lm_blocks(stand_in):
    """--lora-targets q_proj,v_proj wraps exactly those two of the 7 layers in every LM block: the
    model's own targets still decide the scope (a vision tower's q_proj stays out), the flag only
    picks among them."""
    umm = stand_in.build(2)
    gvu.add_lora(umm, gvu.Args(lora_r=4, lora_alpha=16, lora_targets="q_proj,v_proj"))
    wrapped = {n.rsplit(".lora_", 1)[0] for n, _ in umm.lm.named_modules() if ".lora_A" in n}
    assert len(wrapped) == stand_in.n_lora * 2 // 7 and all(
        re.search(stand_in.lora_scope, n) for n in wrapped
    ), wrapped
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"q_proj", "v_proj"}


def test_lora_targets_skip_a_module_outside_the_scope_whose_name_ends_like_one_inside():
    """A vision tower at vision.model.layers.0.self_attn.q_proj ends with the LM's
    model.layers.0.self_attn.q_proj: --lora-targets q_proj must still wrap the LM's only (peft
    matches a list of names by suffix, so it gets a regex)."""
    from types import SimpleNamespace
    from peft import LoraConfig, get_peft_model

    def stack():
        block = torch.nn.Module()
        block.self_attn = torch.nn.Module()
        block.self_attn.q_proj, block.self_attn.v_proj = (
            torch.nn.Linear(4, 4),
            torch.nn.Linear(4, 4),
        )
        s = torch.nn.Module()
        s.layers = torch.nn.ModuleList([block])
        return s

    lm = torch.nn.Module()
    lm.model, lm.vision = stack(), torch.nn.Module()
    lm.vision.model = stack()
    umm = SimpleNamespace(lm=lm, lora_targets=r"model\.layers\.\d+\.self_attn\.(q|v)_proj")
    # spaces, a trailing comma
    get_peft_model(lm, LoraConfig(r=2, target_modules=gvu.lora_modules(umm, "q_proj, ")))
    assert {n.rsplit(".lora_", 1)[0] for n, _ in lm.named_modules() if ".lora_A" in n} == {
        "model.layers.0.self_attn.q_proj"
    }
    with pytest.raises(InputError, match=r"no LoRA layer named ',' \(its layers: q_proj, v_proj\)"):
        gvu.lora_modules(umm, ",")
