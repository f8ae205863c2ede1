"""Tests for the published-setting config files (configs/*.json) and the flags that let gvu.py express them:
--score-end-of-turn, --image-size, --decoder-text, --epochs, --lr-schedule / --warmup-steps, the exactly-1 ratio of
the first update, eval_geneval.py --dtype and the Janus adapter's transformers requirement. CPU only, no downloads:
the models are test_adapters.py's stand-ins (a tiny JanusForConditionalGeneration, a toy of X-Omni's remote code)
and the tiny UMM."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import get_peft_model, LoraConfig

from models import adapters
import eval_geneval
import gvu
from conftest import (
    run_main,
    INSTRUCTION,
    PROMPTS,
    XO_CODES,
    XO_PREFIX,
    XO_PX,
    build_janus,
    needs_janus,
)
from models.tiny_umm import TinyUMM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
CONFIGS = {
    name: os.path.join(ROOT, "configs", name)
    for name in ("xomni_paper.json", "janus_pro_1b.json", "janus_pro_7b.json")
}
TINY = [
    "a photo of a red circle",
    "a photo of a blue square",
    "a photo of two circles",
    "a photo of a green triangle",
    "a photo of a square",
]  # words the tiny UMM knows
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*deprecated and will be removed in v6"
)  # peft's pre-v6 names


def prompts_file(tmp_path, lines=PROMPTS):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


def log_rows(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# --- the config files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_file_sets_every_value_it_holds_and_cites_a_source_for_each(name):
    """parse_args(config) gives Args whose fields equal the file's values (json.load), and each value has a source."""
    with open(CONFIGS[name]) as f:
        values = json.load(f)
    sources = values.pop("_sources")
    args = gvu.parse_args([CONFIGS[name]])
    assert {k: getattr(args, k) for k in values} == values
    assert set(values) <= set(sources) and all(
        isinstance(sources[k], str) and sources[k] for k in values
    )


def test_xomni_paper_config_is_the_official_run():
    """The values the official run_grpo.sh / grpo.py / trainer fix, restated by hand, and 25,000 steps on 50k prompts."""
    a = gvu.parse_args([CONFIGS["xomni_paper.json"]])
    assert (
        a.group_size,
        a.batch_prompts,
        a.epochs,
        a.lr,
        a.lr_schedule,
        a.warmup_steps,
        a.beta,
    ) == (2, 8, 4, 1e-6, "linear", 0, 0.03)
    assert (
        a.image_size,
        a.min_p,
        a.cfg_scale,
        a.temperature,
        a.lora_r,
        a.lora_alpha,
        a.max_grad_norm,
    ) == (576, 0.03, 1.0, 1.0, 8, 32, 1.0)
    assert (a.score_end_of_turn, a.decoder_text, a.reward_model, a.num_iterations) == (
        False,
        "prompt",
        "policy",
        1,
    )
    # the trainer's GenerationConfig leaves top_k at transformers' default 50, top_p at 1.0, and
    # generate lets the checkpoint's generation_config.json replace such defaults
    assert (a.top_k, a.top_p, a.generation_config) == (50, 1.0, True)
    assert math.ceil(a.epochs * 50_000 / a.batch_prompts) == 25_000


def test_command_line_overrides_the_config_and_steps_replaces_epochs(tmp_path):
    """Flags after the file win; --steps on the command line drops the file's --epochs; giving both is refused, and
    so are a config key Args does not have and a value outside a flag's choices."""
    a = gvu.parse_args(
        [CONFIGS["xomni_paper.json"], "--lr", "0.5", "--steps", "3", "--no-score-end-of-turn"]
    )
    assert (a.lr, a.steps, a.epochs, a.score_end_of_turn, a.group_size) == (0.5, 3, 0, False, 2)
    b = gvu.parse_args([CONFIGS["janus_pro_7b.json"], "--epochs", "1"])
    assert (b.epochs, b.steps) == (1, gvu.Args.steps)  # the file's steps dropped
    for argv, bad in (
        (["--steps", "3", "--epochs", "1"], None),
        ([], {"steps": 3, "epochs": 1}),
        ([], {"bogus": 1}),
        ([], {"decoder_text": "clip"}),
        ([], {"lr_schedule": "cosine"}),
    ):
        if bad is not None:
            (tmp_path / "c.json").write_text(json.dumps(bad))
            argv = [str(tmp_path / "c.json")]
        with pytest.raises(SystemExit) as e:
            gvu.parse_args(argv)
        assert e.value.code == 2


def test_xomni_paper_config_drives_one_step_on_the_xomni_stand_in(
    xomni_dirs, tmp_path, monkeypatch, one_thread
):
    """configs/xomni_paper.json (bf16, min-p, G=2, linear lr, no end-of-turn, decoder text = prompt) runs one step on
    the X-Omni stand-in (its model, FLUX folder and 48 px size given on the command line); the decoder is handed each
    image's own prompt and the first step's lr is 1e-6."""
    seen = []
    decode = adapters.XOmni.decode_images
    monkeypatch.setattr(
        adapters.XOmni,
        "decode_images",
        lambda self, codes, generator=None, prompts=None: (
            seen.append(prompts) or decode(self, codes, generator, prompts)
        ),
    )
    out = tmp_path / "run"
    msg = run_main(
        CONFIGS["xomni_paper.json"],
        "--model",
        xomni_dirs[0],
        "--flux",
        xomni_dirs[1],
        "--image-size",
        XO_PX,
        "--prompts",
        prompts_file(tmp_path),
        "--steps",
        1,
        "--batch-prompts",
        2,
        "--micro-batch",
        4,
        "--probe-every",
        0,
        "--top-k",
        16,  # the stand-in has 32 image codes
        "--out",
        out,
    )
    assert msg is None
    rows = log_rows(out)
    assert len(rows) == 1 and rows[0]["lr"] == 1e-6 and 0 < rows[0]["reward_mean"] <= 1
    assert (
        len(seen) == 1
        and len(seen[0]) == 4
        and seen[0][0::2] == seen[0][1::2]
        and set(seen[0]) <= set(PROMPTS)
    )
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["decoder_text"], cfg["score_end_of_turn"], cfg["image_size"], cfg["dtype"]) == (
        "prompt",
        False,
        XO_PX,
        "bfloat16",
    )


@needs_janus
@pytest.mark.parametrize("name", ["janus_pro_1b.json", "janus_pro_7b.json"])
def test_janus_config_drives_one_step_on_the_janus_stand_in(name, tmp_path, one_thread):
    """configs/janus_pro_*.json (CFG 5, G=8, bf16) runs one step on a tiny Janus saved to a folder (model and its
    native 32 px size given on the command line)."""
    umm, processor = build_janus(0)
    folder = tmp_path / "janus"
    umm.lm.save_pretrained(folder)
    processor.save_pretrained(folder)
    out = tmp_path / "run"
    msg = run_main(
        CONFIGS[name],
        "--model",
        folder,
        "--image-size",
        umm.image_size,
        "--prompts",
        prompts_file(tmp_path),
        "--steps",
        1,
        "--batch-prompts",
        1,
        "--micro-batch",
        8,
        "--out",
        out,
    )
    assert msg is None
    rows = log_rows(out)
    assert len(rows) == 1 and rows[0]["lr"] == 1e-6 and 0 < rows[0]["reward_mean"] <= 1


# --- the reward: the paper's formula --------------------------------------------------------------------------------
def test_reward_without_end_of_turn_equals_official_gvu_score(xomni_dirs, xomni_ref):
    """With score_end_of_turn off, intrinsic_rewards equals the official gvu_score's loop: the chat context, then one
    full forward per prompt token (tokenizer.encode(prompt)), the product of the probabilities to the power 1/L."""
    umm = adapters.XOmni.from_pretrained(
        *xomni_dirs, trust_remote_code=True, image_size=XO_PX, decode_batch=2
    )
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


# --- the decoder's text condition ------------------------------------------------------------------------------------
@torch.no_grad()
def test_decoder_text_prompt_gives_the_pipeline_that_prompts_embeddings(
    xomni_dirs, xomni_ref, monkeypatch
):
    """decoder_text='prompt': the pipeline is called with each image's own prompt embeddings (those the reference
    pipeline's encode_prompt makes of it) and '' as the negative, and the pixels equal X-Omni's own mmdecode of
    'prompt<SOM>3 3<IMAGE>...<EOM>', one image at a time."""
    umm = adapters.XOmni.from_pretrained(
        *xomni_dirs, trust_remote_code=True, image_size=XO_PX, decode_batch=2, decoder_text="prompt"
    )
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


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--decoder-text", "prompt"], "--decoder-text prompt"),
        (["--image-size", "48"], "--image-size 48"),
    ],
)  # v2 world: 64 px
def test_tiny_umm_refuses_decoder_text_and_a_foreign_size_before_writing(tmp_path, flags, expect):
    """The tiny UMM's decoder reads no text and makes one size: one line, non-zero exit, no run folder."""
    out = tmp_path / "run"
    small = ["--steps", 1, "--batch-prompts", 2, "--group-size", 2]
    msg = run_main(
        "--model",
        "tiny-random",
        "--prompts",
        prompts_file(tmp_path, TINY),
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
            prompts_file(tmp_path, TINY),
            "--out",
            out,
            *small,
            "--image-size",
            TinyUMM.random().image_size,
        )
        is None
    )


def test_xomni_size_not_a_multiple_of_16_is_refused_before_loading(
    xomni_dirs, monkeypatch, tmp_path
):
    """--image-size 50 on X-Omni: one line naming the flag, and transformers is never asked to load anything."""
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
        prompts_file(tmp_path),
        "--out",
        tmp_path / "run",
    )
    assert isinstance(msg, str) and msg.startswith("error: --image-size 50") and "\n" not in msg


# --- the first update's ratio -----------------------------------------------------------------------------------------
def one_sgd_step(clip_eps):
    """One gvu_step of the shipped tiny UMM under CPU bf16 autocast with SGD(lr=1): returns the step of the LoRA
    weights (= -grad) and the stats."""
    umm = TinyUMM.from_pretrained(os.path.join(ROOT, "checkpoints", "tiny-umm"))
    args = gvu.Args(group_size=4, micro_batch=4, clip_eps=clip_eps, max_grad_norm=1e9, seed=3)
    torch.manual_seed(0)
    policy, _, _ = gvu.add_lora(umm, args)
    params = [p for p in policy.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    sgd = torch.optim.SGD(params, lr=1.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with autocast:
        stats = gvu.gvu_step(umm, policy, sgd, TINY[:2], 0, args)["stats"]
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
    return step, stats


def test_first_update_ratio_is_exactly_one_and_clips_nothing_in_bf16(one_thread):
    """Under bf16 autocast the rollout's cached log-probs differ from the training pass by more than a tiny clip range,
    yet the first update's ratio is exactly 1 and its gradient equals the unclipped one (clip_eps 1e-6 vs 1e9)."""
    umm = TinyUMM.from_pretrained(os.path.join(ROOT, "checkpoints", "tiny-umm"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ro = gvu.rollout(umm, TINY[:2], 4, generator=torch.Generator().manual_seed(3))
        umm.lm.train()
        logp = gvu.image_token_logprobs(umm, ro["prefix_ids"], ro["prefix_mask"], ro["codes"])
    assert (
        logp - ro["old_logp"]
    ).abs().max() > 1e-6  # the gap the rollout's old log-probs would have put in the ratio
    tight, stats = one_sgd_step(1e-6)
    loose, _ = one_sgd_step(1e9)
    assert stats["ratio"] == 1.0 and stats["clip_frac"] == 0.0
    assert tight.abs().max() > 0
    torch.testing.assert_close(tight, loose, rtol=0, atol=0)


# --- run length and lr schedule ----------------------------------------------------------------------------------------
def test_epochs_sets_the_step_count(tmp_path):
    """--epochs 1.5 over 5 prompts, 2 a step: ceil(1.5 * 5 / 2) = 4 steps logged."""
    out = tmp_path / "run"
    assert (
        run_main(
            "--model",
            "tiny-random",
            "--prompts",
            prompts_file(tmp_path, TINY),
            "--out",
            out,
            "--epochs",
            1.5,
            "--batch-prompts",
            2,
            "--group-size",
            2,
            "--micro-batch",
            4,
        )
        is None
    )
    assert [r["step"] for r in log_rows(out)] == [0, 1, 2, 3]


def test_linear_schedule_with_warmup_is_logged_and_survives_resume(tmp_path, monkeypatch):
    """--lr-schedule linear --warmup-steps 1 over 4 steps: lr = 0, 1, 2/3, 1/3 x lr (hand-computed); a run stopped
    after its step-2 save and resumed logs the same lrs for steps 2 and 3 (the scheduler's state is in state.pt)."""
    lr = 1e-3
    want = [0.0, lr, lr * 2 / 3, lr / 3]
    base = [
        "--model",
        "tiny-random",
        "--prompts",
        prompts_file(tmp_path, TINY),
        "--steps",
        4,
        "--batch-prompts",
        2,
        "--group-size",
        2,
        "--micro-batch",
        4,
        "--lr",
        lr,
        "--lr-schedule",
        "linear",
        "--warmup-steps",
        1,
        "--save-every",
        2,
    ]
    assert run_main(*base, "--out", tmp_path / "full") is None
    np.testing.assert_allclose([r["lr"] for r in log_rows(tmp_path / "full")], want, rtol=1e-9)
    step = gvu.gvu_step

    def stop_at_2(umm, policy, optimizer, batch, i, *a, **k):
        if i == 2:
            raise gvu.TrainingError("stopped")
        return step(umm, policy, optimizer, batch, i, *a, **k)

    monkeypatch.setattr(gvu, "gvu_step", stop_at_2)
    assert run_main(*base, "--out", tmp_path / "cut").startswith("error: stopped")
    monkeypatch.setattr(gvu, "gvu_step", step)
    assert run_main(*base, "--out", tmp_path / "cut", "--resume") is None
    rows = log_rows(tmp_path / "cut")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    np.testing.assert_allclose([r["lr"] for r in rows], want, rtol=1e-9)


# --- precision and versions ----------------------------------------------------------------------------------------------
def test_eval_generate_uses_the_trainers_precision_rule(monkeypatch, tmp_path):
    """eval_geneval.py generate: --dtype bfloat16 loads with bf16 and samples under bf16 autocast, 'auto' on the CPU
    neither (gvu.train's rule); --image-size and --decoder-text reach load_umm."""
    seen = {}
    load = adapters.load_umm
    monkeypatch.setattr(eval_geneval, "load_umm", lambda *a: seen.update(load_args=a) or load(*a))
    rollout = gvu.rollout
    monkeypatch.setattr(
        gvu,
        "rollout",
        lambda *a: seen.update(autocast=torch.is_autocast_enabled("cpu")) or rollout(*a),
    )
    meta = tmp_path / "m.jsonl"
    meta.write_text(
        json.dumps(
            {
                "tag": "single_object",
                "prompt": "a photo of a circle",
                "include": [{"class": "circle", "count": 1}],
            }
        )
        + "\n"
    )
    for dtype, bf16 in (("bfloat16", True), ("auto", False)):
        out = tmp_path / dtype
        eval_geneval.main(
            [
                "generate",
                "--model",
                "tiny-random",
                "--metadata",
                str(meta),
                "--out",
                str(out),
                "--n",
                "2",
                "--any-class",
                "--device",
                "cpu",
                "--dtype",
                dtype,
                "--image-size",
                "64",
            ]
        )
        assert (
            seen["load_args"][5:] == (bf16, 64, "none") and seen["autocast"] is bf16
        )  # the v2 world's 64 px


def test_janus_adapter_refuses_transformers_older_than_5(monkeypatch, tmp_path):
    """On transformers 4.x the Janus adapter stops in one line naming the version it needs, before any loading."""
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
        prompts_file(tmp_path),
        "--out",
        tmp_path / "run",
    )
    assert (
        isinstance(msg, str)
        and msg.startswith("error: the Janus-Pro adapter needs transformers >= 5")
        and "\n" not in msg
    )
