"""
Side-by-side measurements of the three things gvu.py does differently from the official code, in one run:

  1. reward:   one batched teacher-forced forward  vs  the official loop (one uncached forward of the
               full LM per prompt token, one image at a time); the rewards must be identical;
  2. rollout:  one batched KV-cached pass          vs  recomputing the whole sequence at every token;
  3. memory:   peak memory of the policy forward + backward with gradient checkpointing on vs off,
               measured (CUDA: max_memory_allocated; CPU: peak resident set of a fresh process).

    python bench.py                 # tiny UMM on the CPU, about a minute
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import gvu
from tiny_umm import TinyUMM

PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle left of a large circle",
           "a photo of three yellow triangles", "a photo of a purple square and an orange circle",
           "a photo of a small circle above a square", "a photo of four circles", "a photo of a green triangle"]


def timed(fn, repeat=3):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return out, (time.perf_counter() - t) / repeat


def official_rewards(umm, images, prompts, instruction):
    """The official method: for each image, one full-LM forward per prompt token, no cache."""
    tok, out = umm.tokenizer, []
    for image, prompt in zip(images, prompts):
        ctx = tok(umm.caption_prompt(image, instruction), add_special_tokens=False).input_ids
        ans = tok(prompt + umm.answer_suffix, add_special_tokens=False).input_ids
        logp = [F.log_softmax(umm.lm(input_ids=torch.tensor([ctx + ans[:j]])).logits[0, -1, :umm.image_offset].double(), -1)[a]
                for j, a in enumerate(ans)]
        out.append(torch.exp(torch.stack(logp).mean()))
    return torch.stack(out)


@torch.no_grad()
def uncached_rollout(umm, prompts, G, generator):
    """Same sampler as gvu.rollout, but every token re-runs the whole sequence (no KV cache)."""
    umm.lm.eval()
    umm.set_generation_mode("image")
    enc = umm.tokenizer([umm.t2i_prompt(p) for p in prompts for _ in range(G)], padding=True, padding_side="left",
                        return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    for _ in range(umm.grid[0] * umm.grid[1]):
        hidden = umm.hidden_states(ids, mask, gvu.left_pad_positions(mask))[:, -1]
        code = torch.multinomial(F.softmax(umm.logits(hidden).float(), -1), 1, generator=generator)
        ids, mask = torch.cat([ids, code + umm.image_offset], 1), torch.cat([mask, mask.new_ones(len(ids), 1)], 1)
    return ids[:, enc.input_ids.shape[1]:] - umm.image_offset


def memory_worker(checkpointing, hidden, layers, n):
    """Run in a fresh process: one policy forward + backward; report peak memory above the baseline."""
    umm = TinyUMM.random(0, hidden=hidden, layers=layers, heads=8)
    if checkpointing:
        gvu.enable_checkpointing(umm.lm)
    ro = gvu.rollout(umm, (PROMPTS * n)[:n], G=1, generator=torch.Generator().manual_seed(0))
    umm.lm.train()
    cuda = torch.cuda.is_available()
    if cuda:
        umm.to("cuda")
        ro = {k: v.cuda() for k, v in ro.items()}
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logp = gvu.token_logprobs(umm, ro["prefix_ids"], ro["prefix_mask"], ro["codes"])
    logp.mean().backward()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_mb": (peak - base) / 2**20, "device": "cuda" if cuda else "cpu"}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group-size", type=int, default=4, help="G: images per prompt (8 prompts are used)")
    p.add_argument("--memory-worker", choices=["on", "off"], help=argparse.SUPPRESS)
    p.add_argument("--mem-hidden", type=int, default=512, help="hidden size of the model used for the memory test")
    p.add_argument("--mem-layers", type=int, default=8, help="layers of the model used for the memory test")
    p.add_argument("--mem-seqs", type=int, default=64, help="sequences in the memory test's forward + backward")
    a = p.parse_args()
    if a.memory_worker:
        return memory_worker(a.memory_worker == "on", a.mem_hidden, a.mem_layers, a.mem_seqs)
    torch.manual_seed(0)
    umm, G, instr = TinyUMM.random(0), a.group_size, "Describe the image in detail."
    prompts = [p for p in PROMPTS for _ in range(G)]
    print(f"tiny UMM: {sum(q.numel() for q in umm.lm.parameters()) / 1e6:.2f}M LM params, {len(prompts)} images, "
          f"{torch.get_num_threads()} threads")

    # 1. reward
    images = umm.decode_images(torch.randint(0, umm.image_vocab_size, (len(prompts), 16)), torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast, t_fast = timed(lambda: gvu.intrinsic_reward(*gvu.prompt_token_logprobs(umm, images, prompts, instr)))
        slow, t_slow = timed(lambda: official_rewards(umm, images, prompts, instr), repeat=1)
    print(f"reward   batched {t_fast * 1e3:8.1f} ms | per-token loop {t_slow * 1e3:8.1f} ms | "
          f"speed-up {t_slow / t_fast:5.1f}x | max |dR| {(fast - slow).abs().max().item():.1e}")

    # 2. rollout
    gen = lambda: torch.Generator().manual_seed(1)
    cached, t_c = timed(lambda: gvu.rollout(umm, PROMPTS, G, generator=gen())["codes"])
    uncached, t_u = timed(lambda: uncached_rollout(umm, PROMPTS, G, gen()))
    print(f"rollout  KV-cached {t_c * 1e3:6.1f} ms | uncached {t_u * 1e3:8.1f} ms | speed-up {t_u / t_c:5.1f}x | "
          f"same codes: {torch.equal(cached, uncached)}")

    # 3. memory, each setting in a fresh process so the peaks do not mix
    peaks = {}
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--memory-worker", mode, "--mem-hidden", str(a.mem_hidden),
               "--mem-layers", str(a.mem_layers), "--mem-seqs", str(a.mem_seqs)]
        peaks[mode] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    print(f"memory   checkpointing off {peaks['off']['peak_mb']:7.1f} MB | on {peaks['on']['peak_mb']:7.1f} MB | "
          f"ratio {peaks['off']['peak_mb'] / peaks['on']['peak_mb']:4.1f}x  ({peaks['on']['device']}, "
          f"hidden {a.mem_hidden}, {a.mem_layers} layers, {a.mem_seqs} sequences, forward + backward)")


if __name__ == "__main__":
    main()
