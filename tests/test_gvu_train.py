"""gvu.py's training loop on tiny models, CPU only: the step (gvu_step) and its decode-free reward
path and timing hook, the first update's ratio, run length and lr schedule, the probe reward,
sampling that meets non-finite logits. Each compares against an independent computation: the
official per-token loop, a wall clock, a hand-computed value. gvu.py's equations, its smoke run and
resume are ../test_gvu.py's; the run folder's guarantees are test_runio.py's."""

import numpy as np
import pytest
import torch

import gvu
from models.tiny_umm import TinyUMM
from standins import (
    INSTRUCTION,
    SHIPPED,
    TINY_PROMPTS,
    geometric_means,
    log_rows,
    rendered,
    run_main,
    tiny_token_logprobs,
    write_lines,
)

# tiny tensors run on one thread
pytestmark = pytest.mark.usefixtures("one_thread")


# --- the decode-free reward (--reward-input codes) ------------------------------------------------
def test_codes_reward_equals_the_official_pixel_reward_when_retokenising_is_exact(shipped):
    """For codes whose decode -> re-tokenise round trip is exact, the reward read from the codes (no
    decode) equals the official per-token loop on the decoded pixels."""
    images, prompts = rendered(16, seed=1)
    codes = shipped.image_codes(images)  # codes the shipped tokenizer gives rendered shapes
    decoded = shipped.decode_images(codes, torch.Generator().manual_seed(0))
    exact = (shipped.image_codes(decoded) == codes).all(1)  # (N,) round trip exact
    assert exact.sum() >= 8, f"only {exact.sum()} exact round trips"
    keep = exact.nonzero()[:, 0].tolist()
    args = gvu.Args(reward_input="codes")
    with torch.no_grad():
        got = gvu.intrinsic_rewards(shipped, codes[keep], [prompts[i] for i in keep], args)[0]
        want = geometric_means(
            tiny_token_logprobs(shipped, [decoded[i] for i in keep], [prompts[i] for i in keep])
        )[0]
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


def lora_tiny(seed=0):
    umm = TinyUMM.random(seed, hidden=64, layers=2)
    torch.manual_seed(seed)
    policy, opt, _ = gvu.add_lora(umm, gvu.Args())
    return umm, policy, opt


def test_codes_step_never_runs_the_decoder_except_on_sample_steps(monkeypatch):
    """A --reward-input codes step off the sample schedule never calls decode_images (a decoder that
    raises changes nothing) and returns images=None; a sample step decodes once, for the grid; the
    pixels path decodes every step."""
    batch = ["a red circle", "two squares"]
    args = gvu.Args(reward_input="codes", batch_prompts=2, group_size=2, steps=10, sample_every=5)
    calls = []
    umm, policy, opt = lora_tiny()
    decode = umm.decode_images
    monkeypatch.setattr(umm, "decode_images", lambda *a, **k: calls.append(1) or decode(*a, **k))
    for step, decodes in [(1, 0), (2, 0), (5, 1), (9, 2)]:  # 5: sample_every, 9: the last step
        images = gvu.gvu_step(umm, policy, opt, batch, step, args)["images"]
        assert len(calls) == decodes and (images is None) == (step in (1, 2))
    # the rewards do not depend on the decoder: a decoder that raises, same rewards as a fresh
    # identical run
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
    """--reward-input codes on a model without understands_codes (Janus) exits with one line before
    --out exists."""
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


# --- the first update's ratio ---------------------------------------------------------------------
def one_sgd_step(clip_eps):
    """One gvu_step of the shipped tiny UMM under CPU bf16 autocast with SGD(lr=1): returns the step
    of the LoRA weights (= -grad) and the stats."""
    umm = TinyUMM.from_pretrained(SHIPPED)
    args = gvu.Args(group_size=4, micro_batch=4, clip_eps=clip_eps, max_grad_norm=1e9, seed=3)
    torch.manual_seed(0)
    policy, _, _ = gvu.add_lora(umm, args)
    params = [p for p in policy.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    sgd = torch.optim.SGD(params, lr=1.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with autocast:
        stats = gvu.gvu_step(umm, policy, sgd, TINY_PROMPTS[:2], 0, args)["stats"]
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
    return step, stats


def test_first_update_ratio_is_exactly_one_and_clips_nothing_in_bf16():
    """Under bf16 autocast the rollout's cached log-probs differ from the training pass by more than
    a tiny clip range, yet the first update's ratio is exactly 1 and its gradient equals the
    unclipped one (clip_eps 1e-6 vs 1e9)."""
    umm = TinyUMM.from_pretrained(SHIPPED)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ro = gvu.rollout(umm, TINY_PROMPTS[:2], 4, generator=torch.Generator().manual_seed(3))
        umm.lm.train()
        logp = gvu.image_token_logprobs(umm, ro["prefix_ids"], ro["prefix_mask"], ro["codes"])
    # the gap the rollout's old log-probs would have put in the ratio
    assert (logp - ro["old_logp"]).abs().max() > 1e-6
    tight, stats = one_sgd_step(1e-6)
    loose, _ = one_sgd_step(1e9)
    assert stats["ratio"] == 1.0 and stats["clip_frac"] == 0.0
    assert tight.abs().max() > 0
    torch.testing.assert_close(tight, loose, rtol=0, atol=0)


# --- run length and lr schedule -------------------------------------------------------------------
def test_epochs_sets_the_step_count(tmp_path):
    """--epochs 1.5 over 5 prompts, 2 a step: ceil(1.5 * 5 / 2) = 4 steps logged."""
    out = tmp_path / "run"
    assert (
        run_main(
            "--model",
            "tiny-random",
            "--prompts",
            write_lines(tmp_path / "prompts.txt", TINY_PROMPTS),
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
    """--lr-schedule linear --warmup-steps 1 over 4 steps: lr = 0, 1, 2/3, 1/3 x lr (hand-computed);
    a run stopped after its step-2 save and resumed logs the same lrs for steps 2 and 3 (the
    scheduler's state is in state.pt)."""
    lr = 1e-3
    want = [0.0, lr, lr * 2 / 3, lr / 3]
    base = [
        "--model",
        "tiny-random",
        "--prompts",
        write_lines(tmp_path / "prompts.txt", TINY_PROMPTS),
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


# --- the probe reward (--probe-every) -------------------------------------------------------------
def probe_run(tmp_path, out, *extra):
    """A 4-prompt run of the shipped tiny UMM with a probe every 2 steps; its log rows."""
    write_lines(tmp_path / "p.txt", TINY_PROMPTS[:4])
    flags = ["--model", SHIPPED, "--prompts", tmp_path / "p.txt", "--batch-prompts", 2,
             "--group-size", 2, "--probe-every", 2, "--save-every", 2, "--seed", 3,
             "--out", tmp_path / out, *extra]  # fmt: skip
    assert run_main(*flags) is None
    return log_rows(tmp_path / out)


def test_probe_uses_fixed_seeds_no_step_uses_and_the_same_policy_gives_the_same_probe(
    tmp_path, monkeypatch, shipped
):
    """Every probe samples step 0's prompts with one seed that no training step of the run samples
    with; at step 0 (LoRA B = 0: the base model) it equals the base's mean reward for those samples,
    computed here from the rollout's own seed; and a resumed run logs the same probe as an
    uninterrupted one (the same policy, the same probe)."""
    calls, real = [], gvu.rollout

    def spy(*a, **k):  # rollout(umm, prompts, G, temperature, top_k, min_p, cfg_scale, generator)
        calls.append((list(a[1]), a[7].initial_seed()))
        return real(*a, **k)

    monkeypatch.setattr(gvu, "rollout", spy)
    rows = probe_run(tmp_path, "a", "--steps", 4)
    assert [r["step"] for r in rows if "probe_reward" in r] == [0, 2]
    probes, steps = [calls[0], calls[3]], calls[1:3] + calls[4:]  # probe, 0, 1, probe, 2, 3
    assert probes[0] == probes[1] and probes[0][0] == steps[0][0]  # fixed: step 0's prompts
    assert probes[0][1] not in {seed for _, seed in steps} and len({s for _, s in steps}) == 4

    seed, prompts = probes[0][1], [p for p in probes[0][0] for _ in range(2)]
    with torch.no_grad():
        ro = real(shipped, probes[0][0], 2, generator=torch.Generator().manual_seed(seed))
        images = shipped.decode_images(ro["codes"], torch.Generator().manual_seed(seed))
        logp, mask = gvu.caption_token_logprobs(shipped, images, prompts, INSTRUCTION)
    want = torch.exp((logp * mask).sum(1) / mask.sum(1)).mean().item()
    assert rows[0]["probe_reward"] == pytest.approx(want, rel=1e-5)

    probe_run(tmp_path, "b", "--steps", 2)
    resumed = probe_run(tmp_path, "b", "--steps", 4, "--resume")
    assert resumed[2]["probe_reward"] == rows[2]["probe_reward"]


# --- sampling -------------------------------------------------------------------------------------
def test_sampling_with_non_finite_logits_is_a_training_error_not_a_crash():
    """NaN logits stop the rollout with gvu.TrainingError instead of torch.multinomial's
    RuntimeError."""
    umm = TinyUMM.random(0, hidden=32, layers=1)
    with torch.no_grad():
        umm.lm.lm_head.weight[umm.image_offset] = float("nan")
    with pytest.raises(gvu.TrainingError, match="not finite while sampling"):
        gvu.rollout(umm, ["a photo of a red circle"], 2)
