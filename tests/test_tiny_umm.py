"""The tiny UMM (models/tiny_umm.py): save/load, its image format, its batched image tokenisation,
and the shipped checkpoint's understanding."""

import os

import numpy as np
import torch

import gvu
from models.tiny_umm import TinyUMM
from standins import INSTRUCTION, context_ids, images_for, per_image_context_ids, rendered
from world import shapes


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


def test_batched_tokenisation_gives_the_per_image_context_tokens_tiny_umm(shipped):
    """caption_prompts (one image-tokenizer call for the batch) tokenises to the same ids as
    caption_prompt per image."""
    images, _ = rendered(12)
    images += shipped.decode_images(
        torch.randint(0, shipped.image_vocab_size, (4, 16)), torch.Generator().manual_seed(0)
    )
    assert context_ids(
        shipped, shipped.caption_prompts(images, INSTRUCTION)
    ) == per_image_context_ids(shipped, images)


def test_shipped_tiny_umm_prefers_the_true_caption_of_a_render(shipped):
    """The shipped checkpoint's intrinsic reward ranks each render's true caption above a one-word
    change."""
    umm = shipped
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
            *gvu.caption_token_logprobs(umm, images * 2, true + wrong, INSTRUCTION)
        )
    assert (r[:2] > r[2:]).all(), r
