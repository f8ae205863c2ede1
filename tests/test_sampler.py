"""Tests for the sampler a run uses: models.sampler_settings (--generation-config),
runio.sampler_args (the printed line, OUT/sampler.json) and gvu.sampling_probs' top-p.

The official trainer samples with transformers' generate and a GenerationConfig that sets no top_k:
transformers' default top_k 50 applies before min-p, and generate (4.50 and later) lets the model's
generation_config.json replace every value the handed config leaves at a transformers default. The
model here is the shipped tiny UMM, copied with a generation_config.json of our own (or none). CPU
only, no downloads."""

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import eval_geneval
import gvu
from standins import eval_error, run_main, write_lines
from models import sampler_settings
from models.tiny_umm import TinyUMM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
TINY_UMM = os.path.join(ROOT, "checkpoints", "tiny-umm")
PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a photo of two circles"]
# a checkpoint's generation_config.json, saved by a transformers >= 4.50
SAVED = dict(
    do_sample=True,
    temperature=0.8,
    top_k=20,
    top_p=0.9,
    repetition_penalty=1.1,
    transformers_version="4.51.3",
)
# the sampler configs/xomni_paper.json asks for: the official trainer's GenerationConfig
OFFICIAL = dict(temperature=1.0, top_k=50, top_p=1.0, min_p=0.03, cfg_scale=1.0)
FILE, DEFAULT, FLAG = "generation_config.json", "transformers' default", "flag/config"


def model_folder(tmp_path, generation_config):
    """A copy of the tiny UMM whose LM folder holds `generation_config` as its
    generation_config.json (None: no such file)."""
    folder = tmp_path / "umm"
    shutil.copytree(TINY_UMM, folder)
    path = folder / "lm" / "generation_config.json"
    path.unlink()
    if generation_config is not None:
        path.write_text(json.dumps(dict(generation_config, eos_token_id=3, pad_token_id=0)))
    return folder


def asked(generation_config=True, **flags):
    """The flags sampler_settings reads: the official run's, changed by `flags`."""
    return SimpleNamespace(**{**OFFICIAL, **flags}, generation_config=generation_config)


def sources(record):
    return {k: v["source"] for k, v in record.items() if "source" in v}


def spy_on_rollout(monkeypatch):
    """The sampler of every gvu.rollout call from now on, in a list that fills as they happen."""
    calls, real = [], gvu.rollout

    def spy(umm, prompts, G, temperature, top_k, min_p, cfg_scale, generator, top_p):
        calls.append(dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
        return real(umm, prompts, G, temperature, top_k, min_p, cfg_scale, generator, top_p)

    monkeypatch.setattr(gvu, "rollout", spy)
    return calls


# --- the rule: which values come from the checkpoint ------------------------------------------
def test_checkpoint_file_replaces_only_the_values_left_at_transformers_defaults(tmp_path):
    """With a generation_config.json saved by transformers 4.51: temperature 1.0, top_k 50 and
    top_p 1.0 (transformers' defaults) take the file's values, min_p 0.03 and CFG stay; a value
    asked away from the default stays; the file's repetition penalty is reported, not applied;
    generation_config off, the flags alone."""
    lm = TinyUMM.from_pretrained(model_folder(tmp_path, SAVED)).lm
    values, record = sampler_settings(lm, asked())
    assert values == dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.03)
    assert sources(record) == dict(
        temperature=FILE, top_k=FILE, top_p=FILE, min_p=FLAG, cfg_scale=FLAG
    )
    assert record["generation_config"] == dict(
        transformers_version="4.51.3", applies=True, not_sampled=dict(repetition_penalty=1.1)
    )
    values, record = sampler_settings(lm, asked(top_k=16, temperature=0.9))
    assert values == dict(temperature=0.9, top_k=16, top_p=0.9, min_p=0.03)
    assert sources(record) == dict(
        temperature=FLAG, top_k=FLAG, top_p=FILE, min_p=FLAG, cfg_scale=FLAG
    )
    values, record = sampler_settings(lm, asked(False))
    assert values == dict(temperature=1.0, top_k=50, top_p=1.0, min_p=0.03)
    assert set(sources(record).values()) == {FLAG} and "generation_config" not in record


@pytest.mark.parametrize("saved", [dict(SAVED, transformers_version="4.49.0"), None])
def test_an_older_file_or_none_leaves_transformers_defaults(tmp_path, saved):
    """A generation_config.json saved by transformers 4.49 is not consulted (generate's rule starts
    at 4.50); without a file, from_pretrained's own config holds no sampling values: either way
    the official sampler is transformers' defaults, top-k 50 before min-p 0.03."""
    lm = TinyUMM.from_pretrained(model_folder(tmp_path, saved)).lm
    values, record = sampler_settings(lm, asked())
    assert values == dict(temperature=1.0, top_k=50, top_p=1.0, min_p=0.03)
    assert sources(record) == dict(
        temperature=DEFAULT, top_k=DEFAULT, top_p=DEFAULT, min_p=FLAG, cfg_scale=FLAG
    )
    assert record["generation_config"]["applies"] == (saved is None)
    assert record["generation_config"]["not_sampled"] == {}


@pytest.mark.skipif(
    Version(transformers.__version__) >= Version("5"),
    reason="transformers 5 changed the rule; the official code pins 4.51.3 (CI's X-Omni: 4.52.4)",
)
@pytest.mark.parametrize("version", ["4.51.3", "4.49.0"])
def test_the_rule_is_transformers_4_generates_own(tmp_path, version):
    """On transformers 4.5x: generate's own _prepare_generation_config, handed the official
    trainer's GenerationConfig, ends with the values sampler_settings gives."""
    saved = dict(SAVED, transformers_version=version)
    lm = TinyUMM.from_pretrained(model_folder(tmp_path, saved)).lm
    official = GenerationConfig(
        do_sample=True, temperature=1.0, min_p=0.03, top_p=1.0, guidance_scale=1.0
    )
    merged = lm._prepare_generation_config(official)[0]
    values, record = sampler_settings(lm, asked())
    assert {k: getattr(merged, k) for k in values} == values
    assert (merged.repetition_penalty != 1.0) == bool(record["generation_config"]["not_sampled"])


# --- the codes: the rollout draws what transformers' warpers draw ------------------------------
def test_rollout_draws_the_codes_transformers_warpers_draw(tmp_path, one_thread):
    """The rollout with the checkpoint's sampler (temperature 0.8, top-k 20, top-p 0.9, min-p 0.03)
    picks, step by step, the codes that transformers' own warpers (temperature, top-k, top-p, min-p,
    in generate's order: on transformers 5 the list generate builds is checked to be that) and
    torch.multinomial pick from the same logits with the same seed; the untruncated policy picks
    others, so the cut matters."""
    umm = TinyUMM.from_pretrained(model_folder(tmp_path, SAVED))
    values, _ = sampler_settings(umm.lm, asked())
    seen, logits = [], umm.logits
    umm.logits = lambda hidden: seen.append(logits(hidden).float()) or seen[-1]
    s = values
    flags = (s["temperature"], s["top_k"], s["min_p"], 1.0, torch.Generator().manual_seed(7))
    codes = gvu.rollout(umm, PROMPTS, 4, *flags, s["top_p"])["codes"]  # (12, N_img)

    ids = torch.zeros(len(codes), 1, dtype=torch.long)  # (the warpers do not read the ids)
    t, k, p, m = (values[key] for key in ("temperature", "top_k", "top_p", "min_p"))
    warpers = [
        TemperatureLogitsWarper(t),
        TopKLogitsWarper(k),
        TopPLogitsWarper(p),
        MinPLogitsWarper(m),
    ]
    processors = LogitsProcessorList(warpers)  # transformers' own warpers, in generate's order
    if Version(transformers.__version__) >= Version("5"):  # 4.x's builder wants generate's state
        built = umm.lm._get_logits_processor(GenerationConfig(do_sample=True, **values))
        assert [type(w) for w in built] == [type(w) for w in warpers]
    gen, plain_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    want, plain, kept = [], [], []
    for step_logits in seen:  # (12, K) each
        scores = processors(ids, step_logits.clone())
        want.append(torch.multinomial(scores.softmax(-1), 1, generator=gen))
        kept.append(torch.isfinite(scores).sum(-1).float().mean().item())
        plain.append(torch.multinomial((step_logits / 0.8).softmax(-1), 1, generator=plain_gen))
    assert torch.equal(codes, torch.cat(want, 1))
    assert max(kept) <= 20 and not torch.equal(codes, torch.cat(plain, 1))


# --- gvu.py end to end ------------------------------------------------------------------------
def test_a_run_samples_with_the_checkpoints_values_records_them_and_resumes(
    tmp_path, monkeypatch, capsys, one_thread
):
    """gvu.py --generation-config with the official flags on a checkpoint whose file sets
    temperature, top-k and top-p: every rollout samples with the file's values; config.json keeps
    the flags asked for (so --resume matches them), OUT/sampler.json and the printed line give each
    value with its source, and the file's repetition penalty is a warning. Without
    --generation-config the same flags sample as asked."""
    folder, calls = model_folder(tmp_path, SAVED), spy_on_rollout(monkeypatch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    def run(out, *flags):
        common = ["--model", folder, "--prompts", prompts, "--batch-prompts", 2, "--group-size", 2]
        common += ["--probe-every", 0, "--top-k", 50, "--min-p", 0.03, "--out", tmp_path / out]
        assert run_main(*common, *flags) is None
        return json.loads((tmp_path / out / "sampler.json").read_text())

    record = run("a", "--steps", 1, "--generation-config")
    checkpoint = dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.03)
    assert calls == [checkpoint]
    assert {k: record[k]["value"] for k in checkpoint} == checkpoint
    assert sources(record) == dict(
        temperature=FILE, top_k=FILE, top_p=FILE, min_p=FLAG, cfg_scale=FLAG
    )
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert [config[k] for k in ("temperature", "top_k", "top_p", "generation_config")] == [
        1.0,
        50,
        1.0,
        True,
    ]
    said = capsys.readouterr()
    assert (
        "sampler: temperature 0.8 (generation_config.json), top_k 20 (generation_config.json), "
        "top_p 0.9 (generation_config.json), min_p 0.03 (flag/config), cfg_scale 1.0 (flag/config)"
    ) in said.out
    assert "sets repetition_penalty = 1.1" in said.err

    run("a", "--steps", 2, "--generation-config", "--resume")  # the flags match config.json
    assert calls == [checkpoint] * 2 and "notice" not in capsys.readouterr().err

    record = run("b", "--steps", 1)
    assert calls[-1] == dict(temperature=1.0, top_k=50, top_p=1.0, min_p=0.03)
    assert set(sources(record).values()) == {FLAG} and "generation_config" not in record


def test_eval_generate_samples_as_the_trainer_does(tmp_path, monkeypatch, one_thread):
    """eval_geneval.py generate with the same flags and --generation-config samples with the
    checkpoint's values too, and leaves OUT/sampler.json beside the images; --top-p 0 is refused
    in one line."""
    folder, calls = model_folder(tmp_path, SAVED), spy_on_rollout(monkeypatch)
    meta = dict(tag="colors", include=[{"class": "circle", "count": 1, "color": "red"}])
    meta["prompt"] = PROMPTS[0]
    argv = ["generate", "--model", str(folder), "--n", "2", "--any-class", "--top-k", "50"]
    argv += ["--min-p", "0.03", "--metadata", str(write_lines(tmp_path / "m.jsonl", [meta]))]
    eval_geneval.main(argv + ["--out", str(tmp_path / "gen"), "--generation-config"])
    assert calls == [dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.03)]
    record = json.loads((tmp_path / "gen" / "sampler.json").read_text())
    assert sources(record) == dict(
        temperature=FILE, top_k=FILE, top_p=FILE, min_p=FLAG, cfg_scale=FLAG
    )
    error = eval_error(argv + ["--out", str(tmp_path / "bad"), "--top-p", "0"])
    assert error == "error: --top-p must be in (0, 1] (1 = off) (got 0.0)"


@pytest.mark.parametrize("top_p", ["0", "1.5", "nan"])
def test_top_p_outside_0_1_is_refused_before_anything_loads(tmp_path, top_p):
    """--top-p must be in (0, 1]: one line from the rules table, nothing written."""
    out = tmp_path / "run"
    flags = ["--steps", 1, "--batch-prompts", 1, "--group-size", 2, "--probe-every", 0]
    msg = run_main("--model", "tiny-random", *flags, "--top-p", top_p, "--out", out)
    assert msg == f"error: --top-p must be in (0, 1] (1 = off) (got {float(top_p)})"
    assert not out.exists()


def test_a_checkpoint_value_gvu_cannot_sample_with_is_refused_before_anything_is_written(tmp_path):
    """A generation_config.json whose temperature is 0 (transformers' warper refuses it too) stops
    gvu.py --generation-config in one line naming the file's setting, before --out exists."""
    folder, out = model_folder(tmp_path, dict(SAVED, temperature=0.0)), tmp_path / "run"
    msg = run_main("--model", folder, "--generation-config", "--out", out)
    assert msg.startswith("error: --generation-config: the model's generation_config.json sets ")
    assert "temperature = 0.0" in msg and "\n" not in msg and not out.exists()


# --- sampling_probs' top-p --------------------------------------------------------------------
def numpy_sampler(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """transformers' warpers written out in float64: temperature, top-k, then top-p on the
    distribution that is left (sort ascending, drop while the cumulative sum <= 1 - top_p, keep the
    last), then min-p. (N, K) logits -> (N, K) probabilities."""
    softmax = lambda z: (
        np.exp(z - z.max(-1, keepdims=True))
        / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
    )
    z = np.asarray(logits, np.float64) / temperature
    if top_k:
        z = np.where(z < np.sort(z, -1)[:, -top_k][:, None], -np.inf, z)
    if top_p < 1:
        order = np.argsort(softmax(z), -1, kind="stable")
        cum = np.cumsum(np.take_along_axis(softmax(z), order, -1), -1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[:, -1] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        z = np.where(drop, -np.inf, z)
    if min_p:
        q = softmax(z)
        z = np.where(q < min_p * q.max(-1, keepdims=True), -np.inf, z)
    return softmax(z)


def normalised(cond, **flags):
    probs = gvu.sampling_probs(cond, **flags).double()
    return (probs / probs.sum(-1, keepdim=True)).numpy()


@pytest.mark.parametrize(
    "flags, keep",
    [
        (dict(top_p=0.65), [3, 4]),  # ascending totals .05 .1 .2 .5 1: the first three <= .35
        (dict(top_k=2, top_p=0.6), [4]),  # top-k first: .5 is .625 of what top-k leaves
        (dict(top_k=2, top_p=0.68), [3, 4]),  # top-p reads the renormalised .375, not .3
        (dict(top_p=0.85, min_p=0.15), [2, 3, 4]),  # top-p before min-p: .8 < .85 keeps .1
        (dict(top_p=1e-9), [4]),  # the likeliest code always stays
    ],
)
def test_top_p_keeps_the_likeliest_codes_of_what_top_k_leaves_before_min_p(flags, keep):
    """Hand cases over p = (.05, .05, .1, .3, .5): top-p keeps the fewest likeliest codes whose
    share reaches top_p, of the distribution top-k leaves (renormalised), before min-p cuts."""
    cond = torch.tensor([[0.05, 0.05, 0.1, 0.3, 0.5]]).log()
    got = normalised(cond, **flags)
    assert np.flatnonzero(got[0]).tolist() == keep
    np.testing.assert_allclose(got, numpy_sampler(cond.numpy(), **flags), atol=1e-6)


def test_sampling_probs_equals_transformers_warpers_written_out_in_numpy():
    """Random logits and settings: sampling_probs, renormalised, equals the numpy computation of
    temperature, top-k, top-p, min-p (and drops exactly the codes it drops)."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        cond = torch.randn(6, 50, generator=g) * 3
        flags = dict(
            temperature=[0.7, 1.0, 1.3][trial % 3],
            top_k=[0, 5, 20, 50][trial % 4],
            top_p=[1.0, 0.95, 0.8, 0.5, 0.2][trial % 5],
            min_p=[0.0, 0.03, 0.2][trial % 3],
        )
        got, want = normalised(cond, **flags), numpy_sampler(cond.numpy(), **flags)
        assert ((got > 0) == (want > 0)).all(), flags
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str(flags))
