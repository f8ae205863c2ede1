"""The published-setting config files (configs/*.json) and how gvu.py reads them: every value
reaches Args and cites a source, the command line overrides the file, and each file drives one step
on the stand-in of its model (standins.py: a tiny JanusForConditionalGeneration, a toy of X-Omni's
remote code). CPU only, no downloads."""

import json
import math
import os

import pytest

import gvu
from models import adapters
from standins import PROMPTS, ROOT, XO_PX, log_rows, needs_janus, run_main, write_lines

CONFIGS = {
    name: os.path.join(ROOT, "configs", name)
    for name in ("xomni_paper.json", "janus_pro_1b.json", "janus_pro_7b.json")
}
# peft's pre-v6 names


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_file_sets_every_value_it_holds_and_cites_a_source_for_each(name):
    """parse_args(config) gives Args whose fields equal the file's values (json.load), and each
    value has a source."""
    with open(CONFIGS[name]) as f:
        values = json.load(f)
    sources = values.pop("_sources")
    args = gvu.parse_args([CONFIGS[name]])
    assert {k: getattr(args, k) for k in values} == values
    assert set(values) <= set(sources) and all(
        isinstance(sources[k], str) and sources[k] for k in values
    )


def test_xomni_paper_config_is_the_official_run():
    """The values the official run_grpo.sh / grpo.py / trainer fix, restated by hand, and 25,000
    steps on 50k prompts."""
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
    """Flags after the file win; --steps on the command line drops the file's --epochs; giving both
    is refused, and so are a config key Args does not have and a value outside a flag's choices."""
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
    """configs/xomni_paper.json (bf16, min-p, G=2, linear lr, no end-of-turn, decoder text = prompt)
    runs one step on the X-Omni stand-in (its model, FLUX folder and 48 px size given on the command
    line); the decoder is handed each image's own prompt and the first step's lr is 1e-6."""
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
        write_lines(tmp_path / "prompts.txt", PROMPTS),
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
def test_janus_config_drives_one_step_on_the_janus_stand_in(name, tmp_path, one_thread, janus):
    """configs/janus_pro_*.json (CFG 5, G=8, bf16) runs one step on a tiny Janus saved to a folder
    (model and its native 32 px size given on the command line)."""
    umm, processor = janus
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
        write_lines(tmp_path / "prompts.txt", PROMPTS),
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
