"""Tests for the faster step paths (issue 15), CPU only: the batched image tokenisation of the reward path, the
decode-free reward (--reward-input codes) and gvu_step's timing hook. Each compares against an independent
computation: the per-image caption_prompt, the official per-token loop, a wall clock."""

import json
import os
import time

import numpy as np
import pytest
import torch

from tools import bench
import gvu
from world import shapes
from models.adapters import InputError
from conftest import INSTRUCTION, PROMPTS, XO_CODES, build_janus, needs_janus
from test_adapters import xomni  # noqa: F401,F811  (the X-Omni stand-in as the adapter, a fixture)
from models.tiny_umm import TinyUMM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*deprecated and will be removed in v6"
)  # peft's pre-v6 names


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is far faster than two on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def xo_images(xomni):
    return xomni.decode_images(
        torch.randint(0, XO_CODES, (len(PROMPTS), 9), generator=torch.Generator().manual_seed(0))
    )


@pytest.fixture(scope="module")
def shipped():
    return TinyUMM.from_pretrained(os.path.join(ROOT, "checkpoints", "tiny-umm"))


def rendered(n, seed=0):
    """n shapes-world images of training prompts, and the prompts (what the shipped tiny UMM learnt to read)."""
    with open(os.path.join(ROOT, "prompts", "train.jsonl")) as f:
        metas = [json.loads(line) for line in f][:n]
    rng = np.random.default_rng(seed)
    return [shapes.render(shapes.sample_scene(m, rng)) for m in metas], [m["prompt"] for m in metas]


def ctx_ids(umm, texts):
    return umm.tokenizer(texts, add_special_tokens=False).input_ids


def per_image_ctx(umm, images):
    """The per-image path: one caption_prompt (one image-tokenizer call) per image."""
    return ctx_ids(umm, [umm.caption_prompt(im, INSTRUCTION) for im in images])


# ---------------------------------------------------------------------------------------------------------------
def test_batched_tokenisation_gives_the_per_image_context_tokens_tiny_umm(shipped):
    """caption_prompts (one image-tokenizer call for the batch) tokenises to the same ids as caption_prompt per image."""
    images, _ = rendered(12)
    images += shipped.decode_images(
        torch.randint(0, shipped.image_vocab_size, (4, 16)), torch.Generator().manual_seed(0)
    )
    assert ctx_ids(shipped, shipped.caption_prompts(images, INSTRUCTION)) == per_image_ctx(
        shipped, images
    )


def test_batched_tokenisation_gives_the_per_image_context_tokens_xomni_standin(
    xomni, xomni_ref, xo_images
):
    """XOmni.caption_prompts (one SigLIP-VQ call) equals chat.py's context: the stand-in's own tokenize_image per
    image, then the chat template, tokenised."""
    model, tok = xomni_ref
    want = [
        tok.apply_chat_template(
            [{"role": "user", "content": model.tokenize_image(im) + "\n" + INSTRUCTION}],
            add_generation_prompt=True,
            return_dict=False,
        )
        for im in xo_images
    ]
    assert ctx_ids(xomni, xomni.caption_prompts(xo_images, INSTRUCTION)) == want


def test_batched_tokenisation_gives_the_per_image_context_tokens_bench_xomni_standin():
    """bench's X-Omni-shaped stand-in (SigLIP tower + nearest code) tokenises a batch as it does one image at a time."""
    umm = bench.build_umm(bench.SPECS["tiny-xomni"], "cpu", torch.float32, decode_steps=1)
    images = umm.decode_images(torch.randint(0, 64, (5, 16)), torch.Generator().manual_seed(1))
    assert ctx_ids(umm, umm.caption_prompts(images, INSTRUCTION)) == per_image_ctx(umm, images)


@needs_janus
def test_batched_tokenisation_gives_the_per_image_context_tokens_janus():
    """Janus: the context text does not depend on the image; the batch gives the per-image ids."""
    umm, _ = build_janus(0)
    images = umm.decode_images(torch.randint(0, 64, (3, 16)))
    assert ctx_ids(umm, umm.caption_prompts(images, INSTRUCTION)) == per_image_ctx(umm, images)


# ---------------------------------------------------------------------------------------------------------------
def test_codes_reward_equals_the_official_pixel_reward_when_retokenising_is_exact(shipped):
    """For codes whose decode -> re-tokenise round trip is exact, the reward read from the codes (no decode)
    equals the official per-token loop on the decoded pixels."""
    images, prompts = rendered(16, seed=1)
    codes = shipped.image_codes(images)  # codes the shipped tokenizer gives rendered shapes
    decoded = shipped.decode_images(codes, torch.Generator().manual_seed(0))
    exact = (shipped.image_codes(decoded) == codes).all(1)  # (N,) round trip exact
    assert exact.sum() >= 8, f"only {exact.sum()} exact round trips"
    keep = exact.nonzero()[:, 0].tolist()
    args = gvu.Args(reward_input="codes")
    with torch.no_grad():
        got = gvu.intrinsic_rewards(shipped, codes[keep], [prompts[i] for i in keep], args)[0]
        want = bench.official_rewards(
            shipped, [decoded[i] for i in keep], [prompts[i] for i in keep], INSTRUCTION
        )
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


def lora_tiny(seed=0):
    umm = TinyUMM.random(seed, hidden=64, layers=2)
    torch.manual_seed(seed)
    policy, opt, _ = gvu.add_lora(umm, gvu.Args())
    return umm, policy, opt


def test_codes_step_never_runs_the_decoder_except_on_sample_steps(monkeypatch):
    """A --reward-input codes step off the sample schedule never calls decode_images (a decoder that raises changes
    nothing) and returns images=None; a sample step decodes once, for the grid; the pixels path decodes every step."""
    batch = ["a red circle", "two squares"]
    args = gvu.Args(reward_input="codes", batch_prompts=2, group_size=2, steps=10, sample_every=5)
    calls = []
    umm, policy, opt = lora_tiny()
    decode = umm.decode_images
    monkeypatch.setattr(umm, "decode_images", lambda *a, **k: calls.append(1) or decode(*a, **k))
    for step, decodes in [(1, 0), (2, 0), (5, 1), (9, 2)]:  # 5: sample_every, 9: the last step
        images = gvu.gvu_step(umm, policy, opt, batch, step, args)["images"]
        assert len(calls) == decodes and (images is None) == (step in (1, 2))
    # the rewards do not depend on the decoder: a decoder that raises, same rewards as a fresh identical run
    broken, policy_b, opt_b = lora_tiny()
    monkeypatch.setattr(
        broken, "decode_images", lambda *a, **k: pytest.fail("decoder called on a codes step")
    )
    fresh, policy_f, opt_f = lora_tiny()
    r_broken = gvu.gvu_step(broken, policy_b, opt_b, batch, 1, args)["rewards"]
    r_fresh = gvu.gvu_step(fresh, policy_f, opt_f, batch, 1, args)["rewards"]
    torch.testing.assert_close(r_broken, r_fresh, atol=0, rtol=0)
    pixel_calls = []
    monkeypatch.setattr(
        fresh, "decode_images", lambda *a, **k: pixel_calls.append(1) or decode(*a, **k)
    )
    gvu.gvu_step(
        fresh,
        policy_f,
        opt_f,
        batch,
        1,
        gvu.Args(batch_prompts=2, group_size=2, steps=10, sample_every=5),
    )
    assert pixel_calls == [1]


def test_reward_input_codes_is_refused_for_a_model_whose_understanding_reads_pixels(
    tmp_path, monkeypatch
):
    """--reward-input codes on a model without understands_codes (Janus) exits with one line before --out exists."""
    umm = TinyUMM.random(0, hidden=32, layers=1)
    umm.understands_codes = False
    monkeypatch.setattr(gvu, "load_umm", lambda *a, **k: umm)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        gvu.main(
            [
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--reward-input",
                "codes",
                "--steps",
                "1",
            ]
        )
    msg = str(e.value.code)
    assert msg.startswith("error: --reward-input codes") and "\n" not in msg and not out.exists()


# ---------------------------------------------------------------------------------------------------------------
def test_step_timings_cover_the_step_wall_time():
    """gvu_step's timing hook (tools/bench.py's stopwatch) books every phase once, and the phases
    add up to the wall time of the call (the little left over is the code between the laps)."""
    from tools import bench

    umm, policy, opt = lora_tiny()
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


def test_bench_step_breakdown_times_every_phase_of_real_steps_for_both_reward_inputs():
    """tools/bench.py's breakdown drives gvu.add_lora and gvu_step as the trainer does (it once broke when they gained a
    return value): per reward input, one row per timed step, every phase booked, codes steps never decode."""
    from tools import bench

    res = bench.step_breakdown("tiny-random", steps=1, batch_prompts=1, group_size=2)
    assert set(res) == {"pixels", "codes"}
    for reward_input, t in res.items():
        assert {"rollout", "reward", "reference", "update", "step"} <= set(t) and all(
            len(v) == 1 for v in t.values()
        )
        assert (t["step"] > 0).all() and (t["update"] > 0).all()
    assert (
        res["codes"]["decode"] < 0.01 * res["pixels"]["decode"]
    ).all()  # codes: the phase is booked, nothing decodes
