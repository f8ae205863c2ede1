"""tools/bench.py's GPU rehearsal and memory estimate: the real-size code path on the CPU."""

import argparse
import copy
import json
import math
import os
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

import gvu
from conftest import needs_janus, run_main
from models.tiny_umm import TinyUMM
from tools import bench, experiments
from world import make_tiny_umm as make
from world import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
HERE = ROOT
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*deprecated and will be removed in v6"
)  # peft's pre-v6 names
PROMPTS = [
    "a photo of a red circle",
    "a photo of two squares",
    "a photo of a blue triangle left of a large circle",
    "a photo of a circle and a square",
]


@pytest.fixture(scope="module")
def umm():
    return TinyUMM.random(seed=0, hidden=64, layers=2)


def images_for(umm, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return umm.decode_images(torch.randint(0, umm.image_vocab_size, (n, 16), generator=g), g)


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(p)


# --- tools/bench.py's GPU rehearsal and memory estimate: the real-size code path on the CPU --------------


@pytest.mark.filterwarnings("ignore:.*deprecated and will be removed in v6")  # peft's pre-v6 names
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
    """bench.rehearse (what --gpu-rehearsal runs per config) on toy sizes of the same classes: one GvU step
    with uneven micro-batches gives a finite loss, moves the LoRA weights, and reports every number."""
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
    umm = bench.build_umm(
        bench.SPECS[name], "meta", torch.float32
    )  # the estimate's LoRA arithmetic == peft's count
    assert bench.lora_param_count(umm.lm, umm.lora_targets, r=8) == r["lora_params"] > 0
    line = bench.format_result(r)
    assert name in line and "peak RSS" in line and "s/step" in line


def test_gpu_rehearsal_skips_cleanly_without_cuda(monkeypatch, capsys):
    """`python -m tools.bench --gpu-rehearsal` without CUDA prints one 'skipped' line, builds nothing, exits 0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    built = []
    monkeypatch.setattr(bench, "rehearse", lambda *a, **k: built.append(a))
    assert bench.main(["--gpu-rehearsal"]) is None  # returns normally: exit status 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "skipped" in out[0] and not built


@needs_janus
def test_estimate_counts_the_real_parameters_and_prints_a_peak(capsys):
    """--estimate builds the real sizes on the meta device: the X-Omni stand-in's LM equals a hand count of
    Qwen2.5-7B + 16384 code rows, FLUX.1-dev is its 12B, Janus-Pro-7B matches its 14.84 GB bf16 checkpoint."""
    bench.main(["--estimate", "--configs", "janus7b"])
    out = capsys.readouterr().out
    assert "peak = static + largest phase" in out and "fits an 80 GB card" in out
    e = bench.estimate("xomni7b")["params"]
    D, I, kv, V, L = 3584, 18944, 4 * 128, 152064 + 16384, 28
    layer = (
        (D * D + D) + 2 * (D * kv + kv) + D * D + 3 * D * I + 2 * D
    )  # q, k, v (with bias), o, MLP, 2 norms
    assert e["lm"] == L * layer + 2 * V * D + D  # + untied embedding and head, final norm
    assert 11.8e9 < e["flux"] < 12.0e9
    janus7b = bench.estimate("janus7b")["params"]["lm"]
    assert (
        abs(2 * janus7b - 14.84e9) / 14.84e9 < 0.005
    )  # pytorch_model-0000{1,2}-of-00002.bin: 9.99 + 4.85 GB
