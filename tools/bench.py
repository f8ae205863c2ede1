"""
Side-by-side measurements of what gvu.py does differently from the official code, in one run;
every figure is the median [min-max] of --repeats runs (5), the contenders interleaved so a busy
moment hits both:

  1. reward:   one batched teacher-forced forward  vs  the official loop (one uncached forward of
               the full LM per prompt token, one image at a time); the rewards must be identical;
  2. rollout:  one batched KV-cached pass          vs  recomputing the whole sequence at every
               token (64 image tokens);
  3. memory:   peak memory of the policy forward + backward (LoRA r=8, as the trainer) with
               gradient checkpointing on vs off, measured (CUDA: max_memory_allocated; CPU: peak
               resident set of a fresh process, with glibc's mmap threshold fixed so that freed
               blocks leave the resident set);
  4. step:     where the time of a real gvu.gvu_step goes (its timing hook), on the shipped tiny
               UMM, with --reward-input pixels (decode, re-tokenise) and codes (no decode).

    python -m tools.bench                 # tiny UMM on the CPU, a few minutes
    # codes vs pixels rewards on base samples
    python -m tools.bench --reward-agreement prompts/shapes_geneval.jsonl

And the memory plan for real models (second half of this file):

  5. --gpu-rehearsal: builds RANDOMLY INITIALISED models at the real sizes on CUDA (nothing is
     downloaded) and runs a few gvu.gvu_step calls, the trainer's own step (bf16, gradient
     checkpointing, LoRA r=8 / alpha=32, micro-batches), printing peak CUDA memory and seconds per
     step;
  6. --estimate: the same sizes as arithmetic (parameters, KV cache, activations), on the CPU.

    # janus1b, janus7b, xomni7b; skips without CUDA
    python -m tools.bench --gpu-rehearsal
    python -m tools.bench --gpu-rehearsal --configs xomni7b --steps 3 --prompts 8 --group-size 8
    # the same code path, tiny, on the CPU
    python -m tools.bench --gpu-rehearsal --configs tiny-janus,tiny-xomni
    python -m tools.bench --estimate --configs xomni7b           # seconds, CPU only

  6. --ddp N: seconds per step of the same gvu.py run in one process and under torchrun with N
     processes.

    # CPU (gloo): a correctness and overhead check
    python -m tools.bench --ddp 2 --prompts 4 --group-size 2
"""

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import gvu
from tools import runio
from models.adapters import dtype_kwarg
from models import tiny_umm
from models.tiny_umm import TinyUMM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
PROMPTS = [
    "a photo of a red circle",
    "a photo of two squares",
    "a photo of a blue triangle left of a large circle",
    "a photo of three yellow triangles",
    "a photo of a purple square and an orange circle",
    "a photo of a small circle above a square",
    "a photo of four circles",
    "a photo of a green triangle",
]


def timed(fns, repeat=5):
    """Run each of `fns` once to warm up, then `repeat` rounds of all of them in turn (so a busy
    moment of a shared machine falls on every contender alike). Returns the last outputs and each
    fn's seconds per round."""
    outs = [fn() for fn in fns]
    seconds = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            outs[i] = fn()
            seconds[i].append(time.perf_counter() - t)
    return outs, [np.array(x) for x in seconds]


def spread(x, unit=1e3, fmt="{:.1f}"):
    """'median [min-max]' of a list of measurements (times `unit`: seconds -> ms by default)."""
    x = np.asarray(x) * unit
    return f"{fmt.format(np.median(x))} [{fmt.format(x.min())}-{fmt.format(x.max())}]"


def official_rewards(umm, images, prompts, instruction):
    """The official method: for each image, one full-LM forward per prompt token, no cache."""
    tok, out = umm.tokenizer, []
    for image, prompt in zip(images, prompts):
        ctx = tok(umm.caption_prompt(image, instruction), add_special_tokens=False).input_ids
        ans = tok(prompt + umm.answer_suffix, add_special_tokens=False).input_ids
        logp = [
            F.log_softmax(
                umm.lm(input_ids=torch.tensor([ctx + ans[:j]]))
                .logits[0, -1, : umm.image_offset]
                .double(),
                -1,
            )[a]
            for j, a in enumerate(ans)
        ]
        out.append(torch.exp(torch.stack(logp).mean()))
    return torch.stack(out)


@torch.no_grad()
def uncached_rollout(umm, prompts, G, generator):
    """Same sampler as gvu.rollout, but every token re-runs the whole sequence (no KV cache)."""
    umm.lm.eval()
    umm.set_generation_mode("image")
    enc = umm.tokenizer(
        [umm.t2i_prompt(p) for p in prompts for _ in range(G)],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    ids, mask = enc.input_ids, enc.attention_mask
    for _ in range(umm.grid[0] * umm.grid[1]):
        hidden = umm.hidden_states(ids, mask, gvu.left_pad_positions(mask))[:, -1]
        code = torch.multinomial(F.softmax(umm.logits(hidden).float(), -1), 1, generator=generator)
        ids, mask = (
            torch.cat([ids, code + umm.image_offset], 1),
            torch.cat([mask, mask.new_ones(len(ids), 1)], 1),
        )
    return ids[:, enc.input_ids.shape[1] :] - umm.image_offset


def stopwatch(timings):
    """gvu_step's timing hook: lap(phase) adds the seconds since the previous lap to
    timings[phase]. CUDA is synchronised first, so a lap is the phase's real time."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    last = [time.perf_counter()]

    def lap(phase):
        sync()
        now = time.perf_counter()
        timings[phase], last[0] = timings.get(phase, 0.0) + now - last[0], now

    return lap


def step_breakdown(model, steps, prompts_path="prompts/train.txt", **overrides):
    """Seconds per phase of real gvu.gvu_step calls (the trainer's defaults: B=8 x G=8, one
    micro-batch, LoRA, checkpointing, mu=1) on `model`, through gvu_step's own timing hook, for
    --reward-input pixels and codes: two copies of the model stepped in turn (pixels step k, codes
    step k), so machine load falls on both alike. Step 0 (a sample step, and the warm-up) is left
    out. Image tokenisation happens inside the reward: it is timed on its own right after each
    pixels step, on the same images, with the batched call the reward makes. `overrides`: other
    gvu.Args fields (the tests use a smaller batch)."""
    runs = {}
    for reward_input in ("pixels", "codes"):
        args = gvu.Args(model=model, reward_input=reward_input, **overrides)
        umm = gvu.load_umm(model)
        torch.manual_seed(args.seed)
        runs[reward_input] = (args, umm, *gvu.add_lora(umm, args))
    (prompts, _), rows = runio.read_prompts(prompts_path), {k: [] for k in runs}
    for step in range(steps + 1):
        for reward_input, (args, umm, policy, optimizer, scheduler) in runs.items():
            batch, t = gvu.prompt_batch(prompts, step, args.batch_prompts, args.seed), {}
            start = time.perf_counter()
            out = gvu.gvu_step(umm, policy, optimizer, batch, step, args, lap=stopwatch(t))
            images = out["images"]
            scheduler.step()  # as gvu.train
            t["step"] = time.perf_counter() - start
            if reward_input == "pixels":
                start = time.perf_counter()
                umm.caption_prompts(images, args.instruction)
                t["tokenise"] = time.perf_counter() - start
            if step > 0:
                rows[reward_input].append(t)
    return {
        k: {name: np.array([r.get(name, 0.0) for r in v]) for name in v[0]} for k, v in rows.items()
    }


@torch.no_grad()
def reward_agreement(model, metadata, group_size=8, batch=8, seed=0):
    """--reward-input codes vs pixels on the base model's own samples of `metadata` (eval_geneval's
    seeds): the share of codes that survive decode -> re-tokenise, the correlation of the two
    rewards (all samples, and within groups after removing each group's mean), and per tag the
    within-group AUC of each reward against the shapes world's pixel oracle (tools/experiments.py
    audit's table)."""
    from tools.experiments import audit_table
    from eval_geneval import read_metadata
    from world import shapes

    umm = gvu.load_umm(model)
    metas = read_metadata(metadata, classes=shapes.SHAPES)
    rows, kept, r_pix, r_code = {"pixels": [], "codes": []}, [], [], []
    for b in range(0, len(metas), batch):
        part, s = metas[b : b + batch], seed * 100_003 + b
        # as eval_geneval.sample_groups on the CPU: one generator for both
        gen = torch.Generator().manual_seed(s)
        ro = gvu.rollout(umm, [m["prompt"] for m in part], group_size, generator=gen)
        images = umm.decode_images(ro["codes"], gen)
        kept.append((umm.image_codes(images) == ro["codes"]).float().mean(1))  # (n,) per image
        prompts = [m["prompt"] for m in part for _ in range(group_size)]
        rewards = {
            k: gvu.intrinsic_reward(*gvu.caption_token_logprobs(umm, x, prompts, INSTRUCTION))
            for k, x in (("pixels", images), ("codes", ro["codes"]))
        }
        r_pix.append(rewards["pixels"])
        r_code.append(rewards["codes"])
        for k, meta in enumerate(part):
            g = slice(k * group_size, (k + 1) * group_size)
            correct = [bool(shapes.oracle(im, meta)[0]) for im in images[g]]
            for path, r in rewards.items():
                rows[path].append(dict(tag=meta["tag"], rewards=r[g].tolist(), correct=correct))
    kept, r_pix, r_code = torch.cat(kept), torch.cat(r_pix), torch.cat(r_code)
    centred = lambda r: r.view(-1, group_size) - r.view(-1, group_size).mean(1, keepdim=True)
    corr = lambda a, b: np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
    print(
        f"agreement of --reward-input codes and pixels, {model}, "
        f"{len(metas)} prompts x G={group_size} ({metadata})"
    )
    print(
        f"  codes surviving decode -> re-tokenise: {kept.mean():.3f} of all codes; "
        f"images with every code kept: {(kept == 1).float().mean():.3f}"
    )
    print(
        f"  reward correlation (Pearson): all samples {corr(r_pix, r_code):.3f}, "
        f"within groups {corr(centred(r_pix), centred(r_code)):.3f} "
        f"| mean reward pixels {r_pix.mean():.4f}, codes {r_code.mean():.4f}"
    )
    tables = {path: audit_table(r) for path, r in rows.items()}
    fmt = lambda v: "  n/a" if v is None else f"{v:.3f}"
    print(f"  {'tag':22s} {'groups':>6s} {'accuracy':>8s} {'AUC pixels':>10s} {'AUC codes':>10s}")
    for tag, v in tables["pixels"].items():
        auc_codes = fmt(tables["codes"][tag]["auc"])
        print(
            f"  {tag:22s} {v['groups']:6d} {v['accuracy']:8.3f} "
            f"{fmt(v['auc']):>10s} {auc_codes:>10s}"
        )
    mean_auc = lambda t: np.mean([v["auc"] for v in t.values() if v["auc"] is not None])
    print(
        f"  {'mean over tags':22s} {'':6s} {'':8s} "
        f"{mean_auc(tables['pixels']):10.3f} {mean_auc(tables['codes']):10.3f}"
    )


PHASES = ("rollout", "decode", "image tokenisation", "reward forward", "reference", "update")


def print_breakdown(model, steps):
    """The step-time table, --reward-input pixels and codes side by side: ms, median [min-max] of
    `steps` steps, and the median share of the step."""
    res = {}
    for reward_input, t in step_breakdown(model, steps).items():
        # codes: no image tokenizer runs (strings only, in the forward)
        tok = t.pop("tokenise", np.zeros(steps))
        phases = (t["rollout"], t["decode"], tok, t["reward"] - tok, t["reference"], t["update"])
        res[reward_input] = dict(zip(PHASES, phases), step=t["step"])
    print(
        f"step     one gvu_step on {model} (B=8 x G=8, micro-batch 64, LoRA, checkpointing), "
        f"ms, median [min-max] of {steps} steps"
    )
    print(f"         {'':20s} | {'--reward-input pixels':>31s} | {'--reward-input codes':>31s}")
    for k in PHASES + ("step",):
        cells = [
            f"{spread(r[k]):>25s} {np.median(r[k] / r['step']) * 100:4.0f}%" for r in res.values()
        ]
        print(f"         {k:20s} | " + " | ".join(cells))
    covered = [np.median(sum(r[k] for k in PHASES) / r["step"]) * 100 for r in res.values()]
    # steps run in turn: each pair saw the same load
    speedup = res["pixels"]["step"] / res["codes"]["step"]
    print(
        f"         phases cover {covered[0]:.0f}% / {covered[1]:.0f}% of the step "
        f"| codes vs pixels: {spread(speedup, 1, '{:.2f}')}x faster per step "
        "(the decode on sample steps left out)"
    )


def memory_worker(checkpointing, hidden, layers, n):
    """Run in a fresh process: one policy forward + backward; report peak memory above the
    baseline."""
    umm = TinyUMM.random(0, hidden=hidden, layers=layers, heads=8)
    # LoRA r=8 / alpha=32 as gvu.add_lora: the gradients are LoRA's only
    umm.lm.requires_grad_(False)
    get_peft_model(
        umm.lm, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=umm.lora_targets)
    )
    if checkpointing:
        gvu.enable_checkpointing(umm.lm)
    ro = gvu.rollout(umm, (PROMPTS * n)[:n], G=1, generator=torch.Generator().manual_seed(0))
    umm.lm.train()
    cuda = torch.cuda.is_available()
    if cuda:
        umm.to("cuda")
        ro = {k: v.cuda() for k, v in ro.items()}
        torch.cuda.reset_peak_memory_stats()
    base = (
        torch.cuda.memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    logp = gvu.image_token_logprobs(umm, ro["prefix_ids"], ro["prefix_mask"], ro["codes"])
    logp.mean().backward()
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    print(json.dumps({"peak_mb": (peak - base) / 2**20, "device": "cuda" if cuda else "cpu"}))


# ==================================================================================================
# 4-5. The memory plan at the real sizes: GPU rehearsal (random weights) and arithmetic estimate
#
# Sizes are those of the released configs; nothing is downloaded, every weight is random.
#   Janus-Pro-1B / -7B (transformers' JanusConfig, what adapters.JanusPro drives):
#     text (Llama): 1B = deepseek-community/Janus-Pro-1B's converted config.json (hidden 2048,
#       24 layers, 16 heads, 16 KV heads, MLP 5632, vocab 102400); 7B = deepseek-ai/Janus-Pro-7B's
#       language_config (30 layers, vocab 102400) with hidden 4096 / 32 heads / MLP 11008 / untied
#       head, as its Llama export (wnma3mz/Janus-Pro-7B-LM) spells out. Heads untied in both
#       (7B: 14.8 GB of bf16 weights).
#     vision: SigLIP-L/16 at 384 px (hidden 1024, 24 layers, 16 heads, 576 tokens) and VQ-16
#       (16384 codes of dim 8 on 24 x 24, channels 128 x [1, 1, 2, 2, 4], 2 res blocks) are
#       JanusVisionConfig's and JanusVQVAEConfig's defaults, which convert_janus_weights_to_hf.py
#       keeps; aligners and the generation head are at the LM's width (n_embed 2048 / 4096 in the
#       original configs).
#   X-Omni-7B: a STAND-IN (X-Omni's own model is remote code, not available offline), XOmniStandIn
#     below: TinyUMM's API over a Qwen2.5-7B-sized Qwen2ForCausalLM (hidden 3584, 28 layers,
#     28 heads, 4 KV heads, MLP 18944, vocabulary 152064 text rows + 16384 image codes) at 512 px =
#     32 x 32 codes; a SigLIP-so400m-sized tower + nearest-code lookup as the SigLIP-VQ tokenizer;
#     FLUX.1-dev's FluxTransformer2DModel (19 + 38 blocks, 24 heads x 128: 11.9B) + AutoencoderKL
#     as the decoder, from their config.json.
# ==================================================================================================
INSTRUCTION = "Describe the image in detail."  # gvu's default understanding instruction
# an "80 GB" card has 79.2 GiB; leave ~1 GiB for the CUDA context and cuBLAS workspaces
FIT_GIB = 78.0


def janus_spec(hidden, layers, heads, mlp):
    return dict(
        kind="janus",
        cfg_scale=5.0,  # Janus samples with CFG 5 (README's command): 2 rows per sample
        text=dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            intermediate_size=mlp,
            vocab_size=102400,
            max_position_embeddings=16384,
            rms_norm_eps=1e-6,
        ),
        # the rest: JanusVisionConfig defaults (SigLIP-L/16, 384 px)
        vision=dict(projection_dim=hidden),
        # the rest: JanusVQVAEConfig (VQ-16)
        vq=dict(projection_dim=hidden, image_token_embed_dim=hidden),
    )


SPECS = {
    "janus1b": janus_spec(2048, 24, 16, 5632),
    "janus7b": janus_spec(4096, 30, 32, 11008),
    "xomni7b": dict(
        kind="xomni",
        cfg_scale=1.0,
        min_p=0.03,  # X-Omni samples without CFG, min-p 0.03
        lm=dict(  # Qwen2.5-7B
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
        ),
        # Qwen2.5's vocabulary rows, then X-Omni's 16384 image codes
        text_vocab=152064,
        codes=16384,
        siglip=dict(  # so400m-sized; 512 / 16 = 32 x 32 codes
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=512,
            patch_size=16,
        ),
        code_dim=64,  # the codebook's width is a guess (tiny either way)
        flux=dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            in_channels=64,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        vae=dict(
            latent_channels=16,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        ),
        text_tokens=512,  # T5 prompt features FLUX attends to (FluxPipeline's max_sequence_length)
    ),
    # the same classes at toy sizes: the rehearsal's code path on the CPU (test_gvu.py)
    "tiny-janus": dict(
        kind="janus",
        cfg_scale=5.0,
        text=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=512,
            max_position_embeddings=256,
        ),
        vision=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            mlp_ratio=2.0,
            projection_dim=64,
            num_image_tokens=16,
        ),
        vq=dict(
            embed_dim=8,
            num_embeddings=64,
            latent_channels=32,
            base_channels=32,
            channel_multiplier=[1, 1, 1, 1],
            num_res_blocks=1,
            projection_dim=64,
            image_token_embed_dim=64,
        ),
    ),
    "tiny-xomni": dict(
        kind="xomni",
        cfg_scale=1.0,
        min_p=0.03,
        lm=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=256,
        ),
        text_vocab=256,
        codes=64,
        siglip=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        code_dim=8,
        flux=dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            in_channels=64,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
        vae=dict(
            latent_channels=16,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        ),
        text_tokens=8,
    ),
}


@contextmanager
def building(device, dtype):
    """Create modules directly on `device` in `dtype`: no fp32 CPU copy of a 12B model first."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


# --- Janus-Pro: transformers' JanusForConditionalGeneration behind adapters.JanusPro ----------
def janus_tokenizer(texts=None):
    """A small byte-level BPE with Janus's special tokens, trained on `texts` (default: PROMPTS and
    the instruction). Only the MODEL has the real 102400-row
    vocabulary; prompts tokenise into more pieces than with DeepSeek's BPE."""
    from models.adapters import ASSISTANT, PAD_TOKEN, USER

    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    image_tokens = dict(
        image_token="<image_placeholder>", boi_token="<begin_of_image>", eoi_token="<end_of_image>"
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts or PROMPTS + [INSTRUCTION],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=[bos, eos, PAD_TOKEN, USER, ASSISTANT, *image_tokens.values()],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=PAD_TOKEN,
        extra_special_tokens=image_tokens,
    )


def build_janus(spec, device, dtype):
    from transformers import JanusConfig, JanusForConditionalGeneration
    from models.adapters import JanusPro

    tok = janus_tokenizer()
    ids = dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    cfg = JanusConfig(
        text_config=dict(model_type="llama", tie_word_embeddings=False, **spec["text"], **ids),
        vision_config=spec["vision"],
        vq_config=spec["vq"],
        tie_word_embeddings=False,
        image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"),
    )
    with building(device, dtype):
        model = JanusForConditionalGeneration._from_config(cfg, **{dtype_kwarg(): dtype})
    # CFG's unconditional rows, as the converted checkpoints
    model.generation_config.pad_token_id = tok.pad_token_id
    return JanusPro(model, tok)


# --- X-Omni stand-in: TinyUMM's API at X-Omni-7B's sizes -------------------------------------
class SiglipVQ(nn.Module):
    """Pixels -> codes in the shape of X-Omni's SigLIP-VQ: a SigLIP vision tower (one token per
    16 px patch), a projection, the nearest of K codebook entries."""

    def __init__(self, siglip, num_codes, code_dim):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        self.vit = SiglipVisionModel._from_config(
            SiglipVisionConfig(**siglip, vision_use_head=False),
            **{dtype_kwarg(): torch.get_default_dtype()},
        )
        self.proj = nn.Linear(siglip["hidden_size"], code_dim)
        self.codebook = nn.Parameter(torch.randn(num_codes, code_dim))
        self.config = SimpleNamespace(
            num_codes=num_codes,
            image_size=siglip["image_size"],
            grid=siglip["image_size"] // siglip["patch_size"],
        )

    @torch.no_grad()
    def encode(self, images):
        """list of PIL -> (N, grid * grid) codes; SigLIP's normalisation (mean = std = 0.5)."""
        s, w = self.config.image_size, self.proj.weight
        px = torch.from_numpy(
            np.stack([np.asarray(im.convert("RGB").resize((s, s))) for im in images])
        )
        px = px.permute(0, 3, 1, 2).to(w.device, w.dtype) / 127.5 - 1  # (N, 3, s, s)
        # (N, grid * grid, code_dim)
        z = self.proj(self.vit(pixel_values=px).last_hidden_state).float()
        return torch.cdist(z, self.codebook.float().expand(len(z), -1, -1)).argmin(-1)


class FluxDecoder(nn.Module):
    """Codes -> pixels with FLUX.1-dev's transformer and VAE. Stand-in for X-Omni's
    FluxTransformer2DModelWithSigLIP: each code's learned embedding is added to its packed latent
    token (32 x 32 codes = the 32 x 32 packed tokens of a 512 px image); the T5 prompt features and
    CLIP's pooled vector are random (the text encoders are kept off the GPU)."""

    def __init__(self, flux, vae, num_codes, text_tokens):
        super().__init__()
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        self.transformer, self.vae = FluxTransformer2DModel(**flux), AutoencoderKL(**vae)
        self.code_embed = nn.Embedding(num_codes, flux["in_channels"])
        self.text_tokens = text_tokens

    @torch.no_grad()
    def forward(self, codes, generator, steps):
        """codes (n, g*g) -> pixels (n, 3, 16g, 16g): `steps` flow-matching Euler steps (FLUX's
        scheduler without its resolution shift), then the VAE decoder."""
        tf, w = self.transformer, self.code_embed.weight
        n, S = codes.shape
        g = int(S**0.5)
        noise = lambda *shape: torch.randn(*shape, generator=generator).to(w.device, w.dtype)
        x = noise(n, S, tf.config.in_channels)  # packed latents: 2 x 2 patches of 16 channels
        txt = noise(n, self.text_tokens, tf.config.joint_attention_dim)
        pooled = noise(n, tf.config.pooled_projection_dim)
        rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        img_ids = (
            torch.stack([torch.zeros_like(rows), rows, cols], -1).view(S, 3).to(w.device, w.dtype)
        )
        txt_ids = torch.zeros(self.text_tokens, 3, device=w.device, dtype=w.dtype)
        guidance = (
            torch.full((n,), 3.5, device=w.device, dtype=w.dtype)
            if tf.config.guidance_embeds
            else None
        )
        cond = self.code_embed(codes.to(w.device))  # (n, S, 64)
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = tf(
                hidden_states=x + cond,
                encoder_hidden_states=txt,
                pooled_projections=pooled,
                guidance=guidance,
                timestep=s.expand(n).to(w.device, w.dtype),
                img_ids=img_ids,
                txt_ids=txt_ids,
            ).sample
            x = x + (s_next - s).item() * v
        # unpack 2 x 2 patches -> (n, 16, 2g, 2g), as FluxPipeline._unpack_latents
        c = tf.config.in_channels // 4
        latents = x.view(n, g, g, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, 2 * g, 2 * g)
        return self.vae.decode(
            latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        ).sample


class XOmniStandIn(TinyUMM):
    """TinyUMM's (= X-Omni's) API over the real-size parts above, random weights: the LM, tokenizer
    and chat format work exactly as in TinyUMM; pixels are re-tokenised by SiglipVQ and decoded by
    FluxDecoder. A memory / speed stand-in for X-Omni-7B, not X-Omni's code."""

    def __init__(self, lm, tokenizer, image_tokenizer, decoder, decode_steps=2, decode_batch=8):
        super().__init__(
            lm, tokenizer, image_tokenizer, decoder, scheduler=None, decode_steps=decode_steps
        )
        self.decode_batch = decode_batch  # images per FLUX pass

    def image_codes(self, images):
        return self.image_tokenizer.encode(images)

    # prompts: unused (the empty decoder text)
    @torch.no_grad()
    def decode_images(self, codes, generator=None, prompts=None):
        chunks = codes.split(self.decode_batch)
        pixels = torch.cat([self.decoder(c, generator, self.decode_steps).float() for c in chunks])
        return tiny_umm.to_pil(pixels.nan_to_num())  # random weights may overflow bf16


def build_xomni(spec, device, dtype, decode_steps):
    # code k is id text_vocab + k, as in X-Omni
    grid = spec["siglip"]["image_size"] // spec["siglip"]["patch_size"]
    tok = tiny_umm.build_tokenizer(
        spec["codes"], extra_words=[str(grid)], text_rows=spec["text_vocab"]
    )
    cfg = Qwen2Config(
        **spec["lm"],
        vocab_size=spec["text_vocab"] + spec["codes"],
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    with building(device, dtype):
        lm = Qwen2ForCausalLM._from_config(cfg, **{dtype_kwarg(): dtype})
    # X-Omni runs tokenizer + decoder in bf16
    with building(device, torch.bfloat16 if device == "cuda" else dtype):
        image_tokenizer = SiglipVQ(spec["siglip"], spec["codes"], spec["code_dim"])
        decoder = FluxDecoder(spec["flux"], spec["vae"], spec["codes"], spec["text_tokens"])
    return XOmniStandIn(lm, tok, image_tokenizer, decoder, decode_steps)


def build_umm(spec, device, dtype, decode_steps=2):
    return (
        build_janus(spec, device, dtype)
        if spec["kind"] == "janus"
        else build_xomni(spec, device, dtype, decode_steps)
    )


def n_params(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def lora_param_count(lm, targets, r):
    """What peft adds: r * (in + out) per targeted Linear (a regex is matched in full, a list by
    last name)."""
    hit = (
        (lambda n: re.fullmatch(targets, n))
        if isinstance(targets, str)
        else (lambda n: n.split(".")[-1] in targets)
    )
    return sum(
        r * (m.in_features + m.out_features)
        for n, m in lm.named_modules()
        if isinstance(m, nn.Linear) and hit(n)
    )


# --- the rehearsal: gvu.gvu_step, the trainer's own step, at real sizes ---------------------------
def rehearse(
    name,
    device="cuda",
    steps=2,
    prompts=8,
    group_size=8,
    micro_batch=8,
    weights=None,
    decode_steps=2,
    lr=1e-6,
    seed=0,
):
    """Build config `name` (SPECS) at its sizes with random weights on `device`, add LoRA r=8 /
    alpha=32 and gradient checkpointing, and run `steps` gvu.gvu_step calls of `prompts` x
    `group_size` samples (mu = 1, the policy judges, gvu's default beta / clip). weights: None = as
    gvu.train loads a real checkpoint (CUDA: bf16 weights, fp32 LoRA, bf16 autocast; CPU: fp32), or
    "bf16" / "fp32". Returns parameter counts, weight / peak memory in GiB (CUDA: torch's
    allocations, peak from after the build; CPU: the process's peak resident set) and seconds per
    step (mean of the steps after the first)."""
    spec, cuda = SPECS[name], device == "cuda"
    weights = weights or ("bf16" if cuda else "fp32")
    torch.manual_seed(seed)
    if cuda:
        # an out-of-memory report then speaks of this config only
        torch.cuda.reset_peak_memory_stats()
    dtype = torch.float32 if weights == "fp32" else torch.bfloat16
    umm = build_umm(spec, device, dtype, decode_steps)
    parts = (getattr(umm, "image_tokenizer", None), getattr(umm, "decoder", None))
    vision = [m for m in parts if m is not None]
    weight_bytes = sum(
        p.numel() * p.element_size() for m in [umm.lm, *vision] for p in m.parameters()
    )
    # before LoRA is injected
    counts = dict(lm_params=n_params(umm.lm), vision_params=n_params(*vision))
    umm.lm.requires_grad_(False)
    policy = get_peft_model(
        umm.lm, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=umm.lora_targets)
    )
    gvu.enable_checkpointing(umm.lm)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    before = [p.detach().cpu().clone() for p in params]
    # as gvu.train: bf16 autocast on CUDA, fp32 on the CPU
    bf16 = cuda and torch.cuda.is_bf16_supported()
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    batch = (PROMPTS * (prompts // len(PROMPTS) + 1))[:prompts]
    args = gvu.Args(
        group_size=group_size,
        micro_batch=micro_batch,
        lr=lr,
        seed=seed,
        instruction=INSTRUCTION,
        min_p=spec.get("min_p", 0.0),
        cfg_scale=spec["cfg_scale"],
    )
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds, stats = [], []
    for step in range(steps):
        t = time.perf_counter()
        with autocast:
            out = gvu.gvu_step(umm, policy, optimizer, batch, step, args)
        stats.append(dict(out["stats"], reward=out["rewards"].mean().item()))
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
    gib = 2**30
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    reserved = torch.cuda.max_memory_reserved() / gib if cuda else None
    timed_steps = seconds[1:] or seconds  # the first step warms up kernels and the allocator
    children = [c for v in vision for c in v.children()]
    return dict(
        config=name,
        device=device,
        weights=weights,
        prompts=prompts,
        group_size=group_size,
        micro_batch=micro_batch,
        **counts,
        lora_params=sum(p.numel() for p in params),
        weights_gib=weight_bytes / gib,
        peak_gib=peak / gib,
        reserved_gib=reserved,
        fits_80gb=None if reserved is None else reserved <= FIT_GIB,
        s_per_step=sum(timed_steps) / len(timed_steps),
        step_seconds=seconds,
        lora_changed=any(not torch.equal(b, p.detach().cpu()) for b, p in zip(before, params)),
        modules=sorted({type(m).__name__ for m in [umm.lm, *vision, *children]}),
        **stats[-1],
    )


def format_result(r):
    if "oom" in r:
        return (
            f"{r['config']:10s} | out of memory on this GPU after {r['peak_gib']:.1f} GiB: "
            f"{r['oom']}"
        )
    where = "peak" if r["device"] == "cuda" else "peak RSS"
    fits = "" if r["fits_80gb"] is None else f" | fits 80 GB: {'yes' if r['fits_80gb'] else 'NO'}"
    reserved = "" if r["reserved_gib"] is None else f" (reserved {r['reserved_gib']:.1f})"
    n = lambda x: f"{x / 1e9:.2f}B" if x >= 1e8 else f"{x / 1e6:.2f}M"
    lm, vision = r["lm_params"], r["vision_params"]
    return (
        f"{r['config']:10s} | {n(lm + vision)} params (LM {n(lm)}"
        f" + tokenizer/decoder {n(vision)}, LoRA {n(r['lora_params'])}) "
        f"| {r['weights']} weights {r['weights_gib']:.1f} GiB "
        f"| {where} {r['peak_gib']:.1f} GiB{reserved} | {r['s_per_step']:.1f} s/step{fits} "
        f"| B={r['prompts']} G={r['group_size']} mb={r['micro_batch']}, {r['device']}"
    )


def run_rehearsal(names, a):
    cuda = torch.cuda.is_available()
    if not cuda and not all(n.startswith("tiny-") for n in names):
        print(
            "gpu-rehearsal: skipped "
            "(no CUDA device; real sizes need a GPU, tiny-* configs run on the CPU)"
        )
        return
    for name in names:
        try:
            r = rehearse(
                name,
                "cuda" if cuda else "cpu",
                a.steps,
                a.prompts,
                a.group_size or 8,
                a.micro_batch,
                a.weights,
                a.decode_steps,
            )
        except torch.cuda.OutOfMemoryError as e:
            r = dict(
                config=name,
                oom=str(e).splitlines()[0][:120],
                peak_gib=torch.cuda.max_memory_allocated() / 2**30,
            )
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        print(format_result(r), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")


# --- the same sizes as arithmetic ---------------------------------------------------------------
def estimate(name, prompts=8, group_size=8, micro_batch=8):
    """Memory of one gvu.train step on config `name`, as arithmetic from the same SPECS: modules are
    built on the meta device (exact parameter counts, no memory). Returns rows (part, GiB with fp32
    weights + bf16 autocast, GiB with bf16 weights, kind) with kind "static" (resident all step) or
    the phase it belongs to (phases run one after another, so the peak is static + the largest
    phase)."""
    spec = SPECS[name]
    umm = build_umm(spec, "meta", torch.bfloat16)
    tc = getattr(umm.lm.config, "text_config", umm.lm.config)
    D, I, L = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers
    kvh = tc.num_key_value_heads
    hd = getattr(tc, "head_dim", None) or D // tc.num_attention_heads
    g, K, V, janus = umm.grid[0], umm.image_vocab_size, umm.image_offset, spec["kind"] == "janus"
    n_img, px = g * g, 16 * g  # both decoders give 16 px per code
    # prefix before the codes
    P = max(len(umm.tokenizer(umm.t2i_prompt(p)).input_ids) for p in PROMPTS)
    T = P + n_img  # rollout, reference and policy sequence length
    # Janus: the image enters as 576 placeholders; the text around it does not depend on the image
    if janus:
        ctx = umm.caption_prompt(None, INSTRUCTION)
    else:
        ctx = umm.caption_prompt_text(
            umm.codes_to_text(torch.zeros(n_img, dtype=torch.long)), INSTRUCTION
        )
    T_ctx = len(umm.tokenizer(ctx, add_special_tokens=False).input_ids) + 20  # + the scored prompt
    N, mb = prompts * group_size, micro_batch
    rows_n = N * (2 if spec["cfg_scale"] != 1 else 1)  # CFG doubles the rollout rows
    lm, lora = n_params(umm.lm), lora_param_count(umm.lm, umm.lora_targets, r=8)
    G_ = 2**30
    rows = []

    def row(part, fp32_bytes, bf16_bytes=None, kind="static"):
        rows.append(
            (part, fp32_bytes / G_, (fp32_bytes if bf16_bytes is None else bf16_bytes) / G_, kind)
        )

    row(
        f"{'Janus (LM + SigLIP-L + VQ-16)' if janus else 'LM'} weights, {lm / 1e9:.2f}B params",
        4 * lm,
        2 * lm,
    )
    if not janus:
        for part, m in [
            ("SigLIP-VQ tokenizer", umm.image_tokenizer),
            ("FLUX transformer", umm.decoder.transformer),
            ("FLUX VAE", umm.decoder.vae),
        ]:
            row(f"{part} weights (bf16), {n_params(m) / 1e9:.2f}B params", 2 * n_params(m))
    row(f"LoRA r=8 ({lora / 1e6:.1f}M): fp32 weight, grad, AdamW m, v", 16 * lora)
    # K is cached in the residual stream's dtype (RoPE promotes it: fp32 with fp32 weights), V bf16
    kv = lambda k_bytes: rows_n * T * L * kvh * hd * (k_bytes + 2)
    row(f"KV cache: {rows_n} rows x {T} tok x {L} layers x {kvh} x {hd}", kv(4), kv(2), "rollout")
    row(
        f"checkpointed layer inputs: {mb} x {T} tok x {L} layers x {D}",
        mb * T * L * D * 4,
        mb * T * L * D * 2,
        "policy forward + backward",
    )
    row(
        f"one layer recomputed: ~(6 x {D} + 4 x {I}) bf16 a token",
        mb * T * (6 * D + 4 * I) * 2,
        kind="policy forward + backward",
    )
    row(
        f"image-head log-softmax: {mb} x {n_img} x {K}, ~3 fp32 copies",
        mb * n_img * K * 12,
        kind="policy forward + backward",
    )
    row(
        f"one layer, {mb} x {T_ctx} tok, + fp32 logits over {V} text ids",
        mb * T_ctx * (6 * D + 4 * I) * 2 + mb * 20 * V * 8,
        kind="reward forward (no grad)",
    )
    nd = umm.decode_batch
    row(
        f"{'VQ' if janus else 'VAE'} decoder: {nd} images at {px} px, ~3 fp32 128-channel maps",
        nd * px * px * 128 * 4 * 3,
        kind="decode (no grad)",
    )
    if not janus:
        f = umm.decoder.transformer.config
        width, S = f.num_attention_heads * f.attention_head_dim, n_img + umm.decoder.text_tokens
        row(
            f"FLUX: {nd} x {S} tok x {width}, ~10 bf16 activations",
            nd * S * width * 2 * 10,
            kind="decode (no grad)",
        )
    extra = None
    # X-Omni's config class has 4 adapter + 4 head layers for image tokens (XOmniConfig defaults)
    if not janus:
        extra = 8 * n_params(umm.lm.model.layers[0])
    params = dict(lm=lm, lora=lora)
    if not janus:
        params.update(
            tokenizer=n_params(umm.image_tokenizer),
            flux=n_params(umm.decoder.transformer),
            vae=n_params(umm.decoder.vae),
        )
    return dict(
        rows=rows,
        params=params,
        tokens=dict(prefix=P, image=n_img, context=T_ctx),
        N=N,
        rollout_rows=rows_n,
        extra_layers=extra,
    )


def print_estimate(name, a):
    e = estimate(name, a.prompts, a.group_size or 8, a.micro_batch)
    rows, t = e["rows"], e["tokens"]
    print(
        f"estimate {name} (arithmetic, not a measurement): "
        f"B={a.prompts} x G={a.group_size or 8} = {e['N']} samples,\n"
        f"  {e['rollout_rows']} rollout rows, {t['prefix']} prefix + {t['image']} image tokens, "
        f"reward context ~{t['context']} tokens, micro-batch {a.micro_batch}"
    )
    print(f"  {'GiB':66s} {'fp32 weights':>12s} {'bf16 weights':>12s}")
    totals = {}
    # static first, then the phases in the order they run
    for kind in dict.fromkeys(r[3] for r in rows):
        print(f"  {kind}")
        for part, f32, b16, _ in (r for r in rows if r[3] == kind):
            print(f"    {part:64s} {f32:12.1f} {b16:12.1f}")
        totals[kind] = [sum(r[i] for r in rows if r[3] == kind) for i in (1, 2)]
    static, phases = totals.pop("static"), totals
    top = max(phases, key=lambda k: phases[k][0])
    peak = [static[i] + phases[top][i] for i in (0, 1)]
    print(f"  {'static total':66s} {static[0]:12.1f} {static[1]:12.1f}")
    print(f"  {'peak = static + largest phase (' + top + ')':66s} {peak[0]:12.1f} {peak[1]:12.1f}")
    fits = ["yes" if gib <= FIT_GIB else "NO" for gib in peak]
    print(f"  {'fits an 80 GB card (<= %.0f GiB)' % FIT_GIB:66s} {fits[0]:>12s} {fits[1]:>12s}")
    if extra := e["extra_layers"]:
        print(
            "  note: X-Omni's config class also has 4 + 4 image-token layers "
            "(XOmniConfig num_mm_adap_layers,\n"
            f"  num_mm_head_layers); if they come on top of Qwen2.5's 28, "
            f"add {extra / 1e9:.2f}B params "
            f"= {4 * extra / 2**30:.1f} / {2 * extra / 2**30:.1f} GiB of weights"
        )
    print()


def ddp_bench(n, B, G, steps, micro_batch):
    """--ddp: gvu.py on the tiny random UMM, B prompts x G a step, in 1 process and in n under
    torchrun (one thread each; gloo on the CPU, one GPU each with NCCL); s/step = the logs' mean
    after the first step. Scaling efficiency = t_1 / (n * t_n): 1.0 if n processes take 1/n of the
    time (the global batch is the same)."""
    import tempfile

    if B % n:
        sys.exit(f"error: --prompts {B} must be divisible by --ddp {n}")
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, n):
            launch = (
                ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
                if procs > 1
                else []
            )
            out = os.path.join(tmp, str(procs))
            subprocess.run(
                [
                    sys.executable,
                    *launch,
                    os.path.join(ROOT, "gvu.py"),
                    "--model",
                    "tiny-random",
                    "--out",
                    out,
                    "--steps",
                    str(steps + 1),
                    "--batch-prompts",
                    str(B),
                    "--group-size",
                    str(G),
                    "--micro-batch",
                    str(micro_batch),
                    "--sample-every",
                    "1000000",
                ],
                check=True,
                capture_output=True,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
            )
            rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
            seconds[procs] = float(np.mean([r["seconds"] for r in rows[1:]]))
    print(
        f"ddp      {B} prompts x G={G}, {steps} steps | 1 process {seconds[1]:.3f} s/step "
        f"| {n} processes {seconds[n]:.3f} s/step "
        f"| scaling efficiency {seconds[1] / (n * seconds[n]):.2f} "
        f"({'CUDA' if torch.cuda.is_available() else 'CPU, gloo'})"
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--group-size",
        type=int,
        help="G: images per prompt (default 4 for the CPU bench with its 8 "
        "prompts, 8 for --gpu-rehearsal / --estimate)",
    )
    p.add_argument("--memory-worker", choices=["on", "off"], help=argparse.SUPPRESS)
    p.add_argument(
        "--mem-hidden",
        type=int,
        default=512,
        help="hidden size of the model used for the memory test",
    )
    p.add_argument(
        "--mem-layers", type=int, default=8, help="layers of the model used for the memory test"
    )
    p.add_argument(
        "--mem-seqs", type=int, default=64, help="sequences in the memory test's forward + backward"
    )
    p.add_argument(
        "--gpu-rehearsal",
        action="store_true",
        help="real sizes, random weights, a few GvU steps on CUDA",
    )
    p.add_argument(
        "--estimate",
        action="store_true",
        help="the memory arithmetic for the same sizes (CPU, seconds)",
    )
    p.add_argument(
        "--configs",
        default="janus1b,janus7b,xomni7b",
        help=f"comma-separated, of: {', '.join(SPECS)}",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=2,
        help="rehearsal steps per config; s/step = mean after the first",
    )
    p.add_argument(
        "--prompts", type=int, default=8, help="B: prompts per step (rehearsal, estimate)"
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=8,
        help="sequences per forward/backward (gvu's --micro-batch)",
    )
    p.add_argument(
        "--weights",
        choices=["fp32", "bf16"],
        help="LM weights (default: as gvu.train loads a real checkpoint, bf16 on CUDA) "
        "or fp32 + bf16 autocast",
    )
    p.add_argument(
        "--decode-steps",
        type=int,
        default=2,
        help="FLUX denoising steps per decode (X-Omni stand-in)",
    )
    p.add_argument("--json", help="append one JSON line per rehearsed config to this file")
    p.add_argument(
        "--reward-agreement",
        metavar="METADATA",
        help="--reward-input codes vs pixels on the base "
        "model's samples of this metadata file (e.g. prompts/shapes_geneval.jsonl), then exit",
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="CPU bench: repeats per figure (median and min-max)"
    )
    p.add_argument(
        "--breakdown-model",
        default="checkpoints/tiny-umm",
        help="CPU bench: the model of the step breakdown",
    )
    p.add_argument(
        "--ddp",
        type=int,
        default=0,
        metavar="N",
        help="s/step of gvu.py in 1 process vs N under torchrun "
        "(uses --prompts, --group-size, --steps)",
    )
    a = p.parse_args(argv)
    if a.ddp:
        return ddp_bench(a.ddp, a.prompts, a.group_size or 2, a.steps, a.micro_batch)
    if a.memory_worker:
        return memory_worker(a.memory_worker == "on", a.mem_hidden, a.mem_layers, a.mem_seqs)
    names = a.configs.split(",")
    if unknown := [n for n in names if n not in SPECS]:
        p.error(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(SPECS)})")
    if a.estimate:
        for name in names:
            print_estimate(name, a)
        return
    if a.gpu_rehearsal:
        return run_rehearsal(names, a)
    if a.reward_agreement:
        return reward_agreement(a.breakdown_model, a.reward_agreement, a.group_size or 8)
    torch.manual_seed(0)
    umm, G, n, instr = TinyUMM.random(0), a.group_size or 4, a.repeats, INSTRUCTION
    prompts = [p for p in PROMPTS for _ in range(G)]
    print(
        f"tiny UMM: {n_params(umm.lm) / 1e6:.2f}M LM params, {len(prompts)} images, "
        f"{torch.get_num_threads()} threads; every figure: median [min-max] of {n} repeats"
    )

    # 1. reward
    images = umm.decode_images(
        torch.randint(0, umm.image_vocab_size, (len(prompts), 16)), torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        (fast, slow), (t_fast, t_slow) = timed(
            [
                lambda: gvu.intrinsic_reward(
                    *gvu.caption_token_logprobs(umm, images, prompts, instr)
                ),
                lambda: official_rewards(umm, images, prompts, instr),
            ],
            n,
        )
    print(
        f"reward   batched {spread(t_fast)} ms | per-token loop {spread(t_slow)} ms | speed-up "
        f"{spread(t_slow / t_fast, 1)}x | max |dR| {(fast - slow).abs().max().item():.1e}"
    )

    # 2. rollout, at 64 image tokens: the rollout reads only the LM and the grid, so the tiny model
    # samples 8 x 8
    umm.grid = (8, 8)
    gen = lambda: torch.Generator().manual_seed(1)
    (cached, uncached), (t_c, t_u) = timed(
        [
            lambda: gvu.rollout(umm, PROMPTS, G, generator=gen())["codes"],
            lambda: uncached_rollout(umm, PROMPTS, G, gen()),
        ],
        n,
    )
    print(
        f"rollout  KV-cached {spread(t_c)} ms | uncached {spread(t_u)} ms "
        f"| speed-up {spread(t_u / t_c, 1)}x | {cached.shape[1]} image tokens "
        f"| same codes: {torch.equal(cached, uncached)}"
    )

    # 3. memory, each setting in a fresh process so the peaks do not mix. On the CPU the peak
    # resident set only tracks live memory when glibc hands every large block straight back (a fixed
    # mmap threshold): with its default, a dynamic threshold, freed activations stay in the heap and
    # inflate the later peak
    peaks = {"off": [], "on": []}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for _ in range(n):
        for mode in peaks:
            cmd = [
                sys.executable,
                "-m",
                "tools.bench",
                "--memory-worker",
                mode,
                "--mem-hidden",
                str(a.mem_hidden),
                "--mem-layers",
                str(a.mem_layers),
                "--mem-seqs",
                str(a.mem_seqs),
            ]
            out = subprocess.run(
                cmd, capture_output=True, text=True, check=True, env=env, cwd=ROOT
            ).stdout.splitlines()[-1]
            peaks[mode].append(json.loads(out)["peak_mb"])
    off, on = np.array(peaks["off"]), np.array(peaks["on"])
    print(
        f"memory   checkpointing off {spread(off, 1)} MB | on {spread(on, 1)} MB "
        f"| on / off {spread(on / off, 1, '{:.2f}')}"
        f"  ({'cuda' if torch.cuda.is_available() else 'cpu'}, hidden {a.mem_hidden}, "
        f"{a.mem_layers} layers, {a.mem_seqs} sequences, LoRA r=8, forward + backward)"
    )

    # 4. where a real step's time goes, on the shipped tiny UMM
    print_breakdown(a.breakdown_model, n)


if __name__ == "__main__":
    main()
