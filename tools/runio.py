"""
gvu.py's inputs and outputs: the prompt file and the config file read into one-line errors, the
prompts checked against the loaded model (words it can spell, lengths that fit its positions), then
the run folder: what makes a run survive kill -9, a full disk or a second process, and open_run,
which starts a run in OUT or resumes the one there.

    OUT/.lock          held (fcntl.flock) by the one process training in OUT
    OUT/config.json    the first run's settings; --resume must match them
    OUT/log.jsonl      one JSON line per finished step, appended
    OUT/sampler.json   the sampler the run uses, each value with its source (written at each start)
    OUT/state.pt       resumable state (LoRA, optimizer, RNG, step): the source of truth
    OUT/adapter/       the LoRA as a peft folder, + gvu.json saying which step it holds
    OUT/samples/       sample grids

Every file is written beside its final name and renamed into place (os.replace is atomic), so a kill
at any moment leaves the old or the new version, never half of one. A save writes state.pt first,
then adapter/: after a kill in between, state.pt is the newest and adapter/gvu.json names the older
step (--resume writes the adapter again from the state). The log may run ahead of state.pt by the
steps after the last save; --resume drops them and repeats those steps, which reproduces them
exactly. This module does not import gvu.
"""

import copy
import ctypes
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import warnings
from dataclasses import asdict, fields

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from PIL import Image
from tqdm import tqdm
from transformers import HfArgumentParser

from models.adapters import InputError, pick_device, sampler_settings
from tools import loggers


def write_atomic(path, write, mode="w"):
    """write(f) into path.tmp, then rename it over path; a failed write leaves no path.tmp."""
    try:
        with open(path + ".tmp", mode) as f:
            write(f)
        os.replace(path + ".tmp", path)
    except BaseException:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise


def write_json(obj, path):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"))


def atomic_save(obj, path):
    """torch.save, atomically; torch reports a full disk as a RuntimeError: here an OSError."""
    try:
        write_atomic(path, lambda f: torch.save(obj, f), "wb")
    except RuntimeError as e:
        raise OSError(f"cannot write {path}: {e}") from None


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from None


def all_finite(obj):
    """True when every floating-point tensor inside obj (dicts, lists, tuples) is finite."""
    if torch.is_tensor(obj):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


# what gvu.py's --resume may change; every other setting must match the run's config.json
# (the prompt file may move: its content must match, compared by fingerprint)
RESUME_MAY_CHANGE = {"steps", "epochs", "resume", "out", "save_every", "sample_every"}
RESUME_MAY_CHANGE |= {"probe_every", "report_to", "prompts"}
RESUME_MAY_CHANGE |= {"micro_batch"}  # the same update in other chunks: rounding only (tested)


class TrainingError(Exception):
    """The run cannot go on (e.g. a non-finite reward): reported as one line, never a traceback."""


# -----------------------------------------------------------------------------
# gvu.py's settings: each rule written once, checked before anything is loaded or written
def settings_rules(args):
    """(flag, valid?, what it must be) for every numeric setting of gvu.Args."""
    fin = math.isfinite
    return [
        ("out", bool(args.out.strip()), "a folder name"),
        ("steps", args.steps >= 1, ">= 1"),
        ("epochs", fin(args.epochs) and 0 <= args.epochs <= 1000, "in [0, 1000] (0 = --steps)"),
        ("batch_prompts", args.batch_prompts >= 1, ">= 1"),
        ("group_size", args.group_size >= 2, ">= 2: advantages compare samples within a group"),
        ("lr", fin(args.lr) and args.lr > 0, "> 0"),
        ("warmup_steps", args.warmup_steps >= 0, ">= 0"),
        ("beta", fin(args.beta) and args.beta >= 0, ">= 0"),
        ("clip_eps", fin(args.clip_eps) and 0 < args.clip_eps < 1, "in (0, 1)"),
        ("num_iterations", args.num_iterations >= 1, ">= 1"),
        ("lora_r", args.lora_r >= 1, ">= 1"),
        ("lora_alpha", args.lora_alpha >= 1, ">= 1"),
        ("max_grad_norm", fin(args.max_grad_norm) and args.max_grad_norm > 0, "> 0"),
        # colder, a group's samples are copies and every advantage is 0
        ("temperature", fin(args.temperature) and 0.1 <= args.temperature <= 100, "in [0.1, 100]"),
        ("top_k", args.top_k >= 0, ">= 0"),
        ("top_p", fin(args.top_p) and 0 < args.top_p <= 1, "in (0, 1] (1 = off)"),
        ("min_p", fin(args.min_p) and 0 <= args.min_p < 1, "in [0, 1)"),
        ("cfg_scale", fin(args.cfg_scale) and 1 <= args.cfg_scale <= 100, "in [1, 100] (1 = off)"),
        ("micro_batch", args.micro_batch >= 1, ">= 1"),
        ("image_size", args.image_size >= 0, ">= 0 (0 = the model's default)"),
        ("save_every", args.save_every >= 1, ">= 1"),
        ("sample_every", args.sample_every >= 1, ">= 1"),
        ("probe_every", args.probe_every >= 0, ">= 0 (0 = off)"),
        ("seed", 0 <= args.seed < 2**32, "in [0, 2**32)"),
    ]


def broken_rules(rules, args):
    """One line naming every rule (flag, valid?, what it must be) that args break; "" if none."""
    line = lambda flag, what: (
        f"--{flag.replace('_', '-')} must be {what} (got {getattr(args, flag)})"
    )
    return "; ".join(line(flag, what) for flag, ok, what in rules if not ok)


def check_args(args, may_change, defaults):
    """Refuse bad input before anything is loaded or written: one line naming every bad flag, then
    the device, the tracker's package, the run folder (new, or resumed with the same settings) and
    the prompt file. Returns the prompts and their line numbers."""
    if bad := broken_rules(settings_rules(args), args):
        raise InputError(bad)
    pick_device(args.device)  # an unavailable device is an InputError
    loggers.require(args.report_to)  # a missing tensorboard / wandb package
    prompts, lines = read_prompts(args.prompts)
    check_run_folder(args.out, args.resume, run_config(args), may_change, defaults)
    if args.epochs > 0:  # whole passes over the prompts (the official run: 4 x 50,000 / 8 steps)
        args.steps = math.ceil(args.epochs * len(prompts) / args.batch_prompts)
    return prompts, lines


def run_config(args):
    """What config.json records: the settings, and content fingerprints of the prompt file and of
    the config file if one was given (so that --resume notices a file edited in place, and accepts
    the same file under another path)."""
    config_file = getattr(args, "config_file", None)  # set by parse_args
    files = dict(prompts_sha256=file_sha256(args.prompts), config_file_sha256=None)
    if config_file:
        files["config_file_sha256"] = file_sha256(config_file)
    return {**asdict(args), **files}


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# what gvu.py's main reports in one line (runio.error_line); any other exception is a bug
FAILURES = (InputError, TrainingError, OSError, MemoryError, RuntimeError, KeyboardInterrupt)


def sampler_args(lm, args, out=None, is_main=True):
    """A copy of args with the sampler a run uses (models.sampler_settings: args' values, or with
    --generation-config the checkpoint's where args leave transformers' defaults), and a record of
    it: one printed line, a warning for each setting of the checkpoint's generation_config.json
    that generate applies and gvu does not, and OUT/sampler.json (a notice when a resumed run's
    differs). torchrun: rank 0 alone says it. config.json keeps the requested values."""
    values, record = sampler_settings(lm, args)
    args = copy.copy(args)  # a gvu.Args or an argparse.Namespace
    vars(args).update(values)
    if not is_main:
        return args

    def said(r):  # "temperature 1.0 (flag/config), top_k 50 (transformers' default), ..."
        return ", ".join(f"{k} {v['value']} ({v['source']})" for k, v in r.items() if "source" in v)

    print(f"sampler: {said(record)}")
    for key, value in record.get("generation_config", {}).get("not_sampled", {}).items():
        print(
            f"warning: the model's generation_config.json sets {key} = {value}, which "
            "transformers' generate applies and gvu's sampler does not",
            file=sys.stderr,
        )
    path = out and os.path.join(out, "sampler.json")
    if path and os.path.exists(path) and (old := read_json(path)) != record:
        print(f"notice: {path} held another sampler ({said(old)}); replaced", file=sys.stderr)
    if path:
        write_json(record, path)
    return args


def error_line(e, out):
    """The one line gvu.py exits with: the error, and for a failed run what survives of it.
    A RuntimeError that is not out of memory is a bug: raised again, with its traceback.
    torchrun: rank 0 says it, every other rank exits with status 1."""
    oom = isinstance(e, MemoryError) or "out of memory" in str(e) or "allocate memory" in str(e)
    if isinstance(e, RuntimeError) and not oom:
        raise e
    if os.environ.get("RANK", "0") != "0":
        return 1
    if isinstance(e, InputError):
        return f"error: {shown(e)}"
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted: {saved_note(out)}; continue with --resume"
    if oom:
        return f"error: out of memory (lower --micro-batch or --group-size); {saved_note(out)}"
    return f"error: {shown(str(e) or type(e).__name__).splitlines()[0]}; {saved_note(out)}"


def shown(text):
    """text for a one-line message: invisible and control characters escaped (\\u200b, \\x1b)."""
    escaped = lambda c: c if c.isprintable() or c == "\n" else c.encode("unicode_escape").decode()
    return "".join(map(escaped, str(text)))


def check_against_model(umm, args, prompts, lines):
    """The checks that need the loaded model; they too run before anything is written."""
    if args.top_k > umm.image_vocab_size:
        raise InputError(
            f"--top-k must be <= the model's {umm.image_vocab_size} image codes (got {args.top_k})"
        )
    if bad := umm.unknown_words(args.instruction):
        words = ", ".join(shown(w) for w in sorted(set(bad)))
        raise InputError(f"--instruction has words the model does not know: {words}")
    sampler_settings(umm.lm, args)  # --generation-config: a checkpoint value it cannot sample with
    check_vocabulary(umm, prompts, lines)
    check_context(umm, prompts, lines, args.instruction, args.prompts)
    if args.reward_input == "codes" and not umm.understands_codes:
        raise InputError(
            f"--reward-input codes: {type(umm).__name__}'s understanding does not "
            "read its generated codes"
        )


def parse_args(Args, argv, doc):
    """gvu.py's command line into Args (transformers' HfArgumentParser), flags optionally after a
    config file. Bad flags are argparse's error; --steps beside --epochs is refused."""
    parser = HfArgumentParser(Args, description=doc.split("\n\n")[0].strip())
    for action in parser._actions:  # HfArgumentParser gives --no_x the help of --x
        if action.option_strings[0].startswith("--no_"):
            action.help = f"turn {action.option_strings[0].replace('--no_', '--', 1)} off"
    # one line, not argparse's usage block: "gvu.py: error: argument --steps: invalid int value"
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {shown(message)}\n")
    config_file = argv[0] if argv and not argv[0].startswith("-") else None
    try:
        tokens = config_tokens(list(argv), [f.name for f in fields(Args)])
    except InputError as e:
        parser.error(str(e))
    args, rest = parser.parse_args_into_dataclasses(tokens, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.epochs > 0 and any(t == "--steps" or t.startswith("--steps=") for t in tokens):
        parser.error("give --steps or --epochs, not both")
    args.config_file = config_file  # not a setting: run_config records its content's fingerprint
    return args


def is_sample_step(step, args):
    """Steps that draw a sample grid (and so decode their images with --reward-input codes)."""
    return step % args.sample_every == 0 or step == args.steps - 1


def prompt_batch(prompts, step, B, seed):
    """The B prompts of `step`: a fresh seeded shuffle per epoch, so the stream is a function of
    step (resume-safe) and batches straddle the epochs' boundaries."""
    n, ks = len(prompts), range(step * B, (step + 1) * B)
    perm = lambda e: torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()
    perms = {e: perm(e) for e in {k // n for k in ks}}
    return [prompts[perms[k // n][k % n]] for k in ks]


def config_tokens(argv, known):
    """The command line, with a leading config file (`gvu.py configs/x.json --out runs/x`) turned
    into flags that go before the others (config_flags)."""
    if argv and not argv[0].startswith("-"):
        return config_flags(argv[0], argv[1:], known) + argv[1:]
    return argv


# -----------------------------------------------------------------------------
# inputs
def read_prompts(path):
    """The non-blank lines of a UTF-8 text file (a leading byte-order mark is dropped) and their
    line numbers."""
    if os.path.isdir(path):
        raise InputError(f"prompt file is a directory: {path}")
    if not os.path.isfile(path):
        raise InputError(f"prompt file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:  # decoded whole, so e.start is the byte offset in the file
        raise InputError(f"prompt file is not UTF-8: {path} (byte {e.start})") from None
    numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not numbered:
        raise InputError(f"prompt file has no prompts: {path}")
    return [p for _, p in numbered], [n for n, _ in numbered]


def check_vocabulary(umm, prompts, lines=None):
    """Every word of every prompt must be one the model can spell (else it would silently become
    <unk>)."""
    for n, p in zip(lines or range(1, len(prompts) + 1), prompts):
        if bad := umm.unknown_words(p):
            words = ", ".join(shown(w) for w in sorted(set(bad)))
            raise InputError(f"line {n} has words the model does not know: {words} ({p!r})")


def check_context(umm, prompts, lines, instruction, path):
    """Every prompt must fit the LM's positions twice: in the rollout (prompt, then the image codes)
    and in the reward pass (the image and the instruction, then the prompt). Past the limit RoPE
    models run on, slowly and out of distribution, so this refuses instead, naming the line."""
    limit = getattr(umm.lm.config.get_text_config(), "max_position_embeddings", None)
    if not limit:
        return
    tok, (h, w) = umm.tokenizer, umm.grid
    # the caption context's length does not depend on the pixels
    blank = Image.new("RGB", (16 * w, 16 * h))
    ctx = len(tok(umm.caption_prompt(blank, instruction), add_special_tokens=False).input_ids)
    gen = tok([umm.t2i_prompt(p) for p in prompts]).input_ids
    answers = [umm.answer_prefix + p + umm.answer_suffix for p in prompts]
    ans = tok(answers, add_special_tokens=False).input_ids
    if ctx >= limit:  # the image and the instruction leave no room for a single answer token
        raise InputError(
            f"--instruction is too long: with the image it takes {ctx} of the model's {limit} "
            "positions, and no prompt fits after it"
        )
    for n, g, a in zip(lines, gen, ans):
        if (need := max(len(g) + h * w, ctx + len(a))) > limit:
            raise InputError(
                f"line {n} of {path} is too long: it needs {need} positions with its image, "
                f"the model has {limit}"
            )


def config_flags(path, cli, known):
    """A JSON config file (gvu.Args' field names, `known`; a "_sources" key documents them and is
    skipped) as command-line flags that go BEFORE the real ones, so argparse checks its values and
    the command line overrides it. --steps and --epochs are alternatives: the one given on the
    command line drops the file's other."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"config file {path}: {e}") from None
    if not isinstance(values, dict):
        raise InputError(f"config file {path}: not a JSON object")
    values.pop("_sources", None)
    if unknown := sorted(set(values) - set(known)):
        raise InputError(f"config file {path}: unknown keys {', '.join(map(shown, unknown))}")
    if nulls := sorted(k for k, v in values.items() if v is None or isinstance(v, (list, dict))):
        raise InputError(f"config file {path}: {', '.join(nulls)} must be a number, text or bool")
    for flag, other in (("steps", "epochs"), ("epochs", "steps")):
        if any(a == f"--{flag}" or a.startswith(f"--{flag}=") for a in cli):
            values.pop(other, None)
    return [t for k, v in values.items() for t in (f"--{k}", str(v))]


# -----------------------------------------------------------------------------
# the folder: checked before anything is loaded, then created and locked
def check_out_folder(out):
    """Why `out` cannot become a run folder, or None. Writes nothing."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} is a file, not a folder"
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--out {out}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out}: {parent} is not writable"
    return None


def check_run_folder(out, resume, config, may_change, defaults):
    """Refuse an --out that cannot hold this run: not a writable folder, a finished or started run
    without --resume, --resume without a run, or a resume whose settings (`config`) differ from the
    run's config.json outside `may_change`. A flag added since the run started counts as its default
    there (new flags default to the old behaviour)."""
    if problem := check_out_folder(out):
        raise InputError(problem)
    is_run = os.path.exists(os.path.join(out, "config.json")) or os.path.exists(
        os.path.join(out, "state.pt")
    )
    if is_run and not resume:
        raise InputError(
            f"{out} already holds a run; pass --resume to continue it or pick another --out"
        )
    if resume and not is_run:
        raise InputError(f"--resume: no run in {out} (no config.json)")
    if resume:  # the first run's config.json: every setting that changes the run must match it
        check_same_run(
            {**defaults, **read_json(os.path.join(out, "config.json"))}, config, may_change
        )


def lock_run_folder(out):
    """Create `out` and take its lock: one process per run folder. The lock lasts while the returned
    file stays open (the OS drops it when the process dies, however it dies)."""
    try:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")
    except OSError as e:
        raise InputError(f"cannot create --out {out}: {e.strerror}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise InputError(
            f"--out {out} is in use by another gvu.py process (pid {holder}); "
            "wait for it or pick another --out"
        ) from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


# -----------------------------------------------------------------------------
# resume: the same run, a log without torn lines, an adapter that matches the state
def check_same_run(saved, now, may_change):
    """Refuse to resume when a setting that changes the run differs from the run's config.json: one
    line naming each differing flag. Keys known to only one side (a flag added or removed since) are
    skipped."""
    changed = [k for k in now if k in saved and k not in may_change and now[k] != saved[k]]
    diffs = [
        f"the {k.removesuffix('_sha256').replace('_', ' ')} has changed since the run started"
        if k.endswith("_sha256")
        else f"--{k.replace('_', '-')} {now[k]} (the run has {saved[k]})"
        for k in changed
    ]
    if diffs:
        raise InputError(
            f"--resume: {', '.join(diffs)}; pass the run's values, or start a new --out"
        )


def load_state(path, device):
    """torch.load of state.pt as one-line errors: a damaged file names itself instead of a
    traceback."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, empty, not a torch file: each raises a different type
        why = str(e).splitlines()[0] if str(e) else "empty"
        raise InputError(
            f"cannot read {path} ({type(e).__name__}: {why}); "
            "it was damaged outside gvu.py, which writes it atomically"
        ) from None
    keys = {"step", "prompt_pos", "lora", "optimizer", "scheduler", "rng"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise InputError(f"{path} is not a gvu.py state (missing keys)")
    return state


def trim_log(path, start):
    """Keep the log lines of steps < start (later ones are repeated after the resume), rewritten
    atomically. A last line cut mid-JSON by a kill is dropped with a notice; blank lines are
    skipped; a missing log starts again with a notice. Returns the notices."""
    notices = []
    if not os.path.exists(path):
        lines = []
        if start:
            notices.append(f"{path} is missing: a new log starts at step {start}")
    else:
        with open(path) as f:
            lines = [line for line in f.read().split("\n") if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise InputError(
                    f"{path} line {n} is not JSON (only a last line can be cut by a kill); "
                    "repair or delete that line"
                ) from None
            notices.append(f"{path}: dropped a last line cut by a kill ({line[:40]!r}...)")
    kept = [row for row in rows if row.get("step", start) < start]
    write_atomic(path, lambda f: f.writelines(json.dumps(row) + "\n" for row in kept))
    return notices


# -----------------------------------------------------------------------------
# the adapter: a peft folder, swapped in whole
def save_adapter(policy, folder, info):
    """policy.save_pretrained into folder.tmp (+ gvu.json = info: the step and the base model),
    then swap it in. On Linux the swap is one atomic exchange of the two folders, so after the
    first save `folder` always holds a whole adapter, the old one or the new one. Where that is not
    available: folder -> folder.old, folder.tmp -> folder, and a kill between the two renames
    leaves folder.old and folder.tmp (whole) and no folder until --resume writes it again."""
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # safetensors reports a full disk as its own error: here an OSError
        policy.save_pretrained(tmp)
        write_json(info, os.path.join(tmp, "gvu.json"))
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"cannot write {tmp}: {e}") from None
    if os.path.exists(folder) and exchange(tmp, folder):
        shutil.rmtree(tmp)  # the old adapter, swapped out
        return
    if os.path.exists(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def exchange(a, b):
    """Swap two paths in one atomic step: Linux's renameat2(RENAME_EXCHANGE). False where the OS,
    the C library or the file system cannot (nothing is changed then)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def base_model_id(model, seed):
    """What identifies a base model's weights: tiny-random's seed, a local folder's real path, or a
    hub id."""
    if model == "tiny-random":
        return f"tiny-random (seed {seed})"
    return os.path.realpath(model) if os.path.exists(model) else model


def saved_note(out):
    """Which saved step survives a failed run, for its error message."""
    path = os.path.join(out, "state.pt")
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:  # missing (nothing saved yet) or unreadable
        return f"nothing is saved in {out} yet"
    return f"the saved state in {out} (step {step}) is intact"


def base_fingerprint(lm):
    """A short hash of the base weights: 64 rows spread over the LM's first weight (its input
    embedding in practice; never LoRA'd), rounded to bf16 so that fp32 and bf16 loads agree. The
    same weights under another path or hub id match; another base (or tiny-random with another seed)
    does not."""
    w = next(p for n, p in lm.named_parameters() if "lora_" not in n).detach()
    rows = w[torch.linspace(0, len(w) - 1, 64).long().unique().to(w.device)]
    return hashlib.sha256(
        rows.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
    ).hexdigest()[:16]


# -----------------------------------------------------------------------------
# start or resume a run: the first write to --out
def open_run(args, policy, optimizer, scheduler, device, is_main=True):
    """Create and lock --out (one process per run folder), then start the run (config.json, an empty
    log) or resume it (check_args has compared the settings): the state's weights, optimizer and
    RNG, the log cut back to the state's step, an adapter that matches the state. Returns (the step
    to start from, the lock). torchrun: every rank loads the state; rank 0 alone locks and writes
    (the others get lock None)."""
    lock = lock_run_folder(args.out) if is_main else None
    config, log, state_path, adapter = (
        os.path.join(args.out, f) for f in ("config.json", "log.jsonl", "state.pt", "adapter")
    )
    try:
        if not args.resume:
            if not is_main:
                return 0, None
            # written by a run that held the lock before us
            if os.path.exists(config) or os.path.exists(state_path):
                raise InputError(
                    f"{args.out} already holds a run; "
                    "pass --resume to continue it or pick another --out"
                )
            write_json(run_config(args), config)  # kept for good: --resume is checked against it
            write_atomic(log, lambda f: None)
            return 0, lock
        start = 0  # no state.pt: killed before its first save; the run starts again from its seed
        if os.path.exists(state_path):
            state = load_state(state_path, device)
            start = state["step"]
            if start > args.steps:
                raise InputError(
                    f"--steps {args.steps} is below the step the run in {args.out} has reached "
                    f"({start})"
                )
            set_peft_model_state_dict(policy, state["lora"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            continue_schedule(scheduler)
            torch.set_rng_state(state["rng"].cpu())
            if is_main:  # a kill may have cut the last save
                save_adapter(policy, adapter, adapter_info(args, policy, start))
        # steps logged after the last save are run again
        for notice in trim_log(log, start) if is_main else []:
            print(f"notice: {notice}", file=sys.stderr)
        return start, lock
    except BaseException:
        if lock is not None:
            lock.close()
        raise


def continue_schedule(scheduler):
    """Set the lr of the step the resumed run starts at by this run's schedule. The schedule's
    length is --steps as given now, so a run resumed with a larger --steps follows, from here on,
    the lr of an uninterrupted run of that length. (The same --steps: nothing changes.)"""
    step, lambdas = scheduler.last_epoch, scheduler.lr_lambdas  # transformers' LambdaLR
    if [b * f(step) for b, f in zip(scheduler.base_lrs, lambdas)] == scheduler.get_last_lr():
        return
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended
        warnings.simplefilter("ignore")
        scheduler.last_epoch -= 1
        scheduler.step()


def adapter_info(args, policy, step):
    """adapter/gvu.json: the step the adapter holds and the base model it was trained on
    (eval_geneval checks it)."""
    return dict(
        step=step,
        model=args.model,
        base_model=base_model_id(args.model, args.seed),
        base_fingerprint=base_fingerprint(policy.get_base_model()),
    )


# -----------------------------------------------------------------------------
# the run folder as gvu.py's training loop sees it
class Run:
    """Start the run in --out, or resume it (open_run), then log, draw and save into it.
    torchrun: every rank loads the state; rank 0 alone (is_main) prints and writes."""

    def __init__(self, args, policy, optimizer, scheduler, device, is_main=True):
        self.args, self.policy, self.optimizer, self.scheduler = args, policy, optimizer, scheduler
        self.is_main = is_main
        self.start, self.lock = open_run(args, policy, optimizer, scheduler, device, is_main)
        self.log_path = os.path.join(args.out, "log.jsonl")
        # the tracker: a no-op unless --report-to and the main process
        config = asdict(args)
        self.tracker = loggers.make_logger(args.report_to, args.out, config, self.start, is_main)
        self.bar = None

    def steps(self):
        """The steps still to run, with a tqdm bar (main process only)."""
        todo = range(self.start, self.args.steps)
        self.bar = tqdm(todo, "gvu", self.args.steps, initial=self.start, disable=not self.is_main)
        return self.bar

    def log(self, step, out, lr, seconds, probe=None):
        """One line of log.jsonl (gvu_step's output as numbers), one printed line, the tracker's
        copy."""
        if not self.is_main:
            return
        r, G = out["rewards"], self.args.group_size  # (B*G,): every rank's rewards
        zero_std = (r.view(-1, G).std(1) == 0).float().mean().item()
        row = dict(step=step, samples=len(r), reward_mean=r.mean().item())
        row.update(reward_std=r.std().item(), frac_zero_std=zero_std, **out["stats"])
        row.update(lr=lr, seconds=seconds)
        if probe is not None:
            row["probe_reward"] = probe
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.bar.set_postfix(reward=f"{row['reward_mean']:.4f}", kl=f"{row['kl']:.4f}")
        tqdm.write(
            f"step {step:5d} | reward {row['reward_mean']:.4f} ± {row['reward_std']:.4f} "
            f"| kl {row['kl']:.4f} | clip {row['clip_frac']:.3f} | zero-std {zero_std:.2f} "
            f"| grad {row['grad_norm']:.3f} | {seconds:.1f}s"
            + (f" | {row['rollout_batches']} batches" if "rollout_batches" in row else "")
        )
        self.tracker.scalars(row, step)

    def sample_grid(self, step, out, tokenizer, answer_ids):
        """On sample steps, samples/step_NNNNN.png (loggers.save_grid): rows = prompts, columns =
        the G samples, each with its reward and its prompt's tokens shaded by their probability.
        answer_ids(prompts): the scored tokens' ids (gvu.answer_ids). torchrun: rank 0's groups."""
        if not self.is_main or not is_sample_step(step, self.args):
            return
        G = self.args.group_size
        prompts = [p for p in out["batch"] for _ in range(G)]
        texts = [loggers.token_texts(tokenizer, ids) for ids in answer_ids(prompts)]
        path = os.path.join(self.args.out, "samples", f"step_{step:05d}.png")
        images, rewards = out["images"], out["rewards"][: len(out["images"])].tolist()
        terms = out["token_logp"]  # (B*G, L) or None
        grid = loggers.save_grid(path, prompts, images, rewards, G, texts=texts, token_logp=terms)
        self.tracker.image("samples", grid, step)

    def save(self, step):
        """state.pt first (the source of truth), then adapter/; nothing non-finite is saved."""
        if not self.is_main:
            return
        state = dict(
            step=step,
            prompt_pos=step * self.args.batch_prompts,
            lora=get_peft_model_state_dict(self.policy),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            rng=torch.get_rng_state(),
        )
        if not all_finite(state):
            raise TrainingError(
                f"the weights are not finite after step {step - 1}; nothing was saved from it"
            )
        adapter, info = (
            os.path.join(self.args.out, "adapter"),
            adapter_info(self.args, self.policy, step),
        )
        atomic_save(state, os.path.join(self.args.out, "state.pt"))
        save_adapter(self.policy, adapter, info)

    def close(self):
        self.tracker.close()
        if self.lock is not None:
            self.lock.close()
