"""Tests for models/adapters.py on the CPU, no downloads: JanusPro, XOmni and load_umm. Each test
drives gvu's own functions and compares against the model's own code paths.

JanusPro (transformers >= 5): a tiny random Janus built in-process (standins.build_janus: a 2-layer
Llama, a 1-layer SigLIP on 32 px, a 64-code VQ-VAE on a 4 x 4 grid, a byte-level BPE tokenizer with
Janus's special tokens); references are the processor and JanusForConditionalGeneration.forward /
generate / decode_image_tokens.

XOmni (transformers 5.x and X-Omni's 4.52.4): a toy stand-in for X-Omni's remote code written into a
folder and loaded through AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)
(standins.write_xomni); references are its own forward (full-vocabulary logits), tokenize_image +
chat template, mmdecode and the official gvu_score loop.

The contract every model keeps (rollout log-probs, reward loop, LoRA scope) is
test_umm_contract.py."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

import gvu
from models import adapters
from models.adapters import ASSISTANT, USER, ImagesRequired, XOmni
from models.tiny_umm import TinyUMM
from standins import (
    CODES,
    INSTRUCTION,
    PROMPTS,
    PX,
    TINY_PROMPTS,
    XO_CODES,
    XO_GRID,
    XO_PREFIX,
    XO_PX,
    context_ids,
    images_for,
    load_xomni,
    needs_janus,
    per_image_context_ids,
    run_main,
    write_lines,
)

# tiny tensors run on one thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(janus):
    return images_for(janus[0], len(PROMPTS))


# --- Janus-Pro ------------------------------------------------------------------------------------
@needs_janus
def test_uncond_prompt_is_janus_generate_masking(janus):
    """uncond_prompt(p) tokenises to Janus generate's unconditional row: t2i_prompt(p) with all but
    BOS/BOI padded."""
    umm, _ = janus
    tok = umm.tokenizer
    boi = tok.convert_tokens_to_ids(umm.boi_token)
    for p in PROMPTS + [""]:
        cond = tok(umm._t2i_chat(p)).input_ids
        assert cond[0] == tok.bos_token_id and cond[-1] == boi
        pad = umm.lm.generation_config.pad_token_id
        # Janus generate's masking
        want = [t if t in (tok.bos_token_id, boi) else pad for t in cond]
        assert tok(umm.uncond_prompt(p)).input_ids == want
    assert umm.t2i_prompt("") == umm.uncond_prompt("")


@needs_janus
@torch.no_grad()
def test_greedy_cfg_rollout_matches_janus_generate(janus):
    """gvu.rollout with top_k=1 and CFG 5 picks the same codes as
    JanusForConditionalGeneration.generate (greedy)."""
    umm, processor = janus
    for p in PROMPTS:
        enc = processor(text=f"{USER}: {p}\n\n{ASSISTANT}:", generation_mode="image")
        assert enc.input_ids[0].tolist() == umm.tokenizer(umm.t2i_prompt(p)).input_ids
        want = umm.lm.generate(**enc, generation_mode="image", do_sample=False, guidance_scale=5.0)
        got = gvu.rollout(umm, [p], G=1, top_k=1, cfg_scale=5.0)["codes"]
        assert got.tolist() == want.tolist()


@needs_janus
def test_hidden_states_refuses_placeholders_without_images(janus, images):
    """Image placeholders with no images is an error, never silently the placeholder token's
    embedding."""
    umm, _ = janus
    ids = umm.tokenizer(
        [umm.caption_prompt(images[0], INSTRUCTION)], add_special_tokens=False, return_tensors="pt"
    )
    with torch.no_grad(), pytest.raises(ImagesRequired):
        umm.hidden_states(ids.input_ids, ids.attention_mask)


@needs_janus
@torch.no_grad()
def test_decode_images_matches_janus_postprocess(janus):
    """decode_images gives N RGB PIL images of the VQ decoder's size, the pixels of Janus's own
    postprocess."""
    umm, processor = janus
    codes = torch.randint(0, CODES, (5, 16), generator=torch.Generator().manual_seed(3))
    got = umm.decode_images(codes)
    assert len(got) == 5 and all(
        isinstance(im, Image.Image) and im.size == (PX, PX) and im.mode == "RGB" for im in got
    )
    # the PIL backend wants channels first
    pixels = umm.lm.decode_image_tokens(codes).float().permute(0, 3, 1, 2)
    want = processor.postprocess(list(pixels), return_tensors="PIL.Image.Image")["pixel_values"]
    for g, w in zip(got, want):
        assert np.array_equal(np.asarray(g), np.asarray(w))


@needs_janus
def test_batched_tokenisation_gives_the_per_image_context_tokens_janus(janus):
    """Janus: the context text does not depend on the image; the batch gives the per-image ids."""
    umm, _ = janus
    images = umm.decode_images(torch.randint(0, 64, (3, 16)))
    assert context_ids(umm, umm.caption_prompts(images, INSTRUCTION)) == per_image_context_ids(
        umm, images
    )


def test_janus_adapter_refuses_transformers_older_than_5(monkeypatch, tmp_path):
    """On transformers 4.x the Janus adapter stops in one line naming the version it needs, before
    any loading."""
    monkeypatch.setattr(transformers, "__version__", "4.52.4")
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded")
    )
    with pytest.raises(
        adapters.InputError, match=r"needs transformers >= 5; this environment has 4\.52\.4"
    ):
        adapters.load_umm("deepseek-community/Janus-Pro-1B")
    msg = run_main(
        "--model",
        "deepseek-community/Janus-Pro-1B",
        "--prompts",
        write_lines(tmp_path / "prompts.txt", PROMPTS),
        "--out",
        tmp_path / "run",
    )
    assert (
        isinstance(msg, str)
        and msg.startswith("error: the Janus-Pro adapter needs transformers >= 5")
        and "\n" not in msg
    )


# --- X-Omni ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, missing",
    [(["--flux", "FLUX"], "--trust-remote-code"), (["--trust-remote-code"], "--flux")],
)
def test_gvu_refuses_xomni_without_trust_remote_code_or_flux(
    xomni_dirs, tmp_path, monkeypatch, flags, missing
):
    """gvu.py on an X-Omni folder without --trust-remote-code (or --flux) exits with one line naming
    the flag, before transformers is asked to load anything; a hub id is refused the same way."""
    calls = []
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(k)
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(SystemExit) as exit_:
        gvu.main(
            [
                "--model",
                xomni_dirs[0],
                "--prompts",
                str(prompts),
                "--out",
                str(tmp_path / "run"),
                *flags,
            ]
        )
    msg = str(exit_.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and missing in msg
    hub_flags = dict(
        trust_remote_code="--trust-remote-code" in flags, flux="FLUX" if "--flux" in flags else ""
    )
    with pytest.raises(adapters.InputError, match=missing):
        adapters.load_umm("X-Omni/X-Omni-En", 0, **hub_flags)
    assert calls == []


def test_xomni_adapter_never_implies_trust_remote_code(xomni_dirs):
    """XOmni.from_pretrained without trust_remote_code=True passes False on: transformers itself
    refuses the code."""
    with pytest.raises(ValueError, match="trust_remote_code"):
        XOmni.from_pretrained(*xomni_dirs)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@torch.no_grad()
def test_xomni_rollout_samples_codes_after_the_image_prefix(xomni, monkeypatch, cfg_scale):
    """gvu.rollout on X-Omni: the prefix is generate.py's prompt + '<SOM>3 3<IMAGE>', codes are in
    [0, K) and are the ids of <MM-Token-k>; X-Omni's full-vocabulary forward is never run."""
    umm = xomni
    monkeypatch.setattr(
        umm.lm,
        "forward",
        lambda *a, **k: pytest.fail("X-Omni's full-vocabulary forward was called"),
    )
    ro = gvu.rollout(
        umm, PROMPTS, G=2, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(1)
    )
    codes = ro["codes"]
    assert (
        codes.shape == (len(PROMPTS) * 2, XO_GRID * XO_GRID)
        and 0 <= codes.min()
        and codes.max() < XO_CODES
    )
    tok = umm.tokenizer
    for i, p in enumerate([p for p in PROMPTS for _ in range(2)]):
        assert (
            ro["prefix_ids"][i][ro["prefix_mask"][i].bool()].tolist()
            == tok(p + XO_PREFIX).input_ids
        )
        ids = (codes[i] + umm.image_offset).tolist()
        assert tok.convert_ids_to_tokens(ids) == [f"<MM-Token-{k}>" for k in codes[i].tolist()]


@torch.no_grad()
def test_xomni_logits_are_the_current_modes_rows_of_the_full_forward(xomni, xomni_ref):
    """hidden_states -> logits equals XOmniForCausalLM.forward's image rows [V, V+K) in image mode
    and text rows [0, V) in text mode; every other entry of the forward's row is the dtype minimum
    (probability 0)."""
    umm, (model, tok) = xomni, xomni_ref
    V = umm.image_offset
    codes = torch.randint(0, XO_CODES, (1, 9), generator=torch.Generator().manual_seed(2))
    ids = torch.cat([tok([PROMPTS[1] + XO_PREFIX], return_tensors="pt").input_ids, codes + V], 1)
    for mode, rows in (("image", slice(V, V + XO_CODES)), ("text", slice(0, V))):
        umm.set_generation_mode(mode)
        model.set_generation_mode(mode)
        full = model(input_ids=ids).logits  # (1, T, V + mm_vocab_size) fp32
        got = umm.logits(umm.hidden_states(ids, torch.ones_like(ids)))
        torch.testing.assert_close(got, full[..., rows], atol=1e-5, rtol=0)
        others = torch.ones(full.shape[-1], dtype=torch.bool)
        others[rows] = False
        assert (full[..., others] == torch.finfo(torch.float32).min).all()


@torch.no_grad()
def test_xomni_batched_decode_equals_per_image_official_decode(xomni, xomni_ref):
    """decode_images (decode_batch=2, cached text condition, text encoders gone) gives the pixels of
    X-Omni's own mmdecode on one '<SOM>3 3<IMAGE>...<EOM>' string at a time, noise drawn in the same
    order."""
    pipe = xomni.lm.decoder_pipe
    assert (
        pipe.text_encoder is None
        and pipe.text_encoder_2 is None
        and pipe.tokenizer is None
        and pipe.tokenizer_2 is None
    )
    codes = torch.randint(0, XO_CODES, (3, 9), generator=torch.Generator().manual_seed(3))
    got = xomni.decode_images(codes, torch.Generator().manual_seed(7))
    model, tok = xomni_ref
    want = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)  # generate.py seeds the global RNG before mmdecode
        for c in codes.tolist():
            text = XO_PREFIX + "".join(f"<MM-Token-{k}>" for k in c) + "<EOM>"
            texts, images = model.mmdecode(tok, tok(text).input_ids)
            assert texts[0] == "" and len(images) == 1
            want += images
    assert len(got) == 3 and all(im.size == (XO_PX, XO_PX) and im.mode == "RGB" for im in got)
    for g, w in zip(got, want):
        # batched float sums may round apart
        assert np.abs(np.asarray(g, dtype=int) - np.asarray(w, dtype=int)).max() <= 1


def test_batched_tokenisation_gives_the_per_image_context_tokens_xomni_standin(xomni, xomni_ref):
    """XOmni.caption_prompts (one SigLIP-VQ call) equals chat.py's context: the stand-in's own
    tokenize_image per image, then the chat template, tokenised."""
    model, tok = xomni_ref
    xo_images = images_for(xomni, len(PROMPTS))
    want = [
        tok.apply_chat_template(
            [{"role": "user", "content": model.tokenize_image(im) + "\n" + INSTRUCTION}],
            add_generation_prompt=True,
            return_dict=False,
        )
        for im in xo_images
    ]
    assert context_ids(xomni, xomni.caption_prompts(xo_images, INSTRUCTION)) == want


def test_reward_without_end_of_turn_equals_official_gvu_score(xomni, xomni_ref):
    """With score_end_of_turn off, intrinsic_rewards equals the official gvu_score's loop: the chat
    context, then one full forward per prompt token (tokenizer.encode(prompt)), the product of the
    probabilities to the power 1/L."""
    umm = xomni
    images = umm.decode_images(
        torch.randint(0, XO_CODES, (3, 9), generator=torch.Generator().manual_seed(5))
    )
    model, tok = xomni_ref
    model.set_generation_mode("text")
    want = []
    with torch.no_grad():
        for image, prompt in zip(images, PROMPTS):
            msg = [{"role": "user", "content": model.tokenize_image(image) + "\n" + INSTRUCTION}]
            ids = tok.apply_chat_template(
                msg, add_generation_prompt=True, return_tensors="pt", return_dict=False
            )
            gt = tok.encode(prompt)
            prob = 1.0
            for t in gt:
                prob *= F.softmax(model(ids).logits[:, -1], -1)[0, t].item()
                ids = torch.cat([ids, torch.tensor([[t]])], 1)
            want.append(prob ** (1.0 / len(gt)))
    args = gvu.Args(score_end_of_turn=False, instruction=INSTRUCTION, micro_batch=2)
    with torch.no_grad():
        got = gvu.intrinsic_rewards(umm, images, PROMPTS, args)[0]
        with_eot = gvu.intrinsic_rewards(
            umm, images, PROMPTS, gvu.Args(instruction=INSTRUCTION, micro_batch=2)
        )[0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert not np.allclose(with_eot.numpy(), want, rtol=1e-3)  # the default scores one more token


@torch.no_grad()
def test_decoder_text_prompt_gives_the_pipeline_that_prompts_embeddings(
    xomni_dirs, xomni_ref, monkeypatch
):
    """decoder_text='prompt': the pipeline is called with each image's own prompt embeddings (those
    the reference pipeline's encode_prompt makes of it) and '' as the negative, and the pixels equal
    X-Omni's own mmdecode of 'prompt<SOM>3 3<IMAGE>...<EOM>', one image at a time."""
    umm = load_xomni(xomni_dirs, decoder_text="prompt")
    model, tok = xomni_ref
    pipe_cls, calls = type(umm.lm.decoder_pipe), []
    call = pipe_cls.__call__
    monkeypatch.setattr(
        pipe_cls, "__call__", lambda self, *a, **k: calls.append(k) or call(self, *a, **k)
    )
    codes = torch.randint(0, XO_CODES, (3, 9), generator=torch.Generator().manual_seed(3))
    got = umm.decode_images(codes, torch.Generator().manual_seed(7), prompts=PROMPTS)
    monkeypatch.setattr(pipe_cls, "__call__", call)
    ref_pipe = model.decoder_pipe
    emb, pooled, _ = ref_pipe.encode_prompt(PROMPTS, PROMPTS, device="cpu")
    emb0, pooled0, _ = ref_pipe.encode_prompt([""], [""], device="cpu")
    sent = (
        torch.cat([c["prompt_embeds"] for c in calls]),
        torch.cat([c["pooled_prompt_embeds"] for c in calls]),
    )
    torch.testing.assert_close(sent, (emb, pooled))
    for c in calls:
        torch.testing.assert_close(
            c["negative_prompt_embeds"], emb0.expand_as(c["negative_prompt_embeds"])
        )
        torch.testing.assert_close(
            c["negative_pooled_prompt_embeds"],
            pooled0.expand_as(c["negative_pooled_prompt_embeds"]),
        )
    want = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        for p, c in zip(PROMPTS, codes.tolist()):
            text = p + XO_PREFIX + "".join(f"<MM-Token-{k}>" for k in c) + "<EOM>"
            texts, images = model.mmdecode(tok, tok(text).input_ids)
            assert texts[0] == p
            want += images
    for g, w in zip(got, want):
        assert np.abs(np.asarray(g, dtype=int) - np.asarray(w, dtype=int)).max() <= 1


def test_xomni_size_not_a_multiple_of_16_is_refused_before_loading(
    xomni_dirs, monkeypatch, tmp_path
):
    """--image-size 50 on X-Omni: one line naming the flag, and transformers is never asked to load
    anything."""
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded")
    )
    msg = run_main(
        "--model",
        xomni_dirs[0],
        "--flux",
        xomni_dirs[1],
        "--trust-remote-code",
        "--image-size",
        50,
        "--prompts",
        write_lines(tmp_path / "prompts.txt", PROMPTS),
        "--out",
        tmp_path / "run",
    )
    assert isinstance(msg, str) and msg.startswith("error: --image-size 50") and "\n" not in msg


def test_gvu_trains_one_step_on_xomni_passing_trust_remote_code_on(
    xomni_dirs, tmp_path, monkeypatch, one_thread
):
    """`gvu.py --model X --flux F --trust-remote-code` end to end: transformers gets
    trust_remote_code=True, one step is logged, and the LoRA adapter and a sample grid are
    written."""
    calls, load = [], transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: calls.append(k) or load(*a, **k),
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    gvu.main(
        [
            "--model",
            xomni_dirs[0],
            "--flux",
            xomni_dirs[1],
            "--trust-remote-code",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--steps",
            "1",
            "--batch-prompts",
            "2",
            "--group-size",
            "2",
            "--micro-batch",
            "4",
            "--image-size",
            str(XO_PX),
        ]
    )
    assert [k["trust_remote_code"] for k in calls] == [True]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0 < rows[0]["reward_mean"] <= 1
    assert (out / "adapter" / "adapter_config.json").exists() and (
        out / "samples" / "step_00000.png"
    ).exists()


# --- load_umm: what each model accepts ------------------------------------------------------------
# v2 world: 64 px
@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--decoder-text", "prompt"], "--decoder-text prompt"),
        (["--image-size", "48"], "--image-size 48"),
    ],
)
def test_tiny_umm_refuses_decoder_text_and_a_foreign_size_before_writing(tmp_path, flags, expect):
    """The tiny UMM's decoder reads no text and makes one size: one line, non-zero exit, no run
    folder."""
    out = tmp_path / "run"
    small = ["--steps", 1, "--batch-prompts", 2, "--group-size", 2]
    msg = run_main(
        "--model",
        "tiny-random",
        "--prompts",
        write_lines(tmp_path / "prompts.txt", TINY_PROMPTS),
        "--out",
        out,
        *small,
        *flags,
    )
    assert isinstance(msg, str) and msg.startswith("error: ") and expect in msg and "\n" not in msg
    assert not out.exists()
    assert (
        run_main(
            "--model",
            "tiny-random",
            "--prompts",
            write_lines(tmp_path / "prompts.txt", TINY_PROMPTS),
            "--out",
            out,
            *small,
            "--image-size",
            TinyUMM.random().image_size,
        )
        is None
    )
