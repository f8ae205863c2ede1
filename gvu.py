"""
GvU: a unified multimodal model (UMM) teaches its own image generation with its understanding.

Given only text prompts, every step:
  1. rollout:   sample G image-code sequences per prompt from the generation branch, decode them
                to pixels with the frozen diffusion head;
  2. reward:    the understanding branch reads each image (re-tokenised from pixels) after an
                instruction, then teacher-forces the original prompt T_1..T_L:
                    R = (prod_j p(T_j | image, T_<j))^(1/L) = exp(mean_j log p_j);
  3. advantage: A_i = (R_i - mean_group) / (std_group + eps);
  4. GRPO:      maximise mean_i min(r_i A_i, clip(r_i, 1-eps, 1+eps) A_i) - beta KL_k3(pi||pi_ref),
                pi_ref = the same weights with the LoRA adapter disabled.

CPU, the shipped tiny UMM, no downloads:  python gvu.py --prompts prompts/train.txt
CPU smoke test on random weights:         python gvu.py --model tiny-random --steps 3 --out runs/s
GPU, X-Omni as the official run:          python gvu.py configs/xomni_paper.json --flux PATH
GPU, Janus-Pro:                           python gvu.py configs/janus_pro_7b.json --out runs/j7b
Many GPUs, data parallel:                 torchrun --nproc_per_node 8 gvu.py configs/...json

Departures from the paper and the official code (matrix0721/GvU), evidence in reproduce_paper.md:
 1. Reward: one batched teacher-forced forward (official: a forward per prompt token). Same values.
 2. The end-of-turn token is scored after T_L (else extra objects cost nothing); configs: off.
 3. Policy log-probs over image positions and codes only (official: full-vocabulary fp32 logits).
 4. Ratio and KL use the untruncated tempered policy; top-k, top-p, min-p, CFG only shape sampling.
 5. The ratio is per image token, as in the official code; the paper writes one per sequence.
 6. The advantage's eps = 1e-4 is the official code's; the paper's formula has none.
 7. No LoRA on lm_head; the official code wraps it too, but no gradient reaches it there.
 8. The defaults are the tiny CPU run; the official X-Omni run is configs/xomni_paper.json.
 9. The judge is the policy, as the official code ends up doing (--reward-model frozen: LoRA off).
10. X-Omni's decoder gets no text (official: the T2I prompt, which is --decoder-text prompt).
11. Optional: --reward-input codes, the judge reads the sampled codes without decoding them.
12. GenEval++ judge: 6 single-request tries; unjudged images are left out, missing ones stop it.
13. Sampling is gvu's own loop: a generation_config.json's penalties etc. are warned of, unused.
"""

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache, get_scheduler

from models import enable_checkpointing, load_umm, lora_modules, pick_device, use_bf16
from tools import runio
from tools.runio import RESUME_MAY_CHANGE, TrainingError, prompt_batch


# -----------------------------------------------------------------------------
# config: one source of truth; the defaults are the real run (the tiny UMM on a CPU)
def arg(default, help, *choices):  # a flag: its default, one line of help, its allowed values
    meta = dict(help=help, choices=list(choices)) if choices else dict(help=help)
    return field(default=default, metadata=meta)


@dataclass
class Args:
    prompts: str = arg("prompts/train.txt", "text file, one prompt per line (UTF-8)")
    model: str = arg("checkpoints/tiny-umm", "tiny UMM folder, 'tiny-random', Janus / X-Omni id")
    trust_remote_code: bool = arg(False, "run the model repository's own code (X-Omni needs it)")
    flux: str = arg("", "X-Omni only: path or hub id of the FLUX.1-dev decoder weights")
    out: str = arg("runs/gvu", "output folder: config, log, state, adapter, samples, sampler")
    steps: int = arg(200, "training steps; raised on --resume, the lr schedule stretches to it")
    epochs: float = arg(0.0, "> 0: train ceil(epochs * n_prompts / B) steps instead of --steps")
    batch_prompts: int = arg(8, "B: prompts per step")
    group_size: int = arg(8, "G: images sampled per prompt (>= 2)")
    lr: float = arg(5e-4, "AdamW learning rate of the LoRA weights")
    lr_schedule: str = arg("constant", "lr over the run", "constant", "linear")
    warmup_steps: int = arg(0, "steps of linear lr warm-up from 0")
    beta: float = arg(0.03, "KL weight (k3 estimator; reference = adapter off)")
    clip_eps: float = arg(0.2, "PPO clip range of the per-token ratio")
    num_iterations: int = arg(1, "mu: policy updates per rollout (1 = on-policy)")
    lora_r: int = arg(8, "LoRA rank")
    lora_alpha: int = arg(32, "LoRA alpha")
    lora_targets: str = arg("", "LoRA only on these layer names, comma-separated (empty: all)")
    max_grad_norm: float = arg(1.0, "clip the LoRA gradient to this norm")
    temperature: float = arg(1.0, "sampling temperature (also used in the ratio)")
    top_k: int = arg(0, "sample from the k most likely codes only (0 = off)")
    top_p: float = arg(1.0, "keep the fewest likeliest codes whose mass reaches top_p (1 = off)")
    min_p: float = arg(0.0, "drop codes below min_p * the top probability (0 = off)")
    cfg_scale: float = arg(1.0, "classifier-free guidance scale for sampling (1 = off)")
    generation_config: bool = arg(False, "as generate: sampler defaults yield to the checkpoint's")
    micro_batch: int = arg(64, "sequences per forward / backward (the memory knob)")
    reward_model: str = arg("policy", "who judges: the policy or the base", "policy", "frozen")
    instruction: str = arg("Describe the image in detail.", "instruction before the prompt")
    score_end_of_turn: bool = arg(True, "also score the end-of-turn token after the prompt")
    reward_input: str = arg("pixels", "what the judge reads", "pixels", "codes")
    image_size: int = arg(0, "pixels per side to generate (0 = the model's default)")
    decoder_text: str = arg("none", "X-Omni only: the decoder's text condition", "none", "prompt")
    save_every: int = arg(50, "save the adapter and the resumable state every N steps")
    sample_every: int = arg(25, "write a sample grid every N steps")
    probe_every: int = arg(10, "log the reward on fixed prompts and seeds every N steps (0 = off)")
    report_to: str = arg("none", "also log to a tracker", "none", "tensorboard", "wandb")
    resume: bool = arg(False, "continue the run in --out from its state.pt")
    seed: int = arg(0, "seeds the LoRA init, the prompt order and every step's sampling")
    device: str = arg("auto", "auto | cuda | cuda:N | mps | cpu")
    dtype: str = arg("auto", "auto: bf16 autocast on CUDA", "auto", "float32", "bfloat16")


# ==== ALGORITHM: the model it reads, the policy, rollout, reward, advantage, loss, the step =====
# the UMM interface: what gvu.py reads off a model. models/tiny_umm.py is the reference
# implementation; models/adapters.py wraps Janus-Pro and X-Omni behind it
class UMM(Protocol):
    lm: torch.nn.Module  # the autoregressive LM (a transformers model); LoRA goes into it
    tokenizer: Callable  # a transformers tokenizer over words AND image codes
    grid: tuple  # (h, w): image codes per image = h * w, row-major
    image_offset: int  # image code k is token id image_offset + k
    image_vocab_size: int  # K: image codes are 0 .. K-1
    lora_targets: list  # names of the LM's linear layers that get LoRA
    answer_prefix: str  # the scored answer is answer_prefix + prompt + answer_suffix
    answer_suffix: str  # (the end-of-turn token)
    understands_codes: bool  # caption_prompts also reads generated codes (N, h*w)

    def set_generation_mode(self, mode): ...  # "image" (generation) or "text" (understanding)
    def t2i_prompt(self, prompt): ...  # the text the generation branch continues with codes
    def uncond_prompt(self, prompt): ...  # CFG's unconditional version of it
    def caption_prompt(self, image, instruction): ...  # chat context: the image, the instruction
    def caption_prompts(self, images, instruction): ...  # the same for N images, in one call
    def hidden_states(self, ids, mask, positions=None, cache=None, images=None): ...  # (N, T, D)
    def logits(self, hidden): ...  # (..., K) image codes in image mode, text ids in text mode
    def decode_images(self, codes, generator=None, prompts=None): ...  # (N, h*w) -> N images
    def unknown_words(self, text): ...  # words the tokenizer cannot spell


# -----------------------------------------------------------------------------
# 0. the policy: LoRA on the LM, trained; the reference policy is the same LM, LoRA off
def add_lora(umm, args):
    """The policy: LoRA on the LM's linear layers, in place (pi_ref: the same model, adapter off);
    gradient checkpointing; AdamW (weight decay 0, as the official run); lr schedule over steps."""
    umm.lm.requires_grad_(False)
    targets = lora_modules(umm, args.lora_targets)
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets)
    policy = get_peft_model(umm.lm, config)  # (lora_dropout: peft's default, 0)
    enable_checkpointing(umm.lm)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    name = "constant_with_warmup" if args.lr_schedule == "constant" else args.lr_schedule
    scheduler = get_scheduler(name, optimizer, args.warmup_steps, args.steps)
    return policy, optimizer, scheduler


# -----------------------------------------------------------------------------
# 1. rollout: B prompts x G samples, one batched KV-cached pass (sample_and_reward decodes)
def left_pad_positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)  # position ids that skip the left padding


def sampling_probs(cond, uncond=None, cfg_scale=1, temperature=1, top_k=0, min_p=0, top_p=1):
    """What the sampler draws from: CFG-guided logits, then transformers' order: temperature, top-k,
    top-p, min-p. cond, uncond: (N, K) logits -> (N, K) probabilities (unnormalised once cut)."""
    guided = cond if uncond is None else uncond + cfg_scale * (cond - uncond)
    probs = F.softmax(guided / temperature, -1)  # (N, K)
    if 0 < top_k < probs.shape[-1]:  # (a top_k past the vocabulary keeps it all, as transformers)
        probs = probs.masked_fill(probs < probs.topk(top_k, -1).values[:, -1:], 0)
    if top_p < 1:  # keep the fewest likeliest codes whose mass reaches top_p; the top one always
        p, order = probs.sort(-1, descending=True)  # (N, K); cumsum - p: the likelier codes' mass
        probs = probs.scatter(-1, order, p * (p.cumsum(-1) - p < top_p * p.sum(-1, keepdim=True)))
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, 0)
    return probs


@torch.no_grad()
def rollout(umm, prompts, G, temperature=1, top_k=0, min_p=0, cfg_scale=1, generator=None, top_p=1):
    """Sample G code sequences per prompt. Returns codes (B*G, N_img), their log-probs under the
    untruncated policy as the sampler saw them, and the tokenised prefixes for the training pass."""
    umm.lm.eval()  # eval mode: gradient checkpointing is off, so the KV cache stays on
    umm.set_generation_mode("image")
    texts = [umm.t2i_prompt(p) for p in prompts for _ in range(G)]  # B*G, groups adjacent
    cfg = cfg_scale != 1.0
    if cfg:  # R = 2*B*G rows: the conditional ones, then the model's own unconditional prompts
        texts += [umm.uncond_prompt(p) for p in prompts for _ in range(G)]
    enc = umm.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    enc = enc.to(umm.lm.device)
    ids, mask, cache = enc.input_ids, enc.attention_mask, DynamicCache()
    pos, codes, old_logp = left_pad_positions(mask), [], []
    for _ in range(umm.grid[0] * umm.grid[1]):  # N_img codes, row-major
        hidden = umm.hidden_states(ids, mask, pos, cache)[:, -1]  # (R, D); first the prefill
        logits = umm.logits(hidden).float()  # (R, K) image vocabulary only
        if not torch.isfinite(logits).all():  # multinomial would crash (CUDA: a device assert)
            raise TrainingError("the policy's image logits are not finite while sampling")
        cond, uncond = logits.chunk(2) if cfg else (logits, None)  # (B*G, K) each
        probs = sampling_probs(cond, uncond, cfg_scale, temperature, top_k, min_p, top_p)
        code = torch.multinomial(probs, 1, generator=generator)  # (B*G, 1)
        codes.append(code)
        # as the sampler saw it, untruncated (departure 4); gvu_step recomputes pi_old itself
        old_logp.append(F.log_softmax(cond / temperature, -1).gather(-1, code))
        ids = (code + umm.image_offset).repeat(2 if cfg else 1, 1)  # (R, 1): the next input
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], 1)
        pos = pos[:, -1:] + 1
    codes, old_logp = torch.cat(codes, 1), torch.cat(old_logp, 1)  # (B*G, N_img) each
    ids, attn = enc.input_ids[: len(codes)], enc.attention_mask[: len(codes)]  # B*G conditional
    return dict(codes=codes, old_logp=old_logp, prefix_ids=ids, prefix_mask=attn)


# -----------------------------------------------------------------------------
# 2. token-level intrinsic reward: the geometric mean of the prompt's token probabilities
def intrinsic_reward(token_logp, mask):
    """R = (prod_j p_j)^(1/L) = exp(mean_j log p_j), in fp32. token_logp, mask: (N, L); positions
    where mask is 0 are ignored whatever token_logp holds there (masked_fill: -inf * 0 is NaN)."""
    token_logp, mask = token_logp.float(), mask.float()
    return torch.exp(token_logp.masked_fill(mask == 0, 0.0).sum(1) / mask.sum(1))  # (N,)


def answer_ids(umm, prompts, end_of_turn=True):
    """The scored answer's token ids: answer_prefix + prompt (+ end-of-turn token: departure 2)."""
    suffix = umm.answer_suffix if end_of_turn else ""
    texts = [umm.answer_prefix + p + suffix for p in prompts]
    return umm.tokenizer(texts, add_special_tokens=False).input_ids


def caption_token_logprobs(umm, images, prompts, instruction, micro_batch=64, end_of_turn=True):
    """Understanding branch: log p(T_j | instruction, image, T_<j) for every answer token, one
    teacher-forced forward per micro-batch. `images`: N PIL images, or (--reward-input codes) the
    generated codes (N, h*w). Returns logp (N, L) and mask (N, L), right-padded."""
    umm.set_generation_mode("text")
    tok, dev = umm.tokenizer, umm.lm.device
    ctx = tok(umm.caption_prompts(images, instruction), add_special_tokens=False).input_ids
    ans = answer_ids(umm, prompts, end_of_turn)
    n_ctx, n_ans = torch.tensor([len(c) for c in ctx]), torch.tensor([len(a) for a in ans])  # (N,)
    pad = partial(torch.nn.utils.rnn.pad_sequence, batch_first=True, padding_value=tok.pad_token_id)
    seqs = pad([torch.tensor(c + a) for c, a in zip(ctx, ans)])  # (N, T)
    target = pad([torch.tensor(a) for a in ans])  # (N, L)
    L = target.shape[1]
    valid = (torch.arange(L) < n_ans[:, None]).float()  # (N, L)
    # position t predicts token t+1: answer token j sits at n_ctx+j, so read position n_ctx+j-1
    where = n_ctx[:, None] - 1 + torch.arange(L).minimum(n_ans[:, None] - 1)  # (N, L)
    out = torch.zeros(len(ans), L, device=dev)
    for s in range(0, len(ans), micro_batch):
        mb = slice(s, s + micro_batch)
        lengths = n_ctx[mb] + n_ans[mb]
        T = lengths.max().item()  # this micro-batch's longest sequence
        ids, attn = seqs[mb, :T].to(dev), (torch.arange(T) < lengths[:, None]).long().to(dev)
        hidden = umm.hidden_states(ids, attn, images=images[mb])  # (n, T, D)
        idx = where[mb, :, None].to(dev).expand(-1, -1, hidden.shape[-1])
        logits = umm.logits(hidden.gather(1, idx)).float()  # (n, L, V) text vocabulary
        # log p(target) = its logit - logsumexp of the row: no (n, L, V) log-softmax copy
        logp = logits.gather(-1, target[mb, :, None].to(dev))[..., 0] - logits.logsumexp(-1)
        out[mb] = logp * valid[mb].to(dev)  # (n, L)
    return out, valid.to(dev)


@torch.no_grad()
def intrinsic_rewards(umm, images, prompts, args):
    """The default reward_fn: rewards (N,) and their per-token terms (N, L), which the sample grids
    shade. A fork swaps in any `reward_fn(umm, images, prompts, args) -> (N,) rewards` (+ terms)."""
    flags = (args.instruction, args.micro_batch, args.score_end_of_turn)
    token_logp, mask = caption_token_logprobs(umm, images, prompts, *flags)
    return intrinsic_reward(token_logp, mask), token_logp, mask


# -----------------------------------------------------------------------------
# 3. group advantage
def group_advantages(rewards, G, eps=1e-4):
    """A_i = (R_i - mean_group) / (std_group + eps). rewards (B*G,), groups adjacent -> (B*G,).
    A group whose rewards are all equal gets exactly 0 (0 / eps), never NaN."""
    r = rewards.view(-1, G)  # (B, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


# -----------------------------------------------------------------------------
# 4. policy log-probs with grad, and the clipped KL-regularised GRPO loss
def image_token_logprobs(umm, prefix_ids, prefix_mask, codes, temperature=1.0):
    """Generation branch: teacher-forced log pi(code_t | prompt, code_<t), image vocabulary only.
    prefix (N, P) left-padded as in the rollout; codes (N, N_img) -> (N, N_img)."""
    umm.set_generation_mode("image")
    ids = torch.cat([prefix_ids, codes + umm.image_offset], 1)  # (N, P + N_img)
    mask = torch.cat([prefix_mask, prefix_mask.new_ones(codes.shape)], 1)
    hidden = umm.hidden_states(ids[:, :-1], mask[:, :-1], left_pad_positions(mask)[:, :-1])
    hidden = hidden[:, prefix_ids.shape[1] - 1 :]  # (N, N_img, D): the positions that predict codes
    logp = F.log_softmax(umm.logits(hidden).float() / temperature, -1)  # (N, N_img, K)
    return logp.gather(-1, codes[..., None])[..., 0]  # (N, N_img)


def grpo_loss(logp, old_logp, ref_logp, adv, clip_eps=0.2, beta=0.03):
    """Clipped surrogate plus beta * k3 KL, per image token. logp, old_logp, ref_logp (N, N_img),
    adv (N,). Reduction: mean over image tokens, then over samples; image sequences have a fixed
    length, so the GRPO, DAPO and Dr.GRPO reductions differ only by a constant here."""
    # on the first update old_logp = logp.detach(): the ratio is exactly 1 while its gradient is
    # grad logp, so with mu = 1 the clip is inert and this is REINFORCE with a group baseline
    ratio = torch.exp(logp - old_logp)  # (N, N_img)
    a = adv[:, None]
    pg_loss1 = -a * ratio
    pg_loss2 = -a * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    # k3: unbiased and >= 0 (http://joschu.net/blog/kl-approx.html)
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1  # (N, N_img)
    loss = (torch.max(pg_loss1, pg_loss2) + beta * kl).mean(1).mean()
    with torch.no_grad():
        clip_frac = ((ratio - 1).abs() > clip_eps).float().mean().item()
        stats = dict(kl=kl.mean().item(), clip_frac=clip_frac, ratio=ratio.mean().item())
    return loss, stats


# -----------------------------------------------------------------------------
# 5. one GvU step: rollout -> decode -> reward -> advantages -> mu clipped, KL-regularised updates
PROBE_STEP = 1_000_002  # the probe's seeds: a step no run reaches


def seed_for(seed, step, rank=0, stream=0):
    """Every sampling stream's seed, from (run seed, step, torchrun rank, stream). A CPU generator
    keeps a seed's low 32 bits only, so rank and stream move them by large odd multipliers."""
    return seed * 1_000_003 + step + rank * 0x9E3779B1 + stream * 0x85EBCA6B


@torch.no_grad()
def sample_and_reward(umm, policy, batch, step, args, reward_fn, decode, lap, rank=0, stream=0):
    """Steps 1-2 on B prompts: G samples each (seeded by seed_for), then the judge's rewards, in a
    dict: batch, rollout, images (None: --reward-input codes, no decode), rewards, token_logp."""
    lap, seed = lap or (lambda phase: None), seed_for(args.seed, step, rank, stream)
    judge = policy.disable_adapter if args.reward_model == "frozen" else nullcontext
    G, gen = args.group_size, torch.Generator(umm.lm.device).manual_seed(seed)
    sampling = (args.temperature, args.top_k, args.min_p, args.cfg_scale, gen, args.top_p)
    ro = rollout(umm, batch, G, *sampling)
    lap("rollout")
    group_prompts = [p for p in batch for _ in range(G)]  # (B*G,)
    pixels = args.reward_input == "pixels"  # the paper's path: decode, then re-tokenise
    images = None
    if pixels or decode:  # with --reward-input codes, decode only for the sample grids
        images = umm.decode_images(ro["codes"], torch.Generator().manual_seed(seed), group_prompts)
    lap("decode")
    with judge():
        out = reward_fn(umm, images if pixels else ro["codes"], group_prompts, args)
    rewards, token_logp = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    lap("reward")
    return dict(batch=batch, rollout=ro, images=images, rewards=rewards, token_logp=token_logp)


def gvu_step(umm, policy, opt, batch, step, args, reward_fn=None, sampler=None, lap=None, ddp=None):
    """One GvU step on B prompts, in micro-batches, under the caller's autocast. Fork points:
    `reward_fn` (default intrinsic_rewards), `sampler` (default sample_and_reward; dynamic sampling
    in tools/experiments.py), `lap(phase)` (tools/bench.py's timing hook). torchrun: `batch` is this
    rank's slice, `ddp` a tools/distributed.DDP. Returns the sampler's dict (its rewards: every
    rank's, (B*G,)) plus `stats`."""
    G, mb, lap = args.group_size, args.micro_batch, lap or (lambda phase: None)
    sampler, reward_fn = sampler or sample_and_reward, reward_fn or intrinsic_rewards
    rank = ddp.rank if ddp else 0  # torchrun: each rank samples its own stream
    decode = runio.is_sample_step(step, args)  # --reward-input codes decodes for the grids only
    out = sampler(umm, policy, batch, step, args, reward_fn, decode, lap, rank)
    ro, rewards = out["rollout"], out["rewards"]  # (B*G, ...), (B*G,)
    adv = group_advantages(rewards, G)  # (B*G,); a group never straddles ranks
    if ddp:
        rewards = out["rewards"] = ddp.gather(rewards.float())  # every rank's, in batch order
    if not torch.isfinite(rewards).all():  # (every rank sees every reward: all stop together)
        raise TrainingError(f"non-finite reward at step {step}")
    N, chunks = len(adv), [slice(s, s + mb) for s in range(0, len(adv), mb)]
    seqs = lambda sl: (ro["prefix_ids"][sl], ro["prefix_mask"][sl], ro["codes"][sl])
    with torch.no_grad(), policy.disable_adapter():  # pi_ref: the same weights, adapter off
        ref = [image_token_logprobs(umm, *seqs(sl), args.temperature) for sl in chunks]
    ref_logp = torch.cat(ref)  # (B*G, N_img)
    lap("reference")
    umm.lm.train()  # gradient checkpointing is active in train mode
    # torchrun: DDP's pass, which all-reduces the gradients in the last micro-batch's backward only
    logprobs = ddp.logprobs if ddp else lambda *a, last: image_token_logprobs(umm, *a)
    # pi_old is the policy that sampled: the weights before this step's first update. Its
    # log-probs come from the first update's own pass (detached), as in the official code and
    # TRL, not from the rollout: the KV-cached pass differs by rounding (more so in bf16).
    old_logp, not_applied = {}, "its update was not applied"
    for it in range(args.num_iterations):
        opt.zero_grad(set_to_none=True)
        stats = dict(loss=0.0, kl=0.0, clip_frac=0.0, ratio=0.0)
        for i, sl in enumerate(chunks):
            logp = logprobs(*seqs(sl), args.temperature, last=sl is chunks[-1])  # (mb, N_img)
            if it == 0:
                old_logp[i] = logp.detach()
            loss, st = grpo_loss(logp, old_logp[i], ref_logp[sl], adv[sl], args.clip_eps, args.beta)
            if not ddp and not torch.isfinite(loss):  # (torchrun: the grad norm says it)
                raise TrainingError(f"non-finite loss at step {step}; {not_applied}")
            w = len(logp) / N  # micro-batches add up to the batch mean
            (loss * w).backward()
            for k, v in dict(st, loss=loss.item()).items():
                stats[k] += v * w
        stats = ddp.mean(stats) if ddp else stats  # torchrun: whole-batch statistics
        params = [p for p in policy.parameters() if p.requires_grad]
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
        if not math.isfinite(stats["grad_norm"]):
            raise TrainingError(f"non-finite gradient norm at step {step}; {not_applied}")
        opt.step()
    lap("update")
    return dict(out, stats={**out.get("stats", {}), **stats})  # a sampler may add its own stats


# ==== PLUMBING: the training loop and the command line =========================================
def train(args, reward_fn=intrinsic_rewards, sampler=sample_and_reward):
    prompts, lines = runio.check_args(args, RESUME_MAY_CHANGE, asdict(Args()))  # one-line errors
    ddp = None
    if "RANK" in os.environ:  # launched by torchrun: one process per GPU, data parallel
        from tools.distributed import DDP

        ddp = DDP(args.batch_prompts)
    device = pick_device(args.device)  # cuda > mps > cpu
    bf16 = use_bf16(args.dtype, device)  # bf16 autocast where the GPU has it, fp32 elsewhere
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else nullcontext()
    model_flags = [args.model, args.seed, args.trust_remote_code, args.flux]
    umm = load_umm(*model_flags, device, bf16, args.image_size, args.decoder_text).to(device)
    runio.check_against_model(umm, args, prompts, lines)
    torch.manual_seed(args.seed)  # the LoRA init (torch >= 2.13 seeds each process at random)
    policy, optimizer, scheduler = add_lora(umm, args)
    if ddp:
        ddp.wrap(partial(image_token_logprobs, umm), policy)
    run = runio.Run(args, policy, optimizer, scheduler, device, is_main=not ddp or ddp.rank == 0)
    args = runio.sampler_args(umm.lm, args, args.out, run.is_main)  # and OUT/sampler.json says it

    for step in run.steps():  # from 0, or from the saved step on --resume; tqdm's bar
        probe = None
        if args.probe_every and step % args.probe_every == 0:  # before this step's update:
            first = prompt_batch(prompts, 0, args.batch_prompts, args.seed)  # fixed prompts and
            with autocast:  # seeds, so that its curve shows learning that the step reward hides
                r = sample_and_reward(umm, policy, first, PROBE_STEP, args, reward_fn, False, None)
            probe = r["rewards"].mean().item()
        t0, lr = time.time(), scheduler.get_last_lr()[0]  # the lr of this step's updates
        batch = prompt_batch(prompts, step, args.batch_prompts, args.seed)  # (B,)
        batch = ddp.local_slice(batch) if ddp else batch  # torchrun: this rank's B/W prompts
        with autocast:
            out = gvu_step(umm, policy, optimizer, batch, step, args, reward_fn, sampler, ddp=ddp)
        scheduler.step()
        run.log(step, out, lr, time.time() - t0, probe)  # log.jsonl, a printed line, the tracker
        eot = args.score_end_of_turn  # on sample steps, a grid of each prompt token's probability
        run.sample_grid(step, out, umm.tokenizer, partial(answer_ids, umm, end_of_turn=eot))
        if (step + 1) % args.save_every == 0 or step == args.steps - 1:
            run.save(step + 1)  # state.pt, then adapter/
    run.close()
    if ddp:
        ddp.close()
    return run.log_path


def parse_args(argv=None):  # flags, optionally after a config file (configs/*.json)
    return runio.parse_args(Args, sys.argv[1:] if argv is None else argv, __doc__)


def main(argv=None, reward_fn=intrinsic_rewards, sampler=sample_and_reward):
    args = parse_args(argv)
    try:
        return train(args, reward_fn, sampler)
    except runio.FAILURES as e:  # bad input, a NaN, a full disk, out of memory, Ctrl-C: one line
        msg = runio.error_line(e, args.out)
    sys.exit(msg)  # outside the except: the traceback, and the run folder's lock, are released


if __name__ == "__main__":
    main()
