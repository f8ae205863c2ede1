"""eval_geneval.py's refusals, each one line and a non-zero exit before anything is written:
generate's flags (gvu.py's rules for the flags the two share), its checks on the loaded model,
adapter and metadata files, a full disk or a read-only --out."""

import errno
import json
import os
import shutil

import pytest
from PIL import Image

import eval_geneval as E
import gvu
from standins import TINY_PROMPTS, eval_error, meta, run_main, write, write_lines
from tools import runio

CIRCLES = [
    meta("colors", [{"class": "circle", "count": 1, "color": c}], prompt=f"a photo of a {c} circle")
    for c in ("red", "blue")
]


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """Two colour prompts the tiny UMM spells."""
    return str(write_lines(tmp_path_factory.mktemp("meta") / "m.jsonl", CIRCLES))


def generate_argv(metadata, out, *flags):
    """generate on tiny-random: 2 images per prompt."""
    argv = ["generate", "--metadata", metadata, "--out", out, "--any-class", "--n", 2, *flags]
    return [str(a) for a in argv]


@pytest.fixture(scope="module")
def generated(tmp_path_factory, metadata):
    """A folder generate wrote: 2 prompts x 2 images of 64x64."""
    out = tmp_path_factory.mktemp("gen") / "gen"
    E.main(generate_argv(metadata, out))
    return out


def copy(folder, to):
    """A copy of a folder, its links kept as links."""
    shutil.copytree(folder, to, symlinks=True)
    return to


def nothing_at(out):
    """Neither --out nor generate's .partial folder beside it exists."""
    return not os.path.exists(out) and not os.path.exists(f"{out}.partial")


# --- generate: its flags, gvu.py's rules where the two share a flag -------------------------------
GVU_RULES = {flag: what for flag, _, what in runio.settings_rules(gvu.Args())}


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--n", 0),
        ("--n", -1),
        ("--batch", 0),
        ("--temperature", 0),
        ("--temperature", -1),
        ("--temperature", "nan"),
        ("--top-k", -1),
        ("--min-p", 2),
        ("--min-p", "nan"),
        ("--cfg-scale", 0),
        ("--cfg-scale", "nan"),
        ("--cfg-scale", "inf"),
        ("--seed", -1),
        ("--seed", 2**64),
        ("--image-size", -1),
    ],
)
def test_generate_refuses_a_bad_number_with_gvus_rule_before_writing(
    tmp_path, metadata, flag, value
):
    """A bad number is one line naming the flag, in gvu.py's words for the flags it shares with
    gvu.py (runio.settings_rules) and '>= 1' for --n and --batch; --out is never created."""
    out = tmp_path / "gen"
    msg = eval_error(generate_argv(metadata, out, flag, value))
    what = GVU_RULES.get(flag[2:].replace("-", "_"), ">= 1")
    assert msg.startswith(f"error: {flag} must be {what} (got ") and nothing_at(out)


@pytest.mark.parametrize(
    "argv",
    [
        ["score", "run", "--threshold", "nan"],
        ["score", "run", "--counting-threshold", "2"],
        ["score", "run", "--max-objects", "0"],
        ["prompts", "--n", "0"],
    ],
)
def test_score_and_prompts_refuse_a_bad_number(tmp_path, argv):
    """score's thresholds lie in [0, 1] (nan is not), --max-objects and prompts' --n are >= 1:
    one line naming the flag, before anything is read or written."""
    out = tmp_path / "out"
    msg = eval_error(argv + ["--out", out] + ["--detector", "never/loaded"] * (argv[0] == "score"))
    assert msg.startswith(f"error: {argv[-2]} must be ") and not os.listdir(tmp_path)


def test_generate_refuses_top_k_beyond_the_models_image_codes(tmp_path, metadata):
    """--top-k above the image vocabulary is refused after the model loads, as gvu.py refuses it
    (runio.check_against_model), before any image is written."""
    out = tmp_path / "gen"
    msg = eval_error(generate_argv(metadata, out, "--top-k", 100000))
    assert "--top-k must be <= the model's" in msg and "(got 100000)" in msg and nothing_at(out)


def test_generate_refuses_a_prompt_too_long_for_the_model_as_gvu_does(tmp_path):
    """An 800-word prompt of known words: gvu.py refuses it (runio.check_context) and generate
    refuses it with the same words, naming its line of the metadata file."""
    long = "a photo of a " + "red " * 800 + "circle"
    prompts = write(tmp_path / "p.txt", long)
    gvu_msg = run_main("--model", "tiny-random", "--prompts", prompts, "--out", tmp_path / "run")
    assert "is too long" in gvu_msg and not (tmp_path / "run").exists()
    rows = ["", meta("colors", [{"class": "circle", "count": 1, "color": "red"}], prompt=long)]
    path = write_lines(tmp_path / "m.jsonl", rows)
    msg = eval_error(generate_argv(path, tmp_path / "gen"))
    assert f"line 2 of {path} is too long" in msg and nothing_at(tmp_path / "gen")


@pytest.mark.parametrize(
    "argv, names",
    [
        (["generate", "--metadata", "m", "--out", "o", "--n", "four"], "argument --n"),
        (["generate", "--metadata", "m", "--out", "o", "--temperature", "hot"], "--temperature"),
        (["generate", "--metadata", "m", "--out", "o", "--dtype", "float16"], "--dtype"),
        (["generate", "--out", "o"], "--metadata"),
        (["generate", "--metadata", "m", "--out", "o", "--bogus"], "--bogus"),
        (["score", "run", "--scorer", "clip"], "--scorer"),
        (["compare", "a", "b", "--bootstrap", "many"], "--bootstrap"),
        ([], "command"),
    ],
)
def test_a_bad_command_line_is_one_line_naming_the_flag(argv, names, capsys):
    """Type errors, bad choices, unknown and missing flags: one line naming the flag, not
    argparse's usage block."""
    assert names in eval_error(argv) and capsys.readouterr().err == ""


# --- generate: adapter and metadata files ---------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """The adapter of a one-step gvu.py run on tiny-random."""
    root = tmp_path_factory.mktemp("run")
    prompts = write_lines(root / "p.txt", TINY_PROMPTS[:2])
    flags = ["--steps", 1, "--batch-prompts", 1, "--group-size", 2, "--sample-every", 100]
    assert (
        run_main("--model", "tiny-random", "--prompts", prompts, "--out", root / "run", *flags)
        is None
    )
    return root / "run" / "adapter"


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


WEIGHTS = "adapter_model.safetensors"
ADAPTER_DAMAGE = {
    "truncated weights": (lambda a: truncate(a / WEIGHTS), f"cannot read {{a}}/{WEIGHTS}"),
    "empty weights": (lambda a: (a / WEIGHTS).write_bytes(b""), f"cannot read {{a}}/{WEIGHTS}"),
    "no weights": (lambda a: (a / WEIGHTS).unlink(), f"no {WEIGHTS}"),
    "gvu.json not JSON": (lambda a: (a / "gvu.json").write_text("{"), "cannot read {a}/gvu.json"),
    "gvu.json a list": (lambda a: (a / "gvu.json").write_text("[]"), "is not a JSON object"),
    "gvu.json without base_model": (
        lambda a: (a / "gvu.json").write_text('{"step": 1}'),
        "gvu.json does not name its base_model",
    ),
    "no gvu.json": (lambda a: (a / "gvu.json").unlink(), "no gvu.json"),
    "peft config not JSON": (
        lambda a: (a / "adapter_config.json").write_text("no"),
        "cannot read {a}/adapter_config.json",
    ),
}


@pytest.mark.parametrize("case", ADAPTER_DAMAGE)
def test_a_damaged_adapter_is_one_line_before_the_model_loads(
    tmp_path, metadata, adapter, case, monkeypatch
):
    """A truncated, empty or missing weights file, a bad or missing gvu.json, a bad peft config:
    one line naming the adapter and the file, before the model loads; the intact copy loads."""
    a = copy(adapter, tmp_path / "adapter")
    E.main(generate_argv(metadata, tmp_path / "ok", "--adapter", a))
    damage, says = ADAPTER_DAMAGE[case]
    damage(a)
    monkeypatch.setattr(E, "load_umm", lambda *args: pytest.fail("loaded the model"))
    msg = eval_error(generate_argv(metadata, tmp_path / "gen", "--adapter", a))
    assert msg.startswith(f"error: --adapter {a}: ") and says.format(a=a) in msg
    assert nothing_at(tmp_path / "gen")


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_an_empty_metadata_file_is_one_line(tmp_path, text):
    """A metadata file without a prompt is refused, as gvu.py refuses an empty prompt file."""
    path = write(tmp_path / "m.jsonl", text)
    msg = eval_error(generate_argv(path, tmp_path / "gen"))
    assert "has no prompts" in msg and nothing_at(tmp_path / "gen")


def test_a_metadata_file_with_a_byte_order_mark_is_read_as_gvu_reads_one(tmp_path):
    """A leading UTF-8 byte-order mark is dropped, as gvu.py's read_prompts drops it: generate
    writes the prompts; a file that is not UTF-8 is one line."""
    path = write(tmp_path / "m.jsonl", "\ufeff" + "".join(json.dumps(m) + "\n" for m in CIRCLES))
    assert runio.read_prompts(path)[0] == [json.dumps(m) for m in CIRCLES]
    assert E.read_metadata(path, classes=None) == CIRCLES
    E.main(generate_argv(path, tmp_path / "gen"))
    assert [r for _, r, _ in E.iter_samples(tmp_path / "gen", classes=None)][::2] == CIRCLES
    latin = write(tmp_path / "latin.jsonl", json.dumps(CIRCLES[0]).encode() + b"\xe9\n")
    assert "not UTF-8" in eval_error(generate_argv(latin, tmp_path / "gen2"))


# --- OSError: a full disk, a read-only --out ------------------------------------------------------
def no_space(path, *a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_generate_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, metadata, monkeypatch):
    """An image that cannot be written: one line naming the file and the reason; no --out and no
    half-filled .partial folder are left."""
    monkeypatch.setattr(Image.Image, "save", lambda self, path, *a, **k: no_space(path))
    msg = eval_error(generate_argv(metadata, tmp_path / "gen"))
    assert msg.endswith(f"0000.png: {os.strerror(errno.ENOSPC)}") and nothing_at(tmp_path / "gen")


@pytest.mark.parametrize("command", ["generate", "score"])
def test_a_read_only_out_is_refused_before_the_model_loads(
    tmp_path, generated, metadata, command, monkeypatch
):
    """A folder the user cannot write to (os.access says so; root writes anywhere, so the test
    says it for it) is one line before any model loads."""
    run = copy(generated, tmp_path / "run")
    monkeypatch.setattr(E, "load_umm", lambda *a: pytest.fail("loaded the model"))
    monkeypatch.setattr(E, "make_scorer", lambda *a: pytest.fail("loaded the scorer"))
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    if command == "generate":
        argv = generate_argv(metadata, tmp_path / "ro" / "gen")
    else:
        argv = ["score", str(run), "--scorer", "shapes", "--out", str(tmp_path / "ro")]
    assert "is not writable" in eval_error(argv)
