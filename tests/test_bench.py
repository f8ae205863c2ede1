"""tools/bench.py: its GPU rehearsal and memory estimate (the real-size code path on the CPU), its
X-Omni-shaped stand-in, and its step breakdown."""

import math
import time

import pytest
import torch

import gvu
from models.tiny_umm import TinyUMM

from standins import INSTRUCTION, context_ids, needs_janus, per_image_context_ids
from tools import bench


@pytest.mark.parametrize(
    "name, classes",
    [
        pytest.param("tiny-janus", {"JanusForConditionalGeneration"}, marks=needs_janus),
        (
            "tiny-xomni",
            {"Qwen2ForCausalLM", "SiglipVisionModel", "FluxTransformer2DModel", "AutoencoderKL"},
        ),
    ],
)
def test_gpu_rehearsal_runs_a_gvu_step_on_tiny_configs_of_the_real_classes(
    name, classes, one_thread
):
    """bench.rehearse (what --gpu-rehearsal runs per config) on toy sizes of the same classes: one
    GvU step with uneven micro-batches gives a finite loss, moves the LoRA weights, and reports
    every number."""
    r = bench.rehearse(name, device="cpu", steps=1, prompts=2, group_size=2, micro_batch=3, lr=1e-2)
    assert (
        r["lora_changed"]
        and math.isfinite(r["loss"])
        and math.isfinite(r["grad_norm"])
        and 0 < r["reward"] < 1
    )
    assert classes <= set(r["modules"])
    assert (
        min(r["lm_params"], r["weights_gib"], r["peak_gib"], r["s_per_step"]) > 0
        and len(r["step_seconds"]) == 1
    )
    # the estimate's LoRA arithmetic == peft's count
    umm = bench.build_umm(bench.SPECS[name], "meta", torch.float32)
    assert bench.lora_param_count(umm.lm, umm.lora_targets, r=8) == r["lora_params"] > 0
    line = bench.format_result(r)
    assert name in line and "peak RSS" in line and "s/step" in line


def test_gpu_rehearsal_skips_cleanly_without_cuda(monkeypatch, capsys):
    """`python -m tools.bench --gpu-rehearsal` without CUDA prints one 'skipped' line, builds
    nothing, exits 0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    built = []
    monkeypatch.setattr(bench, "rehearse", lambda *a, **k: built.append(a))
    assert bench.main(["--gpu-rehearsal"]) is None  # returns normally: exit status 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "skipped" in out[0] and not built


@needs_janus
def test_estimate_counts_the_real_parameters_and_prints_a_peak(capsys):
    """--estimate builds the real sizes on the meta device: the X-Omni stand-in's LM equals a hand
    count of Qwen2.5-7B + 16384 code rows, FLUX.1-dev is its 12B, Janus-Pro-7B matches its 14.84 GB
    bf16 checkpoint."""
    bench.main(["--estimate", "--configs", "janus7b"])
    out = capsys.readouterr().out
    assert "peak = static + largest phase" in out and "fits an 80 GB card" in out
    e = bench.estimate("xomni7b")["params"]
    D, I, kv, V, L = 3584, 18944, 4 * 128, 152064 + 16384, 28
    # q, k, v (with bias), o, MLP, 2 norms
    layer = (D * D + D) + 2 * (D * kv + kv) + D * D + 3 * D * I + 2 * D
    assert e["lm"] == L * layer + 2 * V * D + D  # + untied embedding and head, final norm
    assert 11.8e9 < e["flux"] < 12.0e9
    janus7b = bench.estimate("janus7b")["params"]["lm"]
    # pytorch_model-0000{1,2}-of-00002.bin: 9.99 + 4.85 GB
    assert abs(2 * janus7b - 14.84e9) / 14.84e9 < 0.005


def test_batched_tokenisation_gives_the_per_image_context_tokens_bench_xomni_standin():
    """bench's X-Omni-shaped stand-in (SigLIP tower + nearest code) tokenises a batch as it does one
    image at a time."""
    umm = bench.build_umm(bench.SPECS["tiny-xomni"], "cpu", torch.float32, decode_steps=1)
    images = umm.decode_images(torch.randint(0, 64, (5, 16)), torch.Generator().manual_seed(1))
    assert context_ids(umm, umm.caption_prompts(images, INSTRUCTION)) == per_image_context_ids(
        umm, images
    )


def test_bench_step_breakdown_times_every_phase_of_real_steps_for_both_reward_inputs():
    """tools/bench.py's breakdown drives gvu.add_lora and gvu_step as the trainer does (it once
    broke when they gained a return value): per reward input, one row per timed step, every phase
    booked, codes steps never decode."""
    res = bench.step_breakdown("tiny-random", steps=1, batch_prompts=1, group_size=2)
    assert set(res) == {"pixels", "codes"}
    for reward_input, t in res.items():
        assert {"rollout", "reward", "reference", "update", "step"} <= set(t) and all(
            len(v) == 1 for v in t.values()
        )
        assert (t["step"] > 0).all() and (t["update"] > 0).all()
    # codes: the phase is booked, nothing decodes
    assert (res["codes"]["decode"] < 0.01 * res["pixels"]["decode"]).all()


# --- the step's timing hook -----------------------------------------------------------------------
def test_step_timings_cover_the_step_wall_time():
    """gvu_step's timing hook (stopwatch) books every phase once, and the phases add up to the wall
    time of the call (the little left over is the code between the laps)."""
    umm = TinyUMM.random(seed=0, hidden=64, layers=2)
    torch.manual_seed(0)
    policy, opt, _ = gvu.add_lora(umm, gvu.Args())
    args = gvu.Args(batch_prompts=2, group_size=4)
    gvu.gvu_step(umm, policy, opt, ["a red circle", "two squares"], 0, args)  # warm-up
    t = {}
    start = time.perf_counter()
    gvu.gvu_step(umm, policy, opt, ["a red circle", "two squares"], 1, args, lap=bench.stopwatch(t))
    wall = time.perf_counter() - start
    assert list(t) == ["rollout", "decode", "reward", "reference", "update"] and all(
        v > 0 for v in t.values()
    )
    assert 0.9 * wall <= sum(t.values()) <= wall
