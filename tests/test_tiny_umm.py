"""The tiny UMM (models/tiny_umm.py): save/load, its image format, and the shipped checkpoint's understanding."""

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


def test_tiny_umm_round_trips_through_save_pretrained(tmp_path, umm):
    """save_pretrained/from_pretrained (safetensors) restores the LM, tokenizer and vision parts."""
    umm.save_pretrained(str(tmp_path / "m"))
    v = TinyUMM.from_pretrained(str(tmp_path / "m"))
    assert torch.equal(v.lm.lm_head.weight, umm.lm.lm_head.weight)
    assert v.tokenizer.tokenize(v.t2i_prompt("a photo of a circle")) == [
        "a",
        "photo",
        "of",
        "a",
        "circle",
        "<SOM>",
        "4",
        "4",
        "<IMAGE>",
    ]
    codes = torch.randint(0, 64, (2, 16))
    g = lambda: torch.Generator().manual_seed(0)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(v.decode_images(codes, g()), umm.decode_images(codes, g()))
    )
    assert sorted(os.listdir(tmp_path / "m" / "decoder")) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]


def test_tokenize_image_follows_x_omni_format(umm):
    """tokenize_image gives <SOM>h w<IMAGE>, h*w <MM-Token-k>, <EOM>; ids are offset + k."""
    s = umm.tokenize_image(images_for(umm, 1)[0])
    assert (
        s.startswith("<SOM>4 4<IMAGE><MM-Token-")
        and s.endswith("<EOM>")
        and s.count("<MM-Token-") == 16
    )
    k = int(s.split("<MM-Token-")[1].split(">")[0])
    assert umm.tokenizer.convert_tokens_to_ids(f"<MM-Token-{k}>") == umm.image_offset + k


def test_shipped_tiny_umm_prefers_the_true_caption_of_a_render():
    """The shipped checkpoint's intrinsic reward ranks each render's true caption above a one-word change."""
    umm = TinyUMM.from_pretrained(os.path.join(HERE, "checkpoints", "tiny-umm"))
    scenes = [
        [shapes.Obj("circle", "red", "large", 1, 1)],
        [
            shapes.Obj("square", "blue", "small", 2, 0),
            shapes.Obj("triangle", "yellow", "large", 2, 3),
        ],
    ]
    true = ["a photo of a red circle", "a photo of a blue square and a yellow triangle"]
    wrong = ["a photo of a green circle", "a photo of a blue square and a yellow circle"]
    images = [shapes.render(s) for s in scenes]
    with torch.no_grad():
        r = gvu.intrinsic_reward(
            *gvu.caption_token_logprobs(
                umm, images * 2, true + wrong, "Describe the image in detail."
            )
        )
    assert (r[:2] > r[2:]).all(), r
