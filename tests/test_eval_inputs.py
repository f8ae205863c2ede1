"""eval_geneval.py's refusals, each one line and a non-zero exit before anything is written:
generate's flags (gvu.py's rules for the flags the two share), its checks on the loaded model,
adapter and metadata files, a full disk or a read-only --out; score's checks of the image folder,
and its three outputs swapped in as one unit; compare's pairing of runs and its input files."""

import errno
import json
import os
import re
import shutil
from pathlib import Path

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
OUTPUTS = ("results.jsonl", "summary.json", "summary.md")


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
    """A folder generate wrote: 2 prompts x 2 images of 64x64, and its generate.json."""
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


def test_score_on_a_full_disk_is_one_line_and_keeps_the_previous_outputs(
    tmp_path, generated, monkeypatch
):
    """Outputs that cannot be written: one line; the previous score's files are as they were and
    nothing new is left in the folder."""
    run = copy(generated, tmp_path / "run")
    E.main(["score", str(run), "--scorer", "shapes"])
    before = snapshot(run)
    monkeypatch.setattr(Path, "write_bytes", no_space)
    assert eval_error(["score", str(run), "--scorer", "shapes"]).endswith(os.strerror(errno.ENOSPC))
    assert snapshot(run) == before


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


# --- score: the folder it reads -------------------------------------------------------------------
def snapshot(folder):
    """Every file under a folder (links as their targets) and its bytes."""
    return {
        str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else p.read_bytes()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_symlink() or p.is_file()
    }


def save_image(size, mode="RGB"):
    return lambda run: Image.new(mode, size).save(run / "00001" / "samples" / "0000.png")


FOLDER_DAMAGE = {
    "a deleted image": (lambda r: (r / "00001/samples/0001.png").unlink(), "0001.png is missing"),
    "an extra image": (
        lambda r: shutil.copy(r / "00001/samples/0000.png", r / "00001/samples/0002.png"),
        "0002.png is extra",
    ),
    "an extra file": (lambda r: (r / "00001/samples/notes.txt").write_text("hi"), "notes.txt is"),
    "an extra prompt folder": (lambda r: copy(r / "00001", r / "00002"), "00002 is extra"),
    "a missing prompt folder": (lambda r: shutil.rmtree(r / "00001"), "00001 is missing"),
    "a 1x1 image": (save_image((1, 1)), "is 1x1 pixels, not 64x64"),
    "a 3000x3000 image": (save_image((3000, 3000)), "is 3000x3000 pixels, not 64x64"),
    "a grayscale image": (save_image((64, 64), "L"), "is a L image"),
    "an RGBA image": (save_image((64, 64), "RGBA"), "is a RGBA image"),
    "a truncated image": (lambda r: truncate(r / "00001/samples/0000.png"), "cannot read image"),
}


@pytest.mark.parametrize("layout", ["generate's", "GenEval's"])
@pytest.mark.parametrize("case", FOLDER_DAMAGE)
def test_score_refuses_a_damaged_folder_before_loading_and_writes_nothing(
    tmp_path, generated, metadata, case, layout, monkeypatch
):
    """Missing or extra prompt folders, images or files, an image that is not RGB, not the size
    generate wrote or not the size of the first image: one line before any model loads, and the
    folder (the last score's outputs included) is left byte for byte, with no temporary file. In
    generate's layout its generate.json says what to expect; in GenEval's (none), --metadata and
    the first prompt folder do."""
    run = copy(generated, tmp_path / "run")
    argv = ["score", str(run), "--scorer", "shapes"]
    if layout == "GenEval's":
        (run / "generate.json").unlink(missing_ok=True)
        argv += ["--metadata", metadata]
    E.main(argv)
    damage, says = FOLDER_DAMAGE[case]
    damage(run)
    before = snapshot(run)
    monkeypatch.setattr(E, "make_scorer", lambda args: pytest.fail("loaded the scorer"))
    assert says in eval_error(argv) and snapshot(run) == before


def resize_all(run, size=(32, 32)):
    for path in run.glob("*/samples/*.png"):
        Image.open(path).convert("RGB").resize(size).save(path)


@pytest.mark.parametrize(
    "damage, says",
    [
        (resize_all, "is 32x32 pixels, not 64x64 (the size generate wrote)"),
        (lambda r: (r / "generate.json").write_text("{"), "cannot read"),
        (lambda r: (r / "generate.json").write_text('{"prompts": 2}'), "not generate's record"),
    ],
)
def test_score_reads_the_image_size_from_generate_json(tmp_path, generated, damage, says):
    """Images all of one size, but not the size generate wrote, are refused; so is a damaged
    generate.json."""
    run = copy(generated, tmp_path / "run")
    damage(run)
    assert says in eval_error(["score", str(run), "--scorer", "shapes"])


# --- score: its three outputs are one unit --------------------------------------------------------
class Killed(BaseException):
    """kill -9 at one write: nothing after it runs (not even an `except Exception`)."""


WRITES = [(os, "replace"), (os, "symlink"), (shutil, "rmtree")]
WRITES += [(Path, n) for n in ("write_bytes", "write_text", "mkdir", "unlink", "rename")]


def kill_at(monkeypatch, k):
    """Make the k-th file-system write (counting from 0) and every later one raise Killed, as if
    the process died there (no clean-up runs); returns the list of writes tried, for counting."""
    made = []
    for owner, name in WRITES:

        def write(*a, real=getattr(owner, name), name=name, **kw):
            made.append(name)
            if k >= 0 and len(made) > k:
                raise Killed
            return real(*a, **kw)

        monkeypatch.setattr(owner, name, write)
    return made


def score_as(run, verdict, monkeypatch):
    """score with a stand-in scorer that says `verdict` for every image."""
    monkeypatch.setattr(E, "make_scorer", lambda args: lambda image, meta: (verdict, "stand-in"))
    E.main(["score", str(run), "--scorer", "shapes"])


def outputs(run):
    return tuple((run / n).read_bytes() if (run / n).exists() else None for n in OUTPUTS)


def make_plain(run):
    """score's outputs as plain files, as an older eval_geneval.py wrote them."""
    for name in OUTPUTS:
        data = (run / name).read_bytes()
        (run / name).unlink()
        (run / name).write_bytes(data)
    for extra in run.glob(".score*"):
        extra.unlink() if extra.is_symlink() else shutil.rmtree(extra)


@pytest.mark.parametrize("start", ["a score's outputs", "an older score's plain files"])
def test_a_score_killed_at_any_write_leaves_the_old_or_the_new_outputs(
    tmp_path, generated, monkeypatch, start
):
    """Killed at each of its file-system writes in turn, score leaves the three files of the score
    before it or its own three, never a mix; the next score then writes its own and leaves no
    temporary file."""
    old_run = copy(generated, tmp_path / "old")
    score_as(old_run, False, monkeypatch)
    if start != "a score's outputs":
        make_plain(old_run)
    old = outputs(old_run)
    copy(old_run, tmp_path / "new")
    with monkeypatch.context() as m:
        writes = kill_at(m, -1)
        score_as(tmp_path / "new", True, m)
    new = outputs(tmp_path / "new")
    assert all(a != b for a, b in zip(old, new)) and len(writes) >= 3
    for k in range(len(writes)):
        run = copy(old_run, tmp_path / f"killed{k}")
        with monkeypatch.context() as m:
            kill_at(m, k)
            with pytest.raises(Killed):
                score_as(run, True, m)
        assert outputs(run) in (old, new), f"killed at write {k} ({writes[k]})"
        score_as(run, True, monkeypatch)
        assert outputs(run) == new and names(run) == names(tmp_path / "new")


def names(folder):
    """What a folder holds, score's output folder .score-<id> as one name whatever its id."""
    return sorted(re.sub(r"^\.score-\w+$", ".score-<id>", n) for n in os.listdir(folder))


def test_generate_overwrite_clears_a_scored_folder(tmp_path, generated, metadata):
    """--overwrite replaces a folder score has written into (its links and .score folder are
    generate/score output), and the new folder has no scores."""
    run = copy(generated, tmp_path / "run")
    E.main(["score", str(run), "--scorer", "shapes"])
    E.main(generate_argv(metadata, run, "--overwrite"))
    assert names(run) == ["00000", "00001", "generate.json", "sampler.json"]


# --- compare: paired runs only --------------------------------------------------------------------
def results(folder, prompts):
    """A score output folder: prompts = [(index, tag, prompt, [correct per image])]."""
    rows = [
        dict(index=i, sample=f"{k:04d}", tag=t, prompt=p, correct=c, reason="")
        for i, t, p, cs in prompts
        for k, c in enumerate(cs)
    ]
    folder.mkdir(parents=True)
    write_lines(folder / "results.jsonl", rows)
    return str(folder)


BASE = [(0, "colors", "a red car", [True, False]), (1, "counting", "two cars", [False, False])]
UNPAIRED = {
    "another text, same tag": (
        [BASE[0], (1, "counting", "three cars", [True, True])],
        "prompt 1: 'two cars' (counting, 2 images) in BASE, "
        "'three cars' (counting, 2 images) in RUN",
    ),
    "another tag, same text": (
        [BASE[0], (1, "colors", "two cars", [True, True])],
        "prompt 1: 'two cars' (counting, 2 images) in BASE, 'two cars' (colors, 2 images) in RUN",
    ),
    "fewer prompts (a tag dropped)": (
        [BASE[1]],
        "prompt 0: 'a red car' (colors, 2 images) in BASE, missing in RUN",
    ),
    "no prompt index in common": (
        [(2, "colors", "a red car", [True, True]), (3, "counting", "two cars", [True, True])],
        "prompt 0: 'a red car' (colors, 2 images) in BASE, missing in RUN",
    ),
    "fewer images": (
        [BASE[0], (1, "counting", "two cars", [True])],
        "prompt 1: 'two cars' (counting, 2 images) in BASE, 'two cars' (counting, 1 images) in RUN",
    ),
}


@pytest.mark.parametrize("case", UNPAIRED)
@pytest.mark.parametrize("position", [1, 2])
def test_compare_refuses_runs_that_are_not_paired(tmp_path, case, position, capsys):
    """Runs must hold the base's prompts (index, text, tag) with as many images each, or compare
    names the first difference in one line and prints no table (and so no nan); as the first run
    or a later one."""
    base = results(tmp_path / "base", BASE)
    run, says = UNPAIRED[case]
    runs = [results(tmp_path / "same", BASE)] * (position - 1) + [results(tmp_path / "run", run)]
    msg = eval_error(["compare", base, *runs])
    assert msg == "error: compare: the runs are not paired: " + says.replace("BASE", base).replace(
        "RUN", runs[-1]
    )
    assert capsys.readouterr().out == ""


def test_compare_refuses_summaries_without_the_same_tags_and_images(tmp_path):
    """Without results.jsonl, two summaries must hold the same tags with as many images: a tag
    missing from one is an error, not a row of dashes."""
    summary = lambda tags: dict(tags=tags, overall=0.5, prompts_any_correct=0.5)  # noqa: E731
    a = write(tmp_path / "a.json", json.dumps(summary({"colors": dict(images=4, accuracy=0.5)})))
    b = write(tmp_path / "b.json", json.dumps(summary({})))
    c = write(tmp_path / "c.json", json.dumps(summary({"colors": dict(images=2, accuracy=0.5)})))
    assert eval_error(["compare", a, b]).endswith(f"tag colors: 4 images in {a}, missing in {b}")
    assert eval_error(["compare", a, c]).endswith(f"tag colors: 4 images in {a}, 2 images in {c}")


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "has no rows"),
        ("{\n", "line 1 is not JSON"),
        (json.dumps(dict(index=0, tag="colors", correct=True)) + "\n", "is not a score row"),
        (json.dumps(dict(index=0, tag="colors", prompt="p", correct="yes")), "is not a score row"),
    ],
)
def test_compare_refuses_a_bad_results_file_in_one_line(tmp_path, text, says):
    """An empty results.jsonl, a line that is not JSON or not a row score writes: one line naming
    the file."""
    base = results(tmp_path / "base", BASE)
    (tmp_path / "run").mkdir()
    write(tmp_path / "run" / "results.jsonl", text)
    assert says in eval_error(["compare", base, str(tmp_path / "run")])


@pytest.mark.parametrize(
    "text, says",
    [
        ("{", "cannot read"),
        ("[]", "not score's summary"),
        ('{"tags": {}}', "not score's summary"),
        (
            '{"tags": {"colors": {"images": 2, "accuracy": NaN}}, "overall": 0, '
            '"prompts_any_correct": 0}',
            "not score's summary",
        ),
    ],
)
def test_compare_refuses_a_bad_summary_in_one_line(tmp_path, text, says):
    """A summary.json that is not JSON, or not a summary score writes (tags, finite accuracies,
    overall): one line naming it."""
    good = dict(tags={"colors": dict(images=2, accuracy=0.5)}, overall=0.5, prompts_any_correct=1)
    a = write(tmp_path / "a.json", json.dumps(good))
    b = write(tmp_path / "b.json", text)
    assert says in eval_error(["compare", a, b]) and b in eval_error(["compare", a, b])


@pytest.mark.parametrize("flags", [["--bootstrap", 0], ["--bootstrap", -1], ["--seed", -1]])
def test_compare_refuses_a_bad_bootstrap_setting(tmp_path, flags):
    """--bootstrap < 1 and a negative --seed: one line naming the flag."""
    base = results(tmp_path / "base", BASE)
    msg = eval_error(["compare", base, base, *map(str, flags)])
    assert msg.startswith(f"error: {flags[0]} must be >= ")


def test_compare_leaves_out_images_the_judge_gave_up_on(tmp_path, capsys):
    """Rows with correct = -1 (a VLM judge gave up) count as neither right nor wrong, as in
    summarize; a prompt with no judged image in some run is left out of every run, and named."""
    base = results(
        tmp_path / "base", [(0, "colors", "a", [False, -1]), (1, "colors", "b", [-1, -1])]
    )
    run = results(
        tmp_path / "run", [(0, "colors", "a", [True, True]), (1, "colors", "b", [True, True])]
    )
    E.main(["compare", base, run, "--bootstrap", "10"])
    out = capsys.readouterr()
    assert "| colors | 1 | 0.0000 | 1.0000 ± 0.0000 | +1.0000 |" in out.out
    assert "left out prompts [1]" in out.err
