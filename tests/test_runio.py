"""The run folder's guarantees (tools/runio.py, driven through gvu.main on the tiny random model,
CPU only): kills at any moment, resumes, damaged files, a second process, bad flags and files. Each
test names the guarantee it checks; the reference is an uninterrupted run, a hand-made file, or
torch / fcntl called directly."""

import contextlib
import dataclasses
import fcntl
import io
import json
import os
import random
import shutil
import signal
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

import gvu
from standins import SHIPPED, TINY_PROMPTS, log_rows, run_main, write, write_lines
from tools import runio

pytestmark = pytest.mark.usefixtures("one_thread")  # and fork is safe


def common(pf, out, *extra):
    return [
        "--model",
        "tiny-random",
        "--prompts",
        pf,
        "--out",
        str(out),
        "--batch-prompts",
        "1",
        "--group-size",
        "2",
        "--sample-every",
        "100",
        "--save-every",
        "1",
        *extra,
    ]


def saved(out):
    """Everything a run leaves that must be reproducible: log, adapter tensors + gvu.json, state."""
    with open(os.path.join(out, "adapter", "gvu.json")) as f:
        info = json.load(f)
    return dict(
        log=log_rows(out, "seconds"),
        adapter=load_file(os.path.join(out, "adapter", "adapter_model.safetensors")),
        info=info,
        state=torch.load(os.path.join(out, "state.pt"), weights_only=True),
    )


def assert_same(a, b):
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def nonfinite(obj):
    """Names of the floating tensors in obj holding a NaN or inf (checked with torch directly)."""
    if isinstance(obj, dict):
        return [f"{k}.{n}" for k, v in obj.items() for n in nonfinite(v)]
    return (
        ["*"]
        if torch.is_tensor(obj) and obj.is_floating_point() and not torch.isfinite(obj).all()
        else []
    )


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    return str(write_lines(tmp_path_factory.mktemp("p") / "p.txt", TINY_PROMPTS[:3]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prompt_file):
    """An uninterrupted 4-step run, saved after every step."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert run_main(*common(prompt_file, out, "--steps", "4")) is None
    return out


def short_run(pf, tmp_path, steps):
    """A fresh run of `steps` steps in tmp_path/run (saved after each)."""
    out = tmp_path / "run"
    assert run_main(*common(pf, out, "--steps", str(steps))) is None
    return out


# --- kills at any moment (defects 2, 5) --------------------------------------------------------
# every save's steps
OPS = [(os, "replace"), (os, "rename"), (shutil, "rmtree"), (torch, "save"), (json, "dumps")]
OPS += [(runio, "exchange")]  # the adapter's swap (Linux: one atomic exchange)


def run_killed(argv, op, k, side, delay, record):
    """Fork a child running gvu.main(argv) that SIGKILLs itself just `side` ("before" / "after") its
    k-th call of file operation `op` (one of OPS: inside every save, rename and log write) or after
    `delay` seconds, whichever comes first, noting where in `record`. Returns the child's wait
    status."""
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    try:  # the child: never returns into pytest
        sys.stdout = sys.stderr = open(os.devnull, "w")
        calls = [0]

        def kill(where):
            with open(record, "a") as f:
                f.write(where + "\n")
            os.kill(os.getpid(), signal.SIGKILL)

        def tripwire(fn):
            def wrapped(*a, **kw):
                calls[0] += 1
                if calls[0] == k and side == "before":
                    kill(f"before {op} #{k}")
                result = fn(*a, **kw)
                if calls[0] == k and side == "after":
                    kill(f"after {op} #{k}")
                return result

            return wrapped

        mod = dict((n, m) for m, n in OPS)[op]
        setattr(mod, op, tripwire(getattr(mod, op)))
        threading.Timer(delay, kill, (f"timer {delay:.1f}s",)).start()
        gvu.main(argv)
        os._exit(0)
    except SystemExit as e:
        os._exit(3 if e.code else 0)
    except BaseException:
        os._exit(4)


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(
    tmp_path, prompt_file, reference
):
    """Killed with SIGKILL before and after each kind of file operation (inside saves, renames, log
    writes; at a random occurrence) and at random times, with a random --save-every, and resumed
    each time: the run ends with the log, adapter and state of the uninterrupted run, bit for
    bit."""
    out, rng, record = tmp_path / "run", random.Random(0), tmp_path / "kills.txt"
    # each op's first call, timer late
    plan = [(op, side, 1, 9) for _, op in OPS for side in ("before", "after")]
    rng.shuffle(plan)
    # then any call, or a random time
    plan += [
        (
            rng.choice(OPS)[1],
            rng.choice(["before", "after"]),
            rng.randint(1, 3),
            rng.uniform(0.5, 4),
        )
        for _ in range(5)
    ]
    todo, retried, attempt = plan + [("save", "never", 0, 600)], set(), -1
    while todo:
        (op, side, k, delay), attempt = todo.pop(0), attempt + 1
        argv = common(
            prompt_file,
            out,
            "--steps",
            "4",
            "--save-every",
            str(rng.choice([1, 2, 3])),
            *(["--resume"] if os.path.exists(out / "config.json") else []),
        )
        status = run_killed(argv, op, k, side, delay, record)
        if not os.WIFSIGNALED(status):
            assert os.WEXITSTATUS(status) == 0, (
                f"attempt {attempt} failed (exit {os.WEXITSTATUS(status)})"
            )
            if side == "never":
                break
            # finished before its kill (a resumed run renames no folder): start over, and try
            # this kill once more on the fresh run, so that every planned kill is tried
            shutil.rmtree(out)
            if (op, side, k) not in retried:
                retried.add((op, side, k))
                todo.insert(0, (op, side, k, delay))
            continue
        assert os.WTERMSIG(status) == signal.SIGKILL
    kills = record.read_text().splitlines()
    assert {" ".join(k.split()[:2]) for k in kills} >= {
        f"{side} {op}" for _, op in OPS for side in ("before", "after")
    }, kills
    assert_same(saved(reference), saved(out))
    # no half-swapped adapter left
    assert not [p for p in os.listdir(out) if p.startswith("adapter.")]


def killed_inside_a_state_save(argv, nth, keep):
    """Fork a child running gvu.main(argv) that is SIGKILLed half-way through its nth torch.save of
    state.pt: half of the new state's bytes are written where torch.save was told to write them,
    then the kill. Just before, the child copies state.pt (the previous save) to `keep`. Returns
    the child's wait status."""
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    try:  # the child: never returns into pytest
        sys.stdout = sys.stderr = open(os.devnull, "w")
        real, saves = torch.save, []

        def half_then_kill(obj, f, *a, **kw):
            name = str(getattr(f, "name", f))
            if os.path.basename(name).startswith("state.pt"):
                saves.append(name)
                if len(saves) == nth:
                    shutil.copyfile(os.path.join(os.path.dirname(name), "state.pt"), keep)
                    data = io.BytesIO()
                    real(obj, data)
                    half = data.getvalue()[: len(data.getvalue()) // 2]
                    if hasattr(f, "write"):
                        f.write(half)
                        f.flush()
                    else:
                        with open(f, "wb") as g:
                            g.write(half)
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, f, *a, **kw)

        torch.save = half_then_kill
        gvu.main(argv)
        os._exit(0)
    except SystemExit as e:
        os._exit(3 if e.code else 0)
    except BaseException:
        os._exit(4)


def test_a_kill_inside_the_save_of_state_pt_keeps_the_previous_state_resumable(
    tmp_path, prompt_file, reference
):
    """SIGKILL half-way through writing the second state.pt (two steps done) leaves the first one
    (one step done) byte for byte, and --resume from it ends with the uninterrupted run's log,
    adapter and state, bit for bit."""
    out, before = tmp_path / "run", tmp_path / "state_before_the_kill.pt"
    status = killed_inside_a_state_save(common(prompt_file, out, "--steps", "4"), 2, before)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert (out / "state.pt").read_bytes() == before.read_bytes()
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 1
    assert run_main(*common(prompt_file, out, "--steps", "4", "--resume")) is None
    assert_same(saved(reference), saved(out))


def test_resume_rewrites_an_adapter_older_than_the_state(tmp_path, prompt_file):
    """A kill between writing state.pt and swapping in adapter/ (stale or missing adapter): --resume
    writes the adapter again from the state, so both hold the same step and weights."""
    out = short_run(prompt_file, tmp_path, 1)
    old = tmp_path / "adapter_step1"
    shutil.copytree(out / "adapter", old)
    assert run_main(*common(prompt_file, out, "--steps", "2", "--resume")) is None
    shutil.rmtree(out / "adapter")
    # as if killed after state.pt (step 2) but before the adapter swap
    shutil.copytree(old, out / "adapter")
    assert run_main(*common(prompt_file, out, "--steps", "2", "--resume")) is None
    state = torch.load(out / "state.pt", weights_only=True)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert json.loads((out / "adapter" / "gvu.json").read_text())["step"] == state["step"] == 2
    assert {k.replace(".default", ""): v for k, v in adapter.items()}.keys() == state["lora"].keys()
    assert all(torch.equal(adapter[k], v) for k, v in state["lora"].items())
    shutil.rmtree(out / "adapter")  # killed between the two renames: no adapter/ at all
    assert run_main(*common(prompt_file, out, "--steps", "2", "--resume")) is None
    assert all(
        torch.equal(load_file(out / "adapter" / "adapter_model.safetensors")[k], v)
        for k, v in state["lora"].items()
    )


# --- 1. non-finite updates --------------------------------------------------------------------
def test_non_finite_gradient_is_not_applied_and_nothing_non_finite_is_saved(tmp_path, prompt_file):
    """The issue's --lr 1e6 run (B=2, G=2) has a NaN gradient at step 1: one-line error naming the
    intact saved step, and state.pt and adapter/ hold step 1's finite weights. --resume stops the
    same way (not in sampling). The issue ran on the v1 world's prompts/train.txt; its steps 0-1
    drew these four lines, kept here in the order that puts them in the same batches (the v2
    train.txt draws other lines, on which step 1 happens to stay finite)."""
    issue_prompts = write(
        tmp_path / "issue.txt",
        "\n".join(
            [
                "a photo of one circle on the right and two squares on the left",
                "a photo of a smaller triangle on the left and a larger circle on the right",
                "a photo of a smaller triangle on the left and a larger square on the right",
                "a photo of a small green circle",
            ]
        )
        + "\n",
    )
    assert [gvu.prompt_batch(open(issue_prompts).read().splitlines(), s, 2, 0) for s in (0, 1)] == [
        [
            "a photo of one circle on the right and two squares on the left",
            "a photo of a smaller triangle on the left and a larger circle on the right",
        ],
        [
            "a photo of a small green circle",
            "a photo of a smaller triangle on the left and a larger square on the right",
        ],
    ]
    out, flags = tmp_path / "run", ["--steps", "4", "--lr", "1e6", "--batch-prompts", "2"]
    msg = run_main(*common(issue_prompts, out, *flags))
    assert (
        msg == f"error: non-finite gradient norm at step 1; its update was not applied; "
        f"the saved state in {out} (step 1) is intact"
    )
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 1 and nonfinite(state) == []
    assert nonfinite(load_file(out / "adapter" / "adapter_model.safetensors")) == []
    assert run_main(*common(issue_prompts, out, *flags, "--resume")) == msg


def test_non_finite_loss_is_not_applied(tmp_path, prompt_file, monkeypatch):
    """A NaN loss stops the run before backward/step: the saved state is unchanged, byte for
    byte."""
    out = short_run(prompt_file, tmp_path, 1)
    before = (out / "state.pt").read_bytes()
    real = gvu.grpo_loss
    monkeypatch.setattr(gvu, "grpo_loss", lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    msg = run_main(*common(prompt_file, out, "--steps", "2", "--resume"))
    assert msg.startswith("error: non-finite loss at step 1") and msg.endswith("(step 1) is intact")
    assert (out / "state.pt").read_bytes() == before


def test_non_finite_weights_are_never_saved(tmp_path, prompt_file, monkeypatch):
    """An update that leaves an inf in the LoRA weights (finite loss and gradient) is caught before
    the save: state.pt keeps the previous step."""
    out = short_run(prompt_file, tmp_path, 1)
    real_step = torch.optim.AdamW.step

    def poisoned(self, *a, **k):
        real_step(self, *a, **k)
        self.param_groups[0]["params"][0].data[0, 0] = float("inf")

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    msg = run_main(*common(prompt_file, out, "--steps", "2", "--resume"))
    assert (
        msg == f"error: the weights are not finite after step 1; nothing was saved from it; "
        f"the saved state in {out} (step 1) is intact"
    )
    assert nonfinite(torch.load(out / "state.pt", weights_only=True)) == []


def test_full_disk_during_a_save_is_one_line_and_keeps_the_saved_state(
    tmp_path, prompt_file, monkeypatch
):
    """ENOSPC while writing state.pt: one line naming the intact saved step; state.pt unchanged byte
    for byte."""
    out = short_run(prompt_file, tmp_path, 1)
    before = (out / "state.pt").read_bytes()

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runio.torch, "save", full)
    msg = run_main(*common(prompt_file, out, "--steps", "2", "--resume"))
    assert (
        msg
        == f"error: [Errno 28] No space left on device; the saved state in {out} (step 1) is intact"
    )
    assert (out / "state.pt").read_bytes() == before


# --- 2. the log on resume ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage, notice",
    [
        (
            lambda log: log.write_text(log.read_text() + '{"step": 2, "reward_me'),
            "dropped a last line cut by a kill",
        ),
        (lambda log: log.write_text(log.read_text().replace("\n", "\n\n", 1)), None),
        (lambda log: log.unlink(), "is missing"),
    ],
)
def test_resume_survives_a_torn_blank_or_missing_log(
    tmp_path, prompt_file, reference, capsys, damage, notice
):
    """A last line cut mid-JSON is dropped with a one-line notice, blank lines are skipped, a
    missing log restarts at the saved step; the steps after it equal the uninterrupted run's."""
    out = short_run(prompt_file, tmp_path, 2)
    # step 2 logged after the last save (step 2), then killed
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "reward_mean": -1}) + "\n")
    damage(out / "log.jsonl")
    capsys.readouterr()
    assert run_main(*common(prompt_file, out, "--steps", "4", "--resume")) is None
    err = capsys.readouterr().err
    assert (
        (notice is None and "notice" not in err)
        or f"notice: {out / 'log.jsonl'}" in err
        and notice in err
    )
    want = log_rows(reference, "seconds")
    assert log_rows(out, "seconds") == (want[2:] if notice == "is missing" else want)


def test_resume_refuses_a_log_damaged_in_the_middle(tmp_path, prompt_file):
    """A broken line that is not the last one cannot come from a kill: one-line error, log
    untouched."""
    out = short_run(prompt_file, tmp_path, 2)
    log = out / "log.jsonl"
    log.write_text("{oops\n" + log.read_text())
    before = log.read_bytes()
    msg = run_main(*common(prompt_file, out, "--steps", "3", "--resume"))
    assert msg.startswith(f"error: {log} line 1 is not JSON") and "\n" not in msg
    assert log.read_bytes() == before


def test_log_rewrite_goes_through_a_temp_file(tmp_path, prompt_file, monkeypatch):
    """A kill in the middle of the resume's log rewrite (simulated: writing the second row fails)
    leaves the old log whole."""
    out = short_run(prompt_file, tmp_path, 2)
    # a step logged after the last save: the rewrite drops it
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "reward_mean": -1}) + "\n")
    before = (out / "log.jsonl").read_bytes()
    real = json.dumps

    def dies_on_row_1(obj, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 1:
            raise KeyboardInterrupt  # stands for the kill
        return real(obj, *a, **k)

    monkeypatch.setattr(runio.json, "dumps", dies_on_row_1)
    assert run_main(*common(prompt_file, out, "--steps", "3", "--resume")).startswith("interrupted")
    assert (out / "log.jsonl").read_bytes() == before and not (out / "log.jsonl.tmp").exists()


# --- 3. resume checks the run -----------------------------------------------------------------
def test_resume_refuses_changed_settings_naming_each_flag_and_keeps_config(tmp_path, prompt_file):
    """--resume with another --lr, --seed, --group-size and --batch-prompts: one line naming each,
    config.json unchanged; --steps / --save-every / --sample-every may change."""
    out = short_run(prompt_file, tmp_path, 1)
    config = (out / "config.json").read_bytes()
    argv = common(prompt_file, out, "--steps", "2", "--resume") + [
        "--lr",
        "1e-3",
        "--seed",
        "1",
        "--group-size",
        "3",
        "--batch-prompts",
        "2",
    ]
    msg = run_main(*argv)
    assert msg == (
        "error: --resume: --batch-prompts 2 (the run has 1), --group-size 3 (the run has 2), "
        "--lr 0.001 (the run has 0.0005), --seed 1 (the run has 0); pass the run's values, or "
        "start a new --out"
    )
    assert (out / "config.json").read_bytes() == config
    assert (
        run_main(
            *common(
                prompt_file,
                out,
                "--steps",
                "2",
                "--resume",
                "--save-every",
                "7",
                "--sample-every",
                "3",
            )
        )
        is None
    )
    assert (out / "config.json").read_bytes() == config


# Fields whose value cannot change validly on the tiny random model: the test skips them.
CANNOT_CHANGE_ON_TINY = {
    "decoder_text": "the tiny UMM's decoder reads no text: 'none' is its only value"
}


def another_value(name, old, tmp_path):
    """A valid value of Args field `name`, other than the run's `old`, on the tiny random model."""
    special = {
        "prompts": lambda: str(write_lines(tmp_path / "same_lines.txt", TINY_PROMPTS[:3])),
        "model": lambda: SHIPPED,  # the shipped tiny UMM
        "image_size": lambda: 64,  # the tiny UMM's one size, given instead of 0 (its default)
        "lora_targets": lambda: "q_proj",
        "device": lambda: "cpu",
        "flux": lambda: "black-forest-labs/FLUX.1-dev",  # read by X-Omni only
        "top_p": lambda: 0.5,  # in (0, 1]: its default 1 doubled is not
    }
    if name in special:
        return special[name]()
    field = {f.name: f for f in dataclasses.fields(gvu.Args)}[name]
    choices = field.metadata.get("choices")
    if choices:
        return next(c for c in choices if c != old)
    if isinstance(old, bool):
        return not old
    if isinstance(old, int):
        return old + 1
    if isinstance(old, float):
        return 2 * old if old else 0.5
    return f"{old} (changed)"


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory, prompt_file):
    """A finished 1-step run that tests try to resume with other settings (each try refused)."""
    out = tmp_path_factory.mktemp("one_step") / "run"
    assert run_main(*common(prompt_file, out, "--steps", "1")) is None
    return out


# every field of gvu.Args, read when the tests are collected, so that a new flag is covered
@pytest.mark.parametrize(
    "name", [f.name for f in dataclasses.fields(gvu.Args) if f.name not in gvu.RESUME_MAY_CHANGE]
)
def test_resume_refuses_a_change_to_every_setting_outside_the_allowed_list(
    name, one_step_run, prompt_file, tmp_path
):
    """--resume with any one setting outside gvu.RESUME_MAY_CHANGE changed to another valid value:
    one line naming its flag, and the run folder untouched."""
    if name in CANNOT_CHANGE_ON_TINY:
        pytest.skip(CANNOT_CHANGE_ON_TINY[name])
    out = one_step_run
    before = {p: (out / p).read_bytes() for p in ("config.json", "state.pt", "log.jsonl")}
    old = json.loads(before["config.json"])[name]
    new = another_value(name, old, tmp_path)
    flag = "--" + name.replace("_", "-")
    msg = run_main(*common(prompt_file, out, "--steps", "2", "--resume"), flag, new)
    assert isinstance(msg, str), f"--resume with {flag} {new} was not refused"
    assert "\n" not in msg, msg
    assert msg.startswith("error: ") and "--resume" in msg and f"{flag} " in msg, msg
    assert {p: (out / p).read_bytes() for p in before} == before


def test_resume_counts_a_flag_added_since_the_run_began_as_its_default(tmp_path, prompt_file):
    """A run whose config.json predates --lora-targets resumes with the default, and refuses another
    value in one line (not a traceback from the optimizer state of another set of LoRA layers)."""
    out = short_run(prompt_file, tmp_path, 1)
    config = json.loads((out / "config.json").read_text())
    del config["lora_targets"]
    (out / "config.json").write_text(json.dumps(config))
    msg = run_main(
        *common(prompt_file, out, "--steps", "2", "--resume", "--lora-targets", "q_proj")
    )
    assert (
        msg
        == "error: --resume: --lora-targets q_proj (the run has ); pass the run's values, or start "
        "a new --out"
    )
    assert run_main(*common(prompt_file, out, "--steps", "2", "--resume")) is None


def test_resume_refuses_another_model(tmp_path, prompt_file):
    """--model differs: refused before anything is loaded or written."""
    out = short_run(prompt_file, tmp_path, 1)
    msg = run_main(
        *common(prompt_file, out, "--steps", "2", "--resume") + ["--model", "checkpoints/tiny-umm"]
    )
    assert msg.startswith("error: --resume: --model checkpoints/tiny-umm (the run has tiny-random)")


# --- 4. one run per folder --------------------------------------------------------------------
def test_a_second_process_on_the_same_out_is_refused(tmp_path, prompt_file):
    """While another process holds OUT/.lock (flock), a run there is a one-line error and writes
    nothing."""
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        msg = run_main(*common(prompt_file, out, "--steps", "1"))
    assert (
        msg.startswith(f"error: --out {out} is in use by another gvu.py process")
        and "\n" not in msg
    )
    assert sorted(os.listdir(out)) == [".lock", "samples"]
    # the lock dies with its holder
    assert run_main(*common(prompt_file, out, "--steps", "1")) is None


# --- 8, 9. bad or nonsense flags: one line, before anything is created ----------------------------
BAD_FLAGS = [
    (["--lr", "-1"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--batch-prompts", "0"], "--batch-prompts must be >= 1"),
    (["--save-every", "0"], "--save-every must be >= 1"),
    (["--sample-every", "0"], "--sample-every must be >= 1"),
    (["--micro-batch", "0"], "--micro-batch must be >= 1"),
    (["--num-iterations", "0"], "--num-iterations must be >= 1"),
    (["--min-p", "2"], "--min-p must be in [0, 1)"),
    (["--lora-r", "0"], "--lora-r must be >= 1"),
    (["--lora-alpha", "0"], "--lora-alpha must be >= 1"),
    (["--temperature", "0"], "--temperature must be in [0.1, 100]"),
    (["--temperature", "1e-9"], "--temperature must be in [0.1, 100]"),
    (["--temperature", "-1"], "--temperature must be in [0.1, 100]"),
    (["--temperature", "1e30"], "--temperature must be in [0.1, 100]"),
    (["--cfg-scale", "1e30"], "--cfg-scale must be in [1, 100]"),
    (["--out", ""], "--out must be a folder name"),
    (["--clip-eps", "-0.2"], "--clip-eps must be in (0, 1)"),
    (["--beta", "-1"], "--beta must be >= 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0"),
    (["--cfg-scale", "-2"], "--cfg-scale must be in [1, 100]"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--top-k", "65"], "--top-k must be <= the model's 64 image codes"),
    (["--device", "nonsense"], "--device nonsense: not a device"),
    (["--device", "cuda:7"], "no such device"),
    (["--resume"], "--resume: no run in"),
    (
        ["--lora-targets", "q_proj,qkv"],
        "--lora-targets: the model has no LoRA layer named qkv (its layers: down_proj",
    ),
    (["--lr", "-1", "--steps", "0"], "--steps must be >= 1 (got 0); --lr must be > 0 (got -1.0)"),
]


@pytest.mark.parametrize("flags, expect", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_before_anything_is_created(tmp_path, prompt_file, flags, expect):
    """Each out-of-range or unusable flag: one line naming it, non-zero exit, and --out never
    created."""
    out = tmp_path / "run"
    msg = run_main(*common(prompt_file, out, "--steps", "1", *flags))
    assert isinstance(msg, str) and msg.startswith("error: ") and expect in msg and "\n" not in msg
    assert not out.exists()


def test_cuda_without_cuda_is_one_line(tmp_path, prompt_file):
    """--device cuda on a machine without CUDA: one line, nothing created."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    msg = run_main(*common(prompt_file, tmp_path / "run", "--device", "cuda"))
    assert (
        msg == "error: --device cuda: this machine has no such device"
        and not (tmp_path / "run").exists()
    )


@pytest.mark.parametrize(
    "case",
    [
        "out is a file",
        "out under a file",
        "out not writable",
        "prompt of 10k words",
        "prompts is a directory",
        "empty state.pt",
        "truncated state.pt",
    ],
)
def test_bad_path_or_file_is_one_line(tmp_path, prompt_file, case):
    """Unusable --out, an over-long prompt (names its line), a directory as --prompts, a damaged
    state.pt."""
    out, pf = tmp_path / "run", prompt_file
    if case == "out is a file":
        out.write_text("x")
        expect = f"--out {out} is a file, not a folder"
    elif case == "out under a file":
        (tmp_path / "f").write_text("x")
        out, expect = tmp_path / "f" / "run", "is a file, not a folder"
    # /proc refuses new folders even to root (os.access cannot tell root that)
    elif case == "out not writable":
        out, expect = "/proc/gvu-run", "/proc"
    elif case == "prompt of 10k words":
        pf = write(tmp_path / "long.txt", "a red circle\n\n" + "circle " * 10_000 + "\n")
        expect = "line 3 of"  # blank lines count: the number is the file's line
    elif case == "prompts is a directory":
        pf, expect = str(tmp_path), "prompt file is a directory"
    else:
        out = short_run(prompt_file, tmp_path, 1)
        data = (out / "state.pt").read_bytes()
        (out / "state.pt").write_bytes(b"" if case == "empty state.pt" else data[: len(data) // 2])
        expect = f"cannot read {out / 'state.pt'}"
    msg = run_main(*common(pf, out, "--steps", "2", *(["--resume"] if "state" in case else [])))
    assert isinstance(msg, str) and msg.startswith("error: ") and expect in msg and "\n" not in msg
    if "state" not in case:
        assert not os.path.isdir(out)


# --- 10. messages ------------------------------------------------------------------------------
def test_non_utf8_error_gives_the_true_byte_offset_past_8kb(tmp_path):
    """A bad byte at offset 10 000 (beyond any read buffer) is reported at 10 000."""
    path = write(tmp_path / "p.txt", b"a red circle\n" * 769 + b"abc\xff\n")  # 13 * 769 = 9997, + 3
    with pytest.raises(runio.InputError, match=r"\(byte 10000\)"):
        runio.read_prompts(path)


def test_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    """A file saved with a UTF-8 BOM reads as the same prompts, the same line numbers."""
    path = write(tmp_path / "p.txt", "\ufeffa red circle\n\ntwo squares\r\n".encode())
    assert runio.read_prompts(path) == (["a red circle", "two squares"], [1, 3])


# --- nothing silent: changed data, a longer run, the adapter swap, one-line failures ------------
def test_resume_refuses_a_prompt_file_edited_in_place_and_accepts_it_under_another_path(
    tmp_path, prompt_file
):
    """config.json records the prompt file's content: the same file under another path (a copy,
    ./ in front) resumes; the same path with its lines reversed is refused in one line."""
    pf = write_lines(tmp_path / "p.txt", TINY_PROMPTS[:3])
    out = short_run(str(pf), tmp_path, 1)
    moved = write_lines(tmp_path / "moved.txt", TINY_PROMPTS[:3])
    assert run_main(*common(str(moved), out, "--steps", "2", "--resume")) is None
    write_lines(pf, TINY_PROMPTS[:3][::-1])
    msg = run_main(*common(str(pf), out, "--steps", "3", "--resume"))
    assert msg == (
        "error: --resume: the prompts has changed since the run started; "
        "pass the run's values, or start a new --out"
    )


def test_resume_refuses_a_config_file_edited_in_place(tmp_path, prompt_file):
    """A run started from a config file records its content; the same file edited (a value that
    --resume may change, so only the fingerprint can tell) is refused on --resume."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": "tiny-random", "save_every": 1}))
    out = tmp_path / "run"
    flags = ["--prompts", prompt_file, "--out", out, "--batch-prompts", 1, "--group-size", 2]
    assert run_main(config, *flags, "--steps", 1) is None
    config.write_text(json.dumps({"model": "tiny-random", "save_every": 2}))
    msg = run_main(config, *flags, "--steps", 2, "--resume")
    assert msg.startswith("error: --resume: the config file has changed since the run started")


def test_a_longer_steps_on_resume_follows_an_uninterrupted_run_of_that_length(
    tmp_path, prompt_file
):
    """A 3-step linear-decay run resumed with --steps 6 trains steps 3-5 at the lr of an
    uninterrupted 6-step run (not at 0, then a jump)."""
    flags = ["--lr-schedule", "linear", "--lr", "1e-3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_main(*common(prompt_file, full, "--steps", 6, *flags)) is None
    assert run_main(*common(prompt_file, cut, "--steps", 3, *flags)) is None
    assert run_main(*common(prompt_file, cut, "--steps", 6, "--resume", *flags)) is None
    want = [r["lr"] for r in log_rows(full)]
    assert want == pytest.approx([1e-3 * (6 - s) / 6 for s in range(6)], rel=1e-9)
    assert [r["lr"] for r in log_rows(cut)][3:] == want[3:]


@pytest.mark.parametrize("when", ["before the swap", "after the swap"])
def test_a_kill_at_the_adapter_swap_leaves_a_whole_adapter_in_its_folder(
    tmp_path, prompt_file, monkeypatch, when
):
    """Whatever moment a kill lands on, OUT/adapter holds a whole adapter after the first save:
    the old one if the kill comes before the swap, the new one after it (Linux: one atomic
    exchange of the two folders)."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    if not runio.exchange(str(tmp_path / "a"), str(tmp_path / "b")):
        pytest.skip("no atomic exchange of folders here (renameat2 on Linux)")
    out = short_run(prompt_file, tmp_path, 1)
    real, calls = runio.exchange, []

    def killed(a, b):  # the resume first writes step 1's adapter again, then step 2 saves
        calls.append(b)
        if len(calls) < 2:
            return real(a, b)
        if when == "after the swap":
            assert real(a, b)
        raise KeyboardInterrupt  # the kill

    monkeypatch.setattr(runio, "exchange", killed)
    msg = run_main(*common(prompt_file, out, "--steps", "2", "--resume"))
    assert msg.startswith("interrupted: the saved state in")
    info = json.loads((out / "adapter" / "gvu.json").read_text())
    assert info["step"] == (1 if when == "before the swap" else 2)
    assert load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "content, expect",
    [
        ("[1, 2]", "not a JSON object"),
        ("{", "config file"),
        ("", "config file"),
        ('{"stepz": 2}', "unknown keys stepz"),
        ('{"instruction": null}', "instruction must be a number, text or bool"),
        ('{"steps": 2.7}', "argument --steps: invalid int value: '2.7'"),
        ('{"lr": true}', "argument --lr: invalid float value: 'True'"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_key(tmp_path, prompt_file, content, expect):
    """Config-file errors are one line naming the problem (no argparse usage block), exit 2."""
    config = tmp_path / "c.json"
    config.write_text(content)
    err = io.StringIO()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(err):
        gvu.main([str(config), "--prompts", prompt_file, "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and expect in err.getvalue() and err.getvalue().count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_epochs_past_the_bound_is_one_line(tmp_path, prompt_file):
    """--epochs 1e30 (steps past any run) is refused in one line before anything is created."""
    out = tmp_path / "run"
    flags = ["--model", "tiny-random", "--prompts", prompt_file, "--out", out, "--epochs", "1e30"]
    assert run_main(*flags) == "error: --epochs must be in [0, 1000] (0 = --steps) (got 1e+30)"
    assert not out.exists()


def test_a_type_error_on_the_command_line_is_one_line(tmp_path, prompt_file):
    """--steps abc: argparse's one message, no usage block, exit 2."""
    err = io.StringIO()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(err):
        gvu.main(["--steps", "abc", "--prompts", prompt_file])
    assert e.value.code == 2 and err.getvalue().count("\n") == 1 and "--steps" in err.getvalue()


@pytest.mark.parametrize(
    "failure, expect",
    [
        (KeyboardInterrupt(), "interrupted: the saved state in {out} (step 1) is intact; continue"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory"), "error: out of memory"),
        (torch.OutOfMemoryError("CUDA out of memory"), "error: out of memory"),
    ],
)
def test_ctrl_c_and_out_of_memory_are_one_line_naming_the_saved_step(
    tmp_path, prompt_file, monkeypatch, failure, expect
):
    """Ctrl-C or running out of memory mid-run: one line saying what is saved, no traceback."""
    out = short_run(prompt_file, tmp_path, 1)

    def fail(*a, **k):
        raise failure

    monkeypatch.setattr(gvu, "gvu_step", fail)
    msg = run_main(*common(prompt_file, out, "--steps", "2", "--resume"))
    assert msg.startswith(expect.format(out=out)) and "\n" not in msg


def test_any_other_runtime_error_keeps_its_traceback(tmp_path, prompt_file, monkeypatch):
    """A RuntimeError that is not out of memory is a bug: it is raised, not hidden in a line."""

    def fail(*a, **k):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(gvu, "gvu_step", fail)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        gvu.main(common(prompt_file, tmp_path / "run", "--steps", "1"))


@pytest.mark.parametrize("where", ["state.pt", "adapter"])
def test_a_full_disk_inside_torch_or_safetensors_is_one_line_and_leaves_no_tmp(
    tmp_path, prompt_file, monkeypatch, where
):
    """torch.save and safetensors report a full disk as their own errors: one line naming the
    intact saved step, state.pt unchanged, no .tmp left behind."""
    from safetensors import SafetensorError

    out = short_run(prompt_file, tmp_path, 1)
    before = (out / "state.pt").read_bytes()
    if where == "state.pt":

        def full(obj, f, *a, **k):
            f.write(b"partial")
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

        monkeypatch.setattr(runio.torch, "save", full)
    else:

        def full(self, *a, **k):
            raise SafetensorError("Error while serializing: IoError(StorageFull)")

        import peft

        monkeypatch.setattr(peft.PeftModel, "save_pretrained", full)
    msg = run_main(*common(prompt_file, out, "--steps", "2", "--resume"))
    assert msg.startswith("error: cannot write") and msg.endswith("(step 1) is intact")
    assert "\n" not in msg and not any(p.name.endswith(".tmp") for p in out.iterdir())
    if where == "state.pt":
        assert (out / "state.pt").read_bytes() == before


def test_instruction_words_and_length_are_checked_and_named(tmp_path, prompt_file):
    """--instruction with a word the model cannot spell, or too long to leave room for any prompt:
    one line naming --instruction (not line 1 of the prompt file), nothing created."""
    out = tmp_path / "run"
    msg = run_main(*common(prompt_file, out, "--instruction", "Describe the zorblax."))
    assert msg.startswith("error: --instruction has words the model does not know: zorblax")
    long = " ".join(["circle"] * 5000)
    msg = run_main(*common(prompt_file, out, "--instruction", long))
    assert msg.startswith("error: --instruction is too long") and not out.exists()


def test_invisible_characters_are_escaped_in_messages(tmp_path):
    """A zero-width space or an escape character in an unknown word is shown escaped."""
    pf = write(tmp_path / "p.txt", "a red circle\nzero\u200bwidth \x1b[31mred\n")
    msg = run_main(*common(pf, tmp_path / "run"))
    assert "\\u200b" in msg and "\\x1b" in msg and "\u200b" not in msg and "\x1b" not in msg
