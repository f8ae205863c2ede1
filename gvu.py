"""
GvU: a unified multimodal model (UMM) teaches its own image generation with its understanding.

Given only text prompts, every step:
  1. rollout:    sample G image-code sequences per prompt from the generation branch, decode them
                 to pixels with the frozen diffusion head;
  2. reward:     the understanding branch reads each image (re-tokenised from pixels) after an
                 instruction, then teacher-forces the original prompt T_1..T_L:
                     R = (prod_j p(T_j | image, T_<j))^(1/L) = exp(mean_j log p_j);
  3. advantage:  A_i = (R_i - mean_group) / (std_group + eps);
  4. GRPO:       maximise mean_i min(r_i A_i, clip(r_i, 1-eps, 1+eps) A_i) - beta KL_k3(pi || pi_ref),
                 r = per-image-token ratio, pi_ref = the same weights with the LoRA adapter disabled.

CPU (the shipped tiny UMM, no downloads, ~13 min):  python gvu.py --prompts prompts/train.txt
CPU smoke test with random weights:                 python gvu.py --model tiny-random --steps 3 --out runs/smoke
GPU, a published setting (a config file; flags after it override it; docs/reproduce_paper.md):
  X-Omni, the paper's run (X-Omni's own stack):     python gvu.py configs/xomni_paper.json --flux PATH/FLUX.1-dev --out runs/xomni
  Janus-Pro (T2I-R1's settings where GvU has none): python gvu.py configs/janus_pro_7b.json --out runs/janus7b
Many GPUs (data parallel, tools/distributed.py):          torchrun --nproc_per_node 8 gvu.py configs/xomni_paper.json ...

Departures from the paper and the official code, and why (the only list; the README points here):
  1. The reward forward is ONE batched teacher-forced pass per micro-batch; the official code runs
     one uncached forward per prompt token, and the images of a micro-batch are tokenised in one call (the
     official code: one per image). Same numbers (tested), 13-18x faster (tools/bench.py, docs/speed_memory.md).
  2. By default the scored answer is the prompt followed by the end-of-turn token: without it an image
     with extra objects is as likely as a correct one ("two circles" is a prefix of what it shows).
     --no-score-end-of-turn scores T_1..T_L only, the paper's formula (the config files do).
  3. Policy log-probs come from hidden states through the image head, over image positions and the
     image vocabulary only; the official code builds full-vocabulary fp32 logits everywhere.
  4. The ratio and the KL use the untruncated, temperature-scaled conditional policy; top-k / min-p
     truncation and CFG only shape which codes are sampled (T2I-R1's convention). With the defaults
     (no truncation, --cfg-scale 1) the sampler is that policy exactly.
  5. Defaults are scaled for the tiny CPU model (G=8, lr=5e-4, constant lr, 200 steps); the paper's
     X-Omni run is configs/xomni_paper.json (G=2, 8 prompts a step, lr=1e-6 decaying linearly, 4 epochs).
  6. The judge defaults to the policy itself (--reward-model policy), as the official code ends up
     doing; --reward-model frozen judges with the adapter off.
  7. X-Omni only: by default its FLUX decoder gets the empty prompt, so a decoder reading the prompt cannot
     repair the policy's errors; --decoder-text prompt passes the T2I prompt, as the official code does.
  8. Optional, off by default: --reward-input codes lets the judge read the generated codes as they are, no
     decode and re-tokenise (tiny UMM, X-Omni: one code vocabulary); docs/speed_memory.md says when it fits.

The model is anything with the small interface `UMM` below: the shipped tiny UMM (models/tiny_umm.py) is its
reference implementation; models/adapters.py wraps Janus-Pro and X-Omni behind it and loads them (`load_umm`).
"""

import json
import math
import os
import re
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import check_target_module_exists
from tqdm import tqdm
from transformers import DynamicCache, HfArgumentParser, get_scheduler

from tools import distributed
from tools import loggers
from tools import runio
from models.adapters import InputError, load_umm, pick_device, use_bf16

warnings.filterwarnings(
    "ignore", message=".*deprecated and will be removed in v6"
)  # peft still uses pre-v6 names


# -----------------------------------------------------------------------------
# config: one source of truth; every flag documented; defaults are the real (tiny, CPU) run
@dataclass
class Args:
    prompts: str = field(
        default="prompts/train.txt", metadata={"help": "text file, one prompt per line (UTF-8)"}
    )
    model: str = field(
        default="checkpoints/tiny-umm",
        metadata={
            "help": "tiny UMM folder, 'tiny-random' (built in-process), or a Janus(-Pro) / X-Omni checkpoint path / hub id"
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "run the model repository's own Python code; needed by X-Omni; never implied"
        },
    )
    flux: str = field(
        default="",
        metadata={
            "help": "path or hub id of the FLUX.1-dev decoder weights that X-Omni's init_vision needs"
        },
    )
    out: str = field(
        default="runs/gvu", metadata={"help": "output folder: config, log, adapter, state, samples"}
    )
    steps: int = field(default=200, metadata={"help": "training steps (one rollout each)"})
    epochs: float = field(
        default=0.0,
        metadata={
            "help": "> 0: train ceil(epochs * n_prompts / B) steps instead of --steps (give one of the two)"
        },
    )
    batch_prompts: int = field(default=8, metadata={"help": "B: prompts per step"})
    group_size: int = field(
        default=8, metadata={"help": "G: images sampled per prompt (>= 2); paper: 2"}
    )
    lr: float = field(
        default=5e-4, metadata={"help": "AdamW learning rate on the LoRA weights; paper: 1e-6"}
    )
    lr_schedule: str = field(
        default="constant",
        metadata={
            "help": "lr over the run: constant, or linear decay to 0 at the last step (the official code's)",
            "choices": ["constant", "linear"],
        },
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "steps of linear lr warm-up from 0 before the schedule"}
    )
    beta: float = field(
        default=0.03,
        metadata={
            "help": "KL weight (k3 estimator, reference = adapter off); paper: 0.03. On the tiny UMM 0.3 keeps understanding "
            "within 1 point for a third less gain (docs/results_shapes.md)"
        },
    )
    clip_eps: float = field(
        default=0.2, metadata={"help": "PPO clip range for the per-token ratio"}
    )
    num_iterations: int = field(
        default=1, metadata={"help": "mu: policy updates per rollout (1 = on-policy)"}
    )
    dynamic_sampling: int = field(
        default=0,
        metadata={
            "help": "DAPO's dynamic sampling: up to N more rollouts of B fresh prompts a step, until B groups have "
            "rewards that differ (a group without spread has advantage 0 and teaches nothing; 0 = off)"
        },
    )
    lora_r: int = field(
        default=8, metadata={"help": "LoRA rank on the LM's linear layers; paper: 8"}
    )
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha; paper: 32"})
    lora_targets: str = field(
        default="",
        metadata={
            "help": "LoRA on these of the model's LoRA layers only, by name, comma-separated (e.g. q_proj,k_proj,v_proj,"
            "o_proj: attention only); empty = all of them (every linear layer of the LM)"
        },
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "clip the LoRA gradient to this norm"}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "sampling temperature (also used in the ratio)"}
    )
    top_k: int = field(
        default=0, metadata={"help": "sample from the k most likely codes only (0 = off)"}
    )
    min_p: float = field(
        default=0.0,
        metadata={"help": "drop codes below min_p * max prob (0 = off; X-Omni uses 0.03)"},
    )
    cfg_scale: float = field(
        default=1.0, metadata={"help": "classifier-free guidance for sampling (1 = off)"}
    )
    micro_batch: int = field(
        default=64, metadata={"help": "sequences per forward/backward (memory knob)"}
    )
    reward_model: str = field(
        default="policy",
        metadata={
            "help": "who judges: 'policy' (the LoRA'd model, as the official code ends up doing) or 'frozen' (adapter off)",
            "choices": ["policy", "frozen"],
        },
    )
    instruction: str = field(
        default="Describe the image in detail.",
        metadata={"help": "understanding instruction before the prompt"},
    )
    score_end_of_turn: bool = field(
        default=True,
        metadata={
            "help": "the reward also scores the end-of-turn token after the prompt (off: the paper's T_1..T_L only)"
        },
    )
    reward_input: str = field(
        default="pixels",
        metadata={
            "help": "what the judge reads: 'pixels' (decode, re-tokenise: the paper's path) or 'codes' (the generated codes "
            "as they are, no decode; models whose understanding shares the generation vocabulary: tiny UMM, X-Omni)",
            "choices": ["pixels", "codes"],
        },
    )
    image_size: int = field(
        default=0,
        metadata={
            "help": "pixels per side to generate; 0 = the model's default (X-Omni: multiples of 16, paper 576)"
        },
    )
    decoder_text: str = field(
        default="none",
        metadata={
            "help": "the image decoder's text condition: none, or the T2I prompt (X-Omni only, as the official code)",
            "choices": ["none", "prompt"],
        },
    )
    save_every: int = field(
        default=50, metadata={"help": "save adapter + resumable state every N steps"}
    )
    sample_every: int = field(default=25, metadata={"help": "write a sample grid every N steps"})
    probe_every: int = field(
        default=10,
        metadata={
            "help": "every N steps, log probe_reward: the mean reward on fixed training prompts and sampling seeds (0 = off)"
        },
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "also log scalars and sample grids to 'tensorboard' (OUT/tensorboard) or 'wandb' (WANDB_MODE=offline "
            "works without network); each is an optional package",
            "choices": ["none", "tensorboard", "wandb"],
        },
    )
    resume: bool = field(
        default=False, metadata={"help": "continue the run in --out from its state.pt"}
    )
    seed: int = field(
        default=0, metadata={"help": "seeds init, prompt order and every step's sampling"}
    )
    device: str = field(default="auto", metadata={"help": "auto | cuda | mps | cpu"})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (bf16 autocast on CUDA, else fp32) | float32 | bfloat16",
            "choices": ["auto", "float32", "bfloat16"],
        },
    )


class TrainingError(Exception):
    """The run cannot go on (e.g. a non-finite reward): reported as one line, never as a traceback."""


# -----------------------------------------------------------------------------
# the UMM interface: what gvu.py reads off a model (tiny_umm.TinyUMM is the reference implementation)
class UMM(Protocol):
    lm: torch.nn.Module  # the autoregressive LM (a transformers model); LoRA goes into it
    tokenizer: Callable  # a transformers tokenizer over words AND image codes
    grid: tuple  # (h, w): image codes per image = h * w, row-major
    image_offset: int  # image code k is token id image_offset + k
    image_vocab_size: int  # K: image codes are 0 .. K-1
    lora_targets: list  # names of the LM's linear layers that get LoRA
    answer_prefix: str  # the scored answer is answer_prefix + prompt + answer_suffix
    answer_suffix: str  # (the end-of-turn token; scored unless --no-score-end-of-turn)

    def set_generation_mode(
        self, mode: str
    ): ...  # "image" (generation branch) or "text" (understanding)
    def t2i_prompt(
        self, prompt: str
    ) -> str: ...  # the text the generation branch continues with codes
    def uncond_prompt(self, prompt: str) -> str: ...  # CFG's unconditional version of t2i_prompt
    def caption_prompt(
        self, image, instruction: str
    ) -> str: ...  # chat context: the image, then the instruction
    def caption_prompts(
        self, images, instruction: str
    ) -> list: ...  # the same for N images, one image-tokenizer call

    understands_codes: (
        bool  # caption_prompts also takes generated codes (N, h*w): --reward-input codes
    )

    def hidden_states(
        self, input_ids, attention_mask, position_ids=None, cache=None, images=None
    ): ...  # (N, T, D)
    def logits(self, hidden): ...  # (..., K) image codes in image mode, text ids in text mode
    def decode_images(
        self, codes, generator=None, prompts=None
    ) -> list: ...  # (N, h*w) codes -> N PIL images
    #                                                      (frozen decoder; prompts: the T2I text, if it reads text)
    def unknown_words(
        self, text: str
    ) -> list: ...  # words the tokenizer cannot spell (would become <unk>)


# -----------------------------------------------------------------------------
# 1. rollout: B prompts x G samples, one batched KV-cached pass, then the frozen diffusion decoder
def left_pad_positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)  # position ids that skip left padding


def sampling_probs(cond, uncond=None, cfg_scale=1.0, temperature=1.0, top_k=0, min_p=0.0):
    """What the sampler draws from: CFG-guided logits, temperature, then top-k and min-p truncation.
    cond, uncond: (N, K) logits -> (N, K) probabilities (unnormalised after truncation; multinomial is fine)."""
    guided = cond if uncond is None else uncond + cfg_scale * (cond - uncond)
    probs = F.softmax(guided / temperature, -1)  # (N, K)
    if top_k > 0:
        probs = probs.masked_fill(probs < probs.topk(top_k, -1).values[:, -1:], 0)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, 0)
    return probs


@torch.no_grad()
def rollout(umm, prompts, G, temperature=1.0, top_k=0, min_p=0.0, cfg_scale=1.0, generator=None):
    """Sample G image-code sequences for each prompt. Returns codes (B*G, N_img), their log-probs under the
    untruncated temperature-scaled policy as the sampler saw them (a check on the cache; gvu_step takes pi_old
    from its training pass), and the tokenised prefixes for the training pass."""
    umm.lm.eval()  # eval mode: gradient checkpointing is off, so the KV cache stays on
    umm.set_generation_mode("image")
    texts = [umm.t2i_prompt(p) for p in prompts for _ in range(G)]  # B*G, group members adjacent
    cfg = cfg_scale != 1.0
    if cfg:  # the model's own unconditional prompt (X-Omni: the image prefix alone; Janus: padded prompt)
        texts = texts + [umm.uncond_prompt(p) for p in prompts for _ in range(G)]
    # R = the rows in the batch: B*G conditional rows, then (with CFG) B*G unconditional ones, so R = 2*B*G
    enc = umm.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt").to(
        umm.lm.device
    )
    mask, pos, cache = enc.attention_mask, left_pad_positions(enc.attention_mask), DynamicCache()
    hidden = umm.hidden_states(enc.input_ids, mask, pos, cache)[:, -1]  # (R, D) prefill
    n_img = umm.grid[0] * umm.grid[1]
    codes, old_logp = [], []
    for i in range(n_img):
        logits = umm.logits(hidden).float()  # (R, K) image vocabulary only
        if not torch.isfinite(
            logits
        ).all():  # multinomial would crash on them (on CUDA: a device assert)
            raise TrainingError("the policy's image logits are not finite while sampling")
        cond, uncond = logits.chunk(2) if cfg else (logits, None)  # (B*G, K) each
        probs = sampling_probs(cond, uncond, cfg_scale, temperature, top_k, min_p)
        code = torch.multinomial(probs, 1, generator=generator)  # (B*G, 1)
        codes.append(code)
        # the ratio uses the untruncated conditional policy (departure 4)
        old_logp.append(F.log_softmax(cond / temperature, -1).gather(-1, code))
        if i == n_img - 1:
            break
        ids = (code + umm.image_offset).repeat(2 if cfg else 1, 1)  # (R, 1)
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], 1)
        pos = pos[:, -1:] + 1
        hidden = umm.hidden_states(ids, mask, pos, cache)[:, -1]
    n = len(codes[0])
    return dict(
        codes=torch.cat(codes, 1),
        old_logp=torch.cat(old_logp, 1),  # (B*G, N_img) each
        prefix_ids=enc.input_ids[:n],
        prefix_mask=enc.attention_mask[:n],
    )


# -----------------------------------------------------------------------------
# 2. token-level intrinsic reward: the geometric mean of the prompt's token probabilities
def intrinsic_reward(token_logp, mask):
    """R = (prod_j p_j)^(1/L) = exp(mean_j log p_j), in log space, fp32. token_logp, mask: (N, L);
    positions where mask is 0 are ignored whatever token_logp holds there."""
    token_logp, mask = token_logp.float(), mask.float()
    return torch.exp(
        token_logp.masked_fill(mask == 0, 0.0).sum(1) / mask.sum(1)
    )  # (N,); not `* mask`: -inf * 0 = NaN


def answer_ids(umm, prompts, end_of_turn=True):
    """The scored answer of each prompt as token ids: answer_prefix + prompt (+ answer_suffix, the end-of-turn
    token, unless end_of_turn is off: the paper scores T_1..T_L only; departure 2)."""
    suffix = umm.answer_suffix if end_of_turn else ""
    return umm.tokenizer(
        [umm.answer_prefix + p + suffix for p in prompts], add_special_tokens=False
    ).input_ids


def caption_token_logprobs(umm, images, prompts, instruction, micro_batch=64, end_of_turn=True):
    """Understanding branch: log p(T_j | instruction, image, T_<j) for every prompt token (+ the end-of-turn
    token if end_of_turn), one teacher-forced forward per micro-batch. `images`: N PIL images, or
    (--reward-input codes) the generated codes (N, h*w), read as they are. Returns logp (N, L) and mask (N, L),
    right-padded."""
    umm.set_generation_mode("text")
    tok, dev = umm.tokenizer, umm.lm.device
    ctx = tok(
        umm.caption_prompts(images, instruction), add_special_tokens=False
    ).input_ids  # one image-tokenizer call
    ans = answer_ids(umm, prompts, end_of_turn)
    n_ctx, n_ans = (
        torch.tensor([len(c) for c in ctx]),
        torch.tensor([len(a) for a in ans]),
    )  # (N,) each
    seqs = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(c + a) for c, a in zip(ctx, ans)], True, tok.pad_token_id
    )
    target = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(a) for a in ans], True, tok.pad_token_id
    )  # (N, L)
    L = target.shape[1]
    valid = (torch.arange(L) < n_ans[:, None]).float()  # (N, L)
    # position t predicts token t+1: answer token j sits at n_ctx+j, so read position n_ctx+j-1
    where = n_ctx[:, None] - 1 + torch.arange(L).minimum(n_ans[:, None] - 1)  # (N, L)
    out_logp = torch.zeros(len(ans), L, device=dev)
    for s in range(0, len(ans), micro_batch):
        mb = slice(s, s + micro_batch)
        T = (
            (n_ctx[mb] + n_ans[mb]).max().item()
        )  # this micro-batch's longest sequence, right-padded
        ids, attn = (
            seqs[mb, :T].to(dev),
            (torch.arange(T) < (n_ctx[mb] + n_ans[mb])[:, None]).long().to(dev),
        )
        hidden = umm.hidden_states(ids, attn, images=images[mb])  # (n, T, D); Janus encodes pixels
        hidden = hidden.gather(
            1, where[mb, :, None].to(dev).expand(-1, -1, hidden.shape[-1])
        )  # (n, L, D)
        logits = umm.logits(hidden).float()  # (n, L, V) text vocabulary
        # log p(target) = its logit - logsumexp over the row: no full (n, L, V) log-softmax copy
        logp = logits.gather(-1, target[mb, :, None].to(dev))[..., 0] - logits.logsumexp(
            -1
        )  # (n, L)
        out_logp[mb] = logp * valid[mb].to(dev)
    return out_logp, valid.to(dev)


@torch.no_grad()
def intrinsic_rewards(umm, images, prompts, args):
    """The default reward_fn of gvu_step: each image's intrinsic reward for its prompt (N,), and the per-token
    terms it is made of, token_logp and mask (N, L), which the sample grids shade word by word.
    A fork swaps this for any `reward_fn(umm, images, prompts, args) -> (N,) rewards` (terms optional)."""
    token_logp, mask = caption_token_logprobs(
        umm, images, prompts, args.instruction, args.micro_batch, args.score_end_of_turn
    )
    return intrinsic_reward(token_logp, mask), token_logp, mask


# -----------------------------------------------------------------------------
# 3. group advantage
def group_advantages(rewards, G, eps=1e-4):
    """A_i = (R_i - mean_group) / (std_group + eps). rewards (B*G,) with groups adjacent -> (B*G,).
    A group whose rewards are all equal gets exactly 0 (0 / eps), never NaN."""
    r = rewards.view(-1, G)  # (B, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


# -----------------------------------------------------------------------------
# 4. policy log-probs with grad, and the clipped KL-regularised GRPO loss
def image_token_logprobs(umm, prefix_ids, prefix_mask, codes, temperature=1.0):
    """Generation branch: teacher-forced log pi(code_t | prompt, code_<t) over image positions, image
    vocabulary only. prefix (N, P) left-padded as in the rollout; codes (N, N_img) -> (N, N_img)."""
    umm.set_generation_mode("image")
    ids = torch.cat([prefix_ids, codes + umm.image_offset], 1)  # (N, P + N_img)
    mask = torch.cat([prefix_mask, prefix_mask.new_ones(codes.shape)], 1)
    hidden = umm.hidden_states(ids[:, :-1], mask[:, :-1], left_pad_positions(mask)[:, :-1])
    hidden = hidden[:, prefix_ids.shape[1] - 1 :]  # (N, N_img, D): the positions that predict codes
    logp = F.log_softmax(umm.logits(hidden).float() / temperature, -1)  # (N, N_img, K)
    return logp.gather(-1, codes[..., None])[..., 0]  # (N, N_img)


def grpo_loss(logp, old_logp, ref_logp, adv, clip_eps=0.2, beta=0.03):
    """Clipped surrogate minus beta * k3 KL, per image token. logp/old_logp/ref_logp (N, N_img), adv (N,).
    Reduction: mean over image tokens, then over samples. Image sequences have a fixed length, so the
    GRPO, DAPO and Dr.GRPO reductions differ only by a constant here."""
    # gvu_step's first update passes old_logp = logp.detach(): the ratio is exactly 1 while its gradient is
    # grad logp, so with mu=1 the clip is inert and this is REINFORCE with a group baseline
    ratio = torch.exp(logp - old_logp)  # (N, N_img)
    a = adv[:, None]
    pg_loss = torch.max(
        -a * ratio, -a * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    )  # (N, N_img)
    kl = (
        torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    )  # k3, unbiased and >= 0 (http://joschu.net/blog/kl-approx.html)
    loss = (pg_loss + beta * kl).mean(1).mean()
    with torch.no_grad():
        stats = dict(
            kl=kl.mean().item(),
            clip_frac=((ratio - 1).abs() > clip_eps).float().mean().item(),
            ratio=ratio.mean().item(),
        )
    return loss, stats


# -----------------------------------------------------------------------------
# 5. one GvU step: rollout -> decode -> reward -> advantages -> mu clipped, KL-regularised updates
def stopwatch(timings):
    """lap(name) adds the seconds since the previous lap to timings[name] (CUDA synchronised first, so a lap is
    the phase's real time); with timings=None every lap is a no-op. tools/bench.py's step-time breakdown."""
    if timings is None:
        return lambda name: None
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    last = [time.perf_counter()]

    def lap(name):
        sync()
        now = time.perf_counter()
        timings[name], last[0] = timings.get(name, 0.0) + now - last[0], now

    return lap


def is_sample_step(step, args):
    return step % args.sample_every == 0 or step == args.steps - 1


@torch.no_grad()
def sample_and_reward(
    umm, policy, batch, seed, args, reward_fn, decode=True, lap=lambda name: None
):
    """Steps 1-2 on B prompts: G samples each from the current policy (sampling seeded by `seed`), and the judge's
    rewards. Returns the rollout, the images (None with --reward-input codes unless decode), rewards (B*G,) and
    the reward's per-token terms (B*G, L) if it hands them back."""
    judge = policy.disable_adapter if args.reward_model == "frozen" else nullcontext
    ro = rollout(
        umm,
        batch,
        args.group_size,
        args.temperature,
        args.top_k,
        args.min_p,
        args.cfg_scale,
        torch.Generator(umm.lm.device).manual_seed(seed),
    )
    lap("rollout")
    group_prompts = [p for p in batch for _ in range(args.group_size)]  # (B*G,)
    # the judge reads pixels (decoded, then re-tokenised: the paper's path) or the generated codes as they are;
    # then the frozen decoder runs only where images are wanted (the sample grids)
    pixels = args.reward_input == "pixels"
    images = (
        umm.decode_images(ro["codes"], torch.Generator().manual_seed(seed), prompts=group_prompts)
        if pixels or decode
        else None
    )
    lap("decode")
    with judge():
        out = reward_fn(umm, images if pixels else ro["codes"], group_prompts, args)
    # the default reward also hands back its per-token terms (the sample grid shades them); a fork may not
    rewards, token_logp = (
        (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    )  # (B*G,), (B*G, L)
    lap("reward")
    return ro, images, rewards, token_logp


def sampling_seed(seed, step, rank=0, batch=0):
    """Every rollout's sampling derives from (run seed, step, torchrun rank, dynamic sampling's batch). A CPU
    generator keeps only the low 32 bits of its seed, so ranks and batches are spread by large odd multipliers,
    never by high bits alone."""
    return seed * 1_000_003 + step + rank * 0x9E3779B1 + batch * 0x85EBCA6B


def dynamic_sample(
    umm, policy, batches, seeds, args, reward_fn, decode=True, lap=lambda name: None
):
    """DAPO's dynamic sampling around sample_and_reward: roll out batches[0], then each next batch of fresh prompts
    while fewer than B groups have rewards that differ; keep the first B groups with spread, in order, filled up
    with groups without spread (the first batch's first) when the batches run out, so B stays fixed. Returns
    the kept prompts (B,), then what sample_and_reward returns for them, and how many batches were rolled out.
    seeds: one sampling seed per batch. A batch with a non-finite reward is returned as it is, for gvu_step to stop."""
    B, G = len(batches[0]), args.group_size
    outs = []
    for batch, seed in zip(batches, seeds):
        outs.append(sample_and_reward(umm, policy, batch, seed, args, reward_fn, decode, lap))
        if not torch.isfinite(
            outs[-1][2]
        ).all():  # NaN > 0 is False: such a group would be swapped out unseen
            return batch, *outs[-1], len(outs)
        spread = torch.cat([o[2].view(-1, G).std(1).cpu() > 0 for o in outs])  # (groups so far,)
        if spread.sum() >= B:
            break
    if len(outs) == 1:
        return batches[0], *outs[0], 1
    ros, images, rewards, token_logp = zip(*outs)
    keep = (
        torch.cat([spread.nonzero()[:, 0], (~spread).nonzero()[:, 0]])[:B].sort().values
    )  # (B,) group indices
    rows = (keep[:, None] * G + torch.arange(G)).view(-1)  # (B*G,) their samples
    pads = dict(
        prefix_ids=umm.tokenizer.pad_token_id, prefix_mask=0
    )  # prefixes: left-padded per batch, as rolled out
    ro = {
        k: torch.cat(left_pad([o[k] for o in ros], pads[k]) if k in pads else [o[k] for o in ros])[
            rows
        ]
        for k in ros[0]
    }
    images = None if images[0] is None else [im for ims in images for im in ims]
    images = images and [images[i] for i in rows.tolist()]
    token_logp = (
        None
        if token_logp[0] is None
        else torch.nn.utils.rnn.pad_sequence(
            [t for tl in token_logp for t in tl], batch_first=True
        )[rows]
    )  # each batch's (N, L_r), right-padded to the longest
    prompts = [p for batch in batches[: len(outs)] for p in batch]
    return (
        [prompts[i] for i in keep.tolist()],
        ro,
        images,
        torch.cat(rewards)[rows],
        token_logp,
        len(outs),
    )


def left_pad(tensors, value):
    """Left-pad (n_i, P_i) tensors to the longest P, as the rollout pads its prefixes, to concatenate them."""
    P = max(t.shape[1] for t in tensors)
    return [F.pad(t, (P - t.shape[1], 0), value=value) for t in tensors]


def probe_reward(umm, policy, prompts, args, autocast=nullcontext(), reward_fn=intrinsic_rewards):
    """The mean reward on the same B training prompts (the first step's) with the same sampling seed, every time.
    The per-step reward changes prompts and seeds each step, so its curve is noisy; this one shows learning."""
    seed = (args.seed + 1) * 1_000_003 - 1  # outside every step's seed (seed * 1_000_003 + step)
    with autocast:
        rewards = sample_and_reward(
            umm,
            policy,
            prompt_batch(prompts, 0, args.batch_prompts, args.seed),
            seed,
            args,
            reward_fn,
            decode=False,
        )[2]
    return rewards.mean().item()


def gvu_step(
    umm,
    policy,
    optimizer,
    batch,
    step,
    args,
    autocast=nullcontext(),
    reward_fn=intrinsic_rewards,
    timings=None,
    ddp=None,
    reserve=(),
):
    """One GvU step on B prompts, in micro-batches. `reward_fn(umm, images, prompts, args) -> (N,)` is the
    fork point for other rewards (tools/experiments.py's pixel oracle); it may also return per-token terms,
    `(rewards, token_logp, mask)`, as the default does. Returns (rewards, images, stats, token_logp or None);
    with --reward-input codes, images is None except on sample steps. timings: a dict that gets seconds per phase.
    reserve: further batches of B prompts for --dynamic-sampling; the groups trained on may then come from them,
    and stats["batch"] holds their prompts.
    torchrun: `batch` is this rank's slice, ddp its DistributedDataParallel training pass (tools/distributed.py);
    the returned rewards are every rank's (B*G,), the images and token_logp this rank's own."""
    G, mb = args.group_size, args.micro_batch
    N = len(batch) * G
    params = [p for p in policy.parameters() if p.requires_grad]
    rank = (
        torch.distributed.get_rank() if ddp is not None else 0
    )  # torchrun: each rank samples its own stream
    train_logprobs = (
        partial(image_token_logprobs, umm) if ddp is None else ddp
    )  # torchrun: the same pass through DDP
    lap = stopwatch(timings)
    with autocast:
        seeds = [sampling_seed(args.seed, step, rank, r) for r in range(1 + len(reserve))]
        batch, ro, images, rewards, token_logp, n_batches = dynamic_sample(
            umm, policy, [batch, *reserve], seeds, args, reward_fn, is_sample_step(step, args), lap
        )
        adv = group_advantages(
            rewards, G
        )  # (B*G,) groups never straddle ranks: local advantages are exact
        rewards = distributed.gather(
            rewards.float()
        )  # torchrun: every rank's rewards, in batch order
        if not torch.isfinite(
            rewards
        ).all():  # (checked on the gathered rewards: all ranks stop together)
            raise TrainingError(f"non-finite reward at step {step}")
        with torch.no_grad(), policy.disable_adapter():  # pi_ref: same weights, adapter off
            ref_logp = torch.cat(
                [
                    image_token_logprobs(
                        umm,
                        ro["prefix_ids"][s : s + mb],
                        ro["prefix_mask"][s : s + mb],
                        ro["codes"][s : s + mb],
                        args.temperature,
                    )
                    for s in range(0, N, mb)
                ]
            )
        lap("reference")
        umm.lm.train()  # gradient checkpointing is active in train mode
        # pi_old: the policy that sampled, i.e. the weights before this step's first update. Its log-probs are
        # taken from the first update's own pass (detached), as the official code and TRL do, not from the
        # rollout: the KV-cached eval-mode pass differs by rounding (more so in bf16), and a ratio off by more
        # than clip_eps would silently drop that token's gradient. Later iterations (mu > 1) reuse them.
        old_logp = {}
        for it in range(args.num_iterations):
            optimizer.zero_grad(set_to_none=True)
            stats = dict(loss=0.0, kl=0.0, clip_frac=0.0, ratio=0.0)
            for s in range(0, N, mb):
                sl = slice(s, s + mb)
                # torchrun: DDP all-reduces the gradients once, in the last micro-batch's backward
                with ddp.no_sync() if ddp is not None and s + mb < N else nullcontext():
                    logp = train_logprobs(
                        ro["prefix_ids"][sl],
                        ro["prefix_mask"][sl],
                        ro["codes"][sl],
                        args.temperature,
                    )
                    if it == 0:
                        old_logp[s] = logp.detach()  # (mb, N_img)
                    loss, st = grpo_loss(
                        logp, old_logp[s], ref_logp[sl], adv[sl], args.clip_eps, args.beta
                    )
                    if ddp is None and not torch.isfinite(
                        loss
                    ):  # (torchrun: the all-reduced grad norm says it)
                        raise TrainingError(
                            f"non-finite loss at step {step}; its update was not applied"
                        )
                    # micro-batches add up to this rank's mean; DDP then averages the W ranks' means, which is
                    # exactly the whole-batch mean because every rank holds the same count N = B/W * G
                    w = len(logp) / N
                    (loss * w).backward()
                for k, v in dict(st, loss=loss.item()).items():
                    stats[k] += v * w
            stats = distributed.mean_over_ranks(
                stats, umm.lm.device
            )  # torchrun: whole-batch statistics
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
            if not math.isfinite(stats["grad_norm"]):
                raise TrainingError(
                    f"non-finite gradient norm at step {step}; its update was not applied"
                )
            optimizer.step()
        lap("update")
    if reserve:  # --dynamic-sampling: how many batches this rank rolled out, and the prompts of its groups kept
        stats.update(rollout_batches=n_batches, batch=batch)
    return (
        rewards,
        images,
        stats,
        token_logp,
    )  # token_logp (B*G, L): kept for the sample grid, not recomputed


# -----------------------------------------------------------------------------
# helpers: the prompt stream, checkpointing, the sample grid's words (tools/runio.py reads and checks the prompts)
def prompt_batch(prompts, step, B, seed):
    """The B prompts of `step`: a fresh seeded shuffle per epoch, so the stream is a function of step."""
    n, ks = len(prompts), range(step * B, (step + 1) * B)
    perms = {
        e: torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()
        for e in {k // n for k in ks}
    }
    return [prompts[perms[k // n][k % n]] for k in ks]


def reserve_batches(prompts, step, args):
    """--dynamic-sampling's fresh prompts for `step`: N batches of B from a second stream, shuffled with other seeds
    (a CPU generator keeps a seed's low 32 bits: the offset must change them), so that they too are a function of
    step (resume-safe) and the main stream is the same with or without it."""
    K, B = args.dynamic_sampling, args.batch_prompts
    return [prompt_batch(prompts, step * K + k, B, args.seed + 0x5BD1E995) for k in range(K)]


def enable_checkpointing(lm):
    """Non-reentrant gradient checkpointing; active in train mode only, so rollouts keep their cache."""
    enable = (
        getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
    )  # renamed in v5
    enable({"use_reentrant": False})


def token_texts(umm, prompt, end_of_turn=True):
    """The scored answer's tokens as text, one per term of the reward (words for the tiny UMM, BPE pieces else)."""
    return [umm.tokenizer.decode([i]).strip() for i in answer_ids(umm, [prompt], end_of_turn)[0]]


# -----------------------------------------------------------------------------
# the training loop
RESUME_MAY_CHANGE = {
    "steps",
    "epochs",
    "resume",
    "out",
    "save_every",
    "sample_every",
    "probe_every",
    "report_to",
}  # all else must match


def check_args(args):
    """Refuse bad input before anything is loaded or written: one line naming every bad flag."""
    fin = math.isfinite
    rules = [  # (flag, valid?, what it must be)
        ("steps", args.steps >= 1, ">= 1"),
        ("batch_prompts", args.batch_prompts >= 1, ">= 1"),
        ("group_size", args.group_size >= 2, ">= 2: advantages compare samples within a group"),
        ("lr", fin(args.lr) and args.lr > 0, "> 0"),
        ("beta", fin(args.beta) and args.beta >= 0, ">= 0"),
        ("clip_eps", fin(args.clip_eps) and 0 < args.clip_eps < 1, "in (0, 1)"),
        ("num_iterations", args.num_iterations >= 1, ">= 1"),
        ("dynamic_sampling", args.dynamic_sampling >= 0, ">= 0 (0 = off)"),
        ("lora_r", args.lora_r >= 1, ">= 1"),
        ("lora_alpha", args.lora_alpha >= 1, ">= 1"),
        ("max_grad_norm", fin(args.max_grad_norm) and args.max_grad_norm > 0, "> 0"),
        (
            "temperature",
            fin(args.temperature) and args.temperature >= 0.1,
            ">= 0.1: colder, a group's samples are copies, every advantage is 0 and nothing is learned",
        ),
        ("top_k", args.top_k >= 0, ">= 0"),
        ("min_p", fin(args.min_p) and 0 <= args.min_p < 1, "in [0, 1)"),
        ("cfg_scale", fin(args.cfg_scale) and args.cfg_scale >= 1, ">= 1 (1 = off)"),
        ("micro_batch", args.micro_batch >= 1, ">= 1"),
        ("save_every", args.save_every >= 1, ">= 1"),
        ("sample_every", args.sample_every >= 1, ">= 1"),
        ("probe_every", args.probe_every >= 0, ">= 0 (0 = off)"),
        ("seed", 0 <= args.seed < 2**32, "in [0, 2**32)"),
        ("epochs", fin(args.epochs) and args.epochs >= 0, ">= 0 (0 = use --steps)"),
        ("warmup_steps", args.warmup_steps >= 0, ">= 0"),
        ("image_size", args.image_size >= 0, ">= 0 (0 = the model's default)"),
    ]
    bad = [
        f"--{flag.replace('_', '-')} must be {what} (got {getattr(args, flag)})"
        for flag, ok, what in rules
        if not ok
    ]
    if bad:
        raise InputError("; ".join(bad))
    pick_device(args.device)  # an unavailable device is an InputError
    runio.check_run_folder(
        args.out, args.resume, asdict(args), RESUME_MAY_CHANGE, asdict(Args())
    )  # new, or resumed
    return runio.read_prompts(args.prompts)


def check_against_model(umm, args, prompts, lines):
    """The checks that need the loaded model; they run before anything is written."""
    if args.top_k > umm.image_vocab_size:
        raise InputError(
            f"--top-k must be <= the model's {umm.image_vocab_size} image codes (got {args.top_k})"
        )
    runio.check_vocabulary(umm, prompts, lines)
    runio.check_context(umm, prompts, lines, args.instruction, args.prompts)
    if args.reward_input == "codes" and not umm.understands_codes:
        raise InputError(
            f"--reward-input codes: {type(umm).__name__}'s understanding does not read its generated codes"
        )


def lora_modules(umm, only=""):
    """What gets LoRA: the model's own targets (umm.lora_targets, as peft matches them), or with --lora-targets
    those of them whose last name is listed in `only`, as one anchored regex of their full names (peft fullmatches
    a string, so no other module whose name merely ends like one of them is wrapped); an unknown name is an InputError."""
    if not only:
        return umm.lora_targets
    own, keep = (
        LoraConfig(target_modules=umm.lora_targets),
        [k.strip() for k in only.split(",") if k.strip()],
    )
    last = {
        n: n.rsplit(".", 1)[-1]
        for n, _ in umm.lm.named_modules()
        if check_target_module_exists(own, n)
    }
    missing = [k for k in keep if k not in last.values()]
    if (
        missing or not keep
    ):  # add_lora runs before open_run, so this is still refused before anything is written
        raise InputError(
            f"--lora-targets: the model has no LoRA layer named {', '.join(missing) or repr(only)} "
            f"(its layers: {', '.join(sorted(set(last.values())))})"
        )
    return "|".join(re.escape(n) for n, k in last.items() if k in keep)


def add_lora(umm, args):
    """LoRA on the LM's linear layers (injected into umm.lm in place), gradient checkpointing, AdamW (weight
    decay 0, as the official run) and its lr schedule over args.steps (transformers' own schedulers)."""
    umm.lm.requires_grad_(False)
    policy = get_peft_model(
        umm.lm,
        LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            target_modules=lora_modules(umm, args.lora_targets),
        ),
    )
    enable_checkpointing(umm.lm)
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0
    )
    name = (
        "constant_with_warmup" if args.lr_schedule == "constant" else args.lr_schedule
    )  # (no warm-up: constant)
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.steps
    )
    return policy, optimizer, scheduler


def train(args, reward_fn=intrinsic_rewards):
    prompts, lines = check_args(args)
    rank, world, is_main = distributed.setup(
        args.batch_prompts
    )  # torchrun: join the group; else (0, 1, True)
    loggers.require(
        args.report_to
    )  # a missing tensorboard / wandb is refused before anything is created
    if (
        args.epochs > 0
    ):  # whole passes over the prompts (the official run: 4 x 50,000 / 8 = 25,000 steps)
        args.steps = math.ceil(args.epochs * len(prompts) / args.batch_prompts)

    # device and dtype: cuda > mps > cpu; bf16 autocast where the GPU has it, fp32 elsewhere
    device = pick_device(args.device)
    bf16 = use_bf16(args.dtype, device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else nullcontext()

    umm = load_umm(
        args.model,
        args.seed,
        args.trust_remote_code,
        args.flux,
        device,
        bf16,
        args.image_size,
        args.decoder_text,
    ).to(device)
    check_against_model(umm, args, prompts, lines)
    torch.manual_seed(
        args.seed
    )  # the LoRA init (torch >= 2.13 seeds each process at random otherwise)
    policy, optimizer, scheduler = add_lora(umm, args)
    ddp = distributed.wrap(
        partial(image_token_logprobs, umm), policy
    )  # torchrun: DDP over the LoRA; else None

    start, lock = runio.open_run(
        args, policy, optimizer, scheduler, device, is_main
    )  # the first write to --out
    log_path, state_path = os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "state.pt")
    logger = loggers.make_logger(
        args.report_to, args.out, asdict(args), start, is_main
    )  # a no-op unless main process

    def save(
        step,
    ):  # state.pt first (the source of truth), then adapter/; no non-finite number is ever saved
        state = dict(
            step=step,
            prompt_pos=step * args.batch_prompts,
            lora=get_peft_model_state_dict(policy),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            rng=torch.get_rng_state(),
        )
        if not runio.all_finite(state):
            raise TrainingError(
                f"the weights are not finite after step {step - 1}; nothing was saved from it"
            )
        runio.atomic_save(state, state_path)
        runio.save_adapter(
            policy, os.path.join(args.out, "adapter"), runio.adapter_info(args, policy, step)
        )

    bar = tqdm(
        range(start, args.steps),
        initial=start,
        total=args.steps,
        desc="gvu",
        dynamic_ncols=True,
        disable=not is_main,
    )
    for step in bar:
        probe = (
            probe_reward(umm, policy, prompts, args, autocast, reward_fn)
            if args.probe_every and step % args.probe_every == 0
            else None
        )  # a function of step alone: resume-safe
        t0 = time.time()
        batch = prompt_batch(prompts, step, args.batch_prompts, args.seed)
        batch = distributed.local_slice(
            batch, rank, world
        )  # torchrun: this rank's B/N prompts; else all B
        reserve = [
            distributed.local_slice(b, rank, world) for b in reserve_batches(prompts, step, args)
        ]
        lr = scheduler.get_last_lr()[0]  # the lr of this step's updates
        rewards, images, stats, token_logp = gvu_step(
            umm, policy, optimizer, batch, step, args, autocast, reward_fn, ddp=ddp, reserve=reserve
        )  # rewards: all ranks' (B*G,)
        batch = stats.pop(
            "batch", batch
        )  # --dynamic-sampling: the groups kept may come from the reserve
        scheduler.step()
        if not is_main:
            continue  # torchrun: the other ranks neither log nor save
        group_prompts = [
            p for p in batch for _ in range(args.group_size)
        ]  # (B*G,) (torchrun: rank 0's B/N * G)
        zero_std = (rewards.view(-1, args.group_size).std(1) == 0).float().mean().item()
        row = dict(
            step=step,
            samples=len(rewards),
            reward_mean=rewards.mean().item(),
            reward_std=rewards.std().item(),
            frac_zero_std=zero_std,
            **stats,
            lr=lr,
            seconds=time.time() - t0,
        )
        if probe is not None:
            row["probe_reward"] = probe  # before this step's update
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        logger.scalars(row, step)
        bar.set_postfix(reward=f"{row['reward_mean']:.4f}", kl=f"{row['kl']:.4f}")
        tqdm.write(
            f"step {step:5d} | reward {row['reward_mean']:.4f} ± {row['reward_std']:.4f} | kl {row['kl']:.4f} "
            f"| clip {row['clip_frac']:.3f} | zero-std {zero_std:.2f} | grad {row['grad_norm']:.3f} | {row['seconds']:.1f}s"
            + (f" | {row['rollout_batches']} batches" if "rollout_batches" in row else "")
        )
        if is_sample_step(step, args):
            texts = [token_texts(umm, p, args.score_end_of_turn) for p in group_prompts]
            grid = loggers.save_grid(
                os.path.join(args.out, "samples", f"step_{step:05d}.png"),
                group_prompts,
                images,
                rewards[: len(images)].tolist(),
                args.group_size,
                texts=texts,
                token_logp=token_logp,
            )
            logger.image("samples", grid, step)
        if (step + 1) % args.save_every == 0 or step == args.steps - 1:
            save(step + 1)
    logger.close()
    if lock is not None:
        lock.close()
    del ddp  # torchrun: DDP holds the process group, which distributed.teardown must be the one to destroy
    distributed.teardown()
    return log_path


def parse_args(argv=None):
    """Flags, optionally after a config file: `python gvu.py configs/xomni_paper.json --out runs/x`."""
    parser = HfArgumentParser(Args, description=__doc__.split("\n\n")[0])
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        tokens = (
            runio.config_flags(argv[0], argv[1:], [f.name for f in fields(Args)]) + argv[1:]
            if argv and not argv[0].startswith("-")
            else argv
        )
    except InputError as e:
        parser.error(str(e))
    args, rest = parser.parse_args_into_dataclasses(tokens, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.epochs > 0 and any(t == "--steps" or t.startswith("--steps=") for t in tokens):
        parser.error("give --steps or --epochs, not both")
    if args.epochs < 0 or args.warmup_steps < 0:
        parser.error("--epochs and --warmup-steps must be >= 0")
    return args


def main(argv=None, reward_fn=intrinsic_rewards):
    args = parse_args(argv)
    try:
        train(args, reward_fn)
        return
    except InputError as e:
        msg = f"error: {e}"
    except (
        TrainingError,
        OSError,
    ) as e:  # OSError: a full disk, a folder made read-only mid-run, ...
        msg = f"error: {(str(e) or type(e).__name__).splitlines()[0]}; {runio.saved_note(args.out)}"
    # outside the except: the traceback, and with it the run folder's lock, is already released;
    # torchrun: rank 0 says it once, the other ranks exit non-zero
    sys.exit(msg if os.environ.get("RANK", "0") == "0" else 1)


if __name__ == "__main__":
    main()
