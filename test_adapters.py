"""Tests for adapters.JanusPro on a tiny random Janus built in-process (CPU, no downloads): a 2-layer
Llama, a 1-layer SigLIP on 32 px, a 64-code VQ-VAE on a 4 x 4 grid, a byte-level BPE tokenizer with
Janus's special tokens. Each test drives gvu's own functions and compares against Janus's own code
paths (the processor, JanusForConditionalGeneration.forward / generate / decode_image_tokens)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
import transformers
from packaging.version import Version
from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor, PreTrainedTokenizerFast

import gvu
from adapters import ASSISTANT, USER, ImagesRequired, JanusPro, janus_image_processor_class

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SPECIALS = [BOS, EOS, PAD, USER, ASSISTANT, "<image_placeholder>", "<begin_of_image>", "<end_of_image>"]
PROMPTS = ["a red circle", "two blue squares left of a green triangle", "a large yellow star"]
INSTRUCTION = "Describe the image in detail."
HIDDEN, CODES, PX = 64, 64, 32
pytestmark = [pytest.mark.filterwarnings("ignore:.*deprecated and will be removed in v6"),  # peft's pre-v6 names
              pytest.mark.skipif(Version(transformers.__version__) < Version("5"),
                                 reason="the Janus adapter targets transformers >= 5 (4.x is X-Omni's stack)")]


def build_tokenizer():
    """Byte-level BPE (as DeepSeek's) trained on a few lines, BOS added by the post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(PROMPTS + [INSTRUCTION, "a photo of one circle and one square"], trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, extra_special_tokens={
        "image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"})


def build_janus(seed=0):
    """A tiny random JanusForConditionalGeneration (~0.5M params) and its JanusProcessor."""
    tok = build_tokenizer()
    n_img = (PX // 8) ** 2
    processor = JanusProcessor(janus_image_processor_class()(size={"height": PX, "width": PX}, image_mean=[0.5] * 3,
                                                      image_std=[0.5] * 3), tok, num_image_tokens=n_img,
                               use_default_system_prompt=True)  # as the converted Janus-Pro processors
    cfg = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=len(tok) + 5, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=PX, patch_size=8,
                           mlp_ratio=2.0, projection_dim=HIDDEN, num_image_tokens=n_img),
        vq_config=dict(embed_dim=8, num_embeddings=CODES, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, projection_dim=HIDDEN,
                       image_token_embed_dim=HIDDEN),
        image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"))
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg).eval()
    gc = model.generation_config  # as convert_janus_weights_to_hf.py sets it
    gc.temperature, gc.guidance_scale, gc.bos_token_id = 1.0, 5.0, tok.bos_token_id
    gc.pad_token_id = tok.convert_tokens_to_ids(PAD)
    gc.generation_kwargs = {"boi_token_id": tok.convert_tokens_to_ids("<begin_of_image>")}
    return JanusPro(model, processor), processor


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is ~100x faster than two on a shared 2-core machine (spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def janus():
    return build_janus(0)


@pytest.fixture(scope="module")
def images(janus):
    umm, _ = janus
    g = torch.Generator().manual_seed(0)
    return umm.decode_images(torch.randint(0, CODES, (len(PROMPTS), 16), generator=g))


@pytest.fixture(scope="module")
def slow_reward(janus, images):
    """Reference: Janus's own processor (text + pixel_values) and forward, one image at a time, one full
    uncached forward per prompt token, the conversation tokenised as one string."""
    umm, processor = janus
    out = []
    with torch.no_grad():
        for im, p in zip(images, PROMPTS):
            head = f"{USER}: <image_placeholder>\n{INSTRUCTION}\n\n{ASSISTANT}:"
            ctx = processor(text=head, images=[im]).input_ids[0]
            enc = processor(text=f"{head} {p}{EOS}", images=[im])
            ids = enc.input_ids[0]
            assert ids[:len(ctx)].tolist() == ctx.tolist()
            logps = []
            for t in range(len(ctx), len(ids)):
                logits = umm.lm(input_ids=ids[None, :t], pixel_values=enc.pixel_values).logits[0, -1]
                logps.append(F.log_softmax(logits.float(), -1)[ids[t]])
            out.append(torch.stack(logps))
    return out


def check_reward(logp, mask, slow):
    assert [int(m.sum()) for m in mask] == [len(s) for s in slow]
    for lp, s in zip(logp, slow):
        torch.testing.assert_close(lp[:len(s)], s, atol=1e-5, rtol=0)
    want = torch.stack([s.mean().exp() for s in slow])
    torch.testing.assert_close(gvu.intrinsic_reward(logp, mask), want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_scale", [1.0, 5.0])
@torch.no_grad()
def test_rollout_old_logp_equals_teacher_forced_logp(janus, cfg_scale):
    """gvu.rollout's old log-probs (KV-cached, CFG-sampled) equal gvu.token_logprobs' conditional ones: ratio 1."""
    umm, _ = janus
    ro = gvu.rollout(umm, PROMPTS, G=2, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(1))
    assert ro["codes"].shape == (len(PROMPTS) * 2, 16) and 0 <= ro["codes"].min() and ro["codes"].max() < CODES
    logp = gvu.token_logprobs(umm, ro["prefix_ids"], ro["prefix_mask"], ro["codes"])
    torch.testing.assert_close(logp, ro["old_logp"], atol=1e-5, rtol=0)


def test_uncond_prompt_is_janus_generate_masking(janus):
    """uncond_prompt(p) tokenises to Janus generate's unconditional row: t2i_prompt(p) with all but BOS/BOI padded."""
    umm, _ = janus
    tok = umm.tokenizer
    boi = tok.convert_tokens_to_ids(umm.boi_token)
    for p in PROMPTS + [""]:
        cond = tok(umm._t2i_chat(p)).input_ids
        assert cond[0] == tok.bos_token_id and cond[-1] == boi
        pad = umm.lm.generation_config.pad_token_id
        want = [t if t in (tok.bos_token_id, boi) else pad for t in cond]  # Janus generate's masking
        assert tok(umm.uncond_prompt(p)).input_ids == want
    assert umm.t2i_prompt("") == umm.uncond_prompt("")


@torch.no_grad()
def test_greedy_cfg_rollout_matches_janus_generate(janus):
    """gvu.rollout with top_k=1 and CFG 5 picks the same codes as JanusForConditionalGeneration.generate (greedy)."""
    umm, processor = janus
    for p in PROMPTS:
        enc = processor(text=f"{USER}: {p}\n\n{ASSISTANT}:", generation_mode="image")
        assert enc.input_ids[0].tolist() == umm.tokenizer(umm.t2i_prompt(p)).input_ids
        want = umm.lm.generate(**enc, generation_mode="image", do_sample=False, guidance_scale=5.0)
        got = gvu.rollout(umm, [p], G=1, top_k=1, cfg_scale=5.0)["codes"]
        assert got.tolist() == want.tolist()


def test_reward_pass_equals_slow_per_token_loop(janus, images, slow_reward):
    """gvu's batched reward pass (micro-batches of 2, images passed through) equals Janus's own per-token forwards."""
    umm, _ = janus
    with torch.no_grad():
        logp, mask = gvu.prompt_token_logprobs(umm, images, PROMPTS, INSTRUCTION, micro_batch=2)
    check_reward(logp, mask, slow_reward)


def test_hidden_states_refuses_placeholders_without_images(janus, images):
    """Image placeholders with no images is an error, never silently the placeholder token's embedding."""
    umm, _ = janus
    ids = umm.tokenizer([umm.caption_prompt(images[0], INSTRUCTION)], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad(), pytest.raises(ImagesRequired):
        umm.hidden_states(ids.input_ids, ids.attention_mask)


def test_lora_touches_only_the_language_model_and_a_grpo_step_changes_only_lora():
    """LoRA via umm.lora_targets lands in language_model only; one grpo_loss backward + AdamW step moves only LoRA."""
    umm, _ = build_janus(1)
    umm.lm.requires_grad_(False)
    policy = get_peft_model(umm.lm, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=umm.lora_targets))
    lora_modules = {n.rsplit(".lora_", 1)[0] for n, _ in umm.lm.named_modules() if ".lora_A" in n}
    assert lora_modules and all(".language_model." in n for n in lora_modules)
    assert len(lora_modules) == 2 * 7  # 2 layers x q k v o gate up down
    assert not any("lora_" in n for n, _ in umm.lm.model.vision_model.named_modules())
    gvu.enable_checkpointing(umm.lm)
    params = [p for p in policy.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in umm.lm.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in umm.lm.named_parameters()}

    ro = gvu.rollout(umm, PROMPTS[:2], G=2, cfg_scale=5.0, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), policy.disable_adapter():
        ref = gvu.token_logprobs(umm, ro["prefix_ids"], ro["prefix_mask"], ro["codes"])
    umm.lm.train()
    logp = gvu.token_logprobs(umm, ro["prefix_ids"], ro["prefix_mask"], ro["codes"])
    loss, _ = gvu.grpo_loss(logp, ro["old_logp"], ref, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    loss.backward()
    opt.step()
    changed = {n for n, p in umm.lm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)


@torch.no_grad()
def test_decode_images_matches_janus_postprocess(janus):
    """decode_images gives N RGB PIL images of the VQ decoder's size, the pixels of Janus's own postprocess."""
    umm, processor = janus
    codes = torch.randint(0, CODES, (5, 16), generator=torch.Generator().manual_seed(3))
    got = umm.decode_images(codes)
    assert len(got) == 5 and all(isinstance(im, Image.Image) and im.size == (PX, PX) and im.mode == "RGB" for im in got)
    pixels = umm.lm.decode_image_tokens(codes).float().permute(0, 3, 1, 2)  # the PIL backend wants channels first
    want = processor.postprocess(list(pixels), return_tensors="PIL.Image.Image")["pixel_values"]
    for g, w in zip(got, want):
        assert np.array_equal(np.asarray(g), np.asarray(w))
