"""torchrun / DistributedDataParallel (tools/distributed.py): 2 CPU processes on gloo against one
process."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
import zlib

import pytest
import torch

import gvu
from standins import ROOT, log_rows

# as many tokens each: the same padding
EQUAL_LENGTH_PROMPTS = ["a photo of a red circle", "a photo of a blue triangle"]
REAL_ROLLOUT = gvu.rollout
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)


def fixed_rollout(umm, prompts, G, temperature, top_k, min_p, cfg_scale, generator, top_p=1.0):
    """The real rollout, each prompt's G samples seeded by the prompt itself: the same codes however
    the batch is split over ranks (the real one seeds by (seed, step, rank))."""
    parts = [
        REAL_ROLLOUT(
            umm,
            [p],
            G,
            temperature,
            top_k,
            min_p,
            cfg_scale,
            torch.Generator().manual_seed(zlib.crc32(p.encode())),
            top_p,
        )
        for p in prompts
    ]
    return {k: torch.cat([r[k] for r in parts]) for k in parts[0]}


def fixed_rewards(umm, images, prompts, args):
    """Rewards from the prompt and the sample's place in its group only (the decoder's noise is
    rank-seeded). A prompt with "square" in it gets the same reward for all G samples: a group
    without spread."""
    return torch.tensor(
        [
            zlib.crc32(p.encode()) % 97 / 97 + (0 if "square" in p else 0.1 * (i % args.group_size))
            for i, p in enumerate(prompts)
        ]
    )


def flags(tmp_path, out, *extra):
    pf = tmp_path / "p.txt"
    pf.write_text("\n".join(EQUAL_LENGTH_PROMPTS) + "\n")
    return [
        "--model",
        "tiny-random",
        "--prompts",
        str(pf),
        "--out",
        str(tmp_path / out),
        "--batch-prompts",
        "2",
        "--group-size",
        "2",
        "--sample-every",
        "1",
        *extra,
    ]


def tagged_pids(tag):
    """Every live process started with GVU_TEST_LAUNCH=tag in its environment: torchrun and its
    workers."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"GVU_TEST_LAUNCH={tag}".encode() in f.read().split(b"\0"):
                    pids.append(int(pid))
        except OSError:  # gone meanwhile, or not ours
            pass
    return pids


def launch(cmd, timeout):
    """Run cmd, its output in a file. Returns (the finished run or None if it hung, what it
    printed); a launch still running after `timeout` seconds has every process's stack dumped into
    its output, then is killed. torchrun starts each worker in a session of its own, so killing
    torchrun's process group would leave the workers running (and holding a pipe open forever): the
    launch is tagged through its environment instead, and SIGABRT makes each Python process dump its
    stack first (PYTHONFAULTHANDLER)."""
    tag = uuid.uuid4().hex
    env = dict(ENV, GVU_TEST_LAUNCH=tag, PYTHONFAULTHANDLER="1")
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
        )
        try:
            proc.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            for sig in (signal.SIGABRT, signal.SIGKILL):
                for pid in tagged_pids(tag):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                time.sleep(3)
            proc.wait()
        out.seek(0)
        printed = out.read()
    return (None if hung else subprocess.CompletedProcess(cmd, proc.returncode, printed)), printed


def torchrun(script, *argv, timeout=150):
    """2 CPU processes (gloo) under torchrun. A hang cannot hang the suite: the launch is killed
    after `timeout` seconds with the stacks printed, and retried once. Four CI runs hung here, at
    the very end of a run: a gloo worker needing the GIL while the main thread, holding it, joined
    that worker in the process group's destructor (gdb's stacks; DDP.close now avoids it:
    5 hangs in 34 launches under load before, 0 in 80 after). The retry stays as a guard; it starts
    from the --out folder as it was before the hung launch (a hang after the run had written the
    folder once made the retry fail as "already holds a run"). A second hang fails the test with
    both stack dumps."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        script,
        *argv,
    ]
    out = argv[argv.index("--out") + 1]
    before = out + ".before_launch"
    if os.path.exists(out):
        shutil.copytree(out, before)
    dumps = []
    for _ in range(2):
        run, output = launch(cmd, timeout)
        if run is None:  # hung: put --out back as it was
            shutil.rmtree(out, ignore_errors=True)
            if os.path.exists(before):
                shutil.copytree(before, out)
        else:
            shutil.rmtree(before, ignore_errors=True)
            if dumps:
                warnings.warn(
                    f"torchrun hung once and passed on retry; the hung launch printed:\n{dumps[0]}"
                )
            return run
        dumps.append(output[-6000:])
    pytest.fail(
        f"torchrun hung twice ({timeout} s each); what the launches printed:\n"
        + "\n-----\n".join(dumps)
    )


def test_two_process_update_equals_one_process_update(tmp_path, monkeypatch, one_thread):
    """Same samples, rewards and advantages: 2-process DDP gives the one-process LoRA weights and
    statistics."""
    argv = lambda out: flags(
        tmp_path, out, "--steps", "1", "--micro-batch", "1", "--num-iterations", "2"
    )
    monkeypatch.setattr(gvu, "rollout", fixed_rollout)
    # reference: one process, the whole batch, 4 micro-batches
    gvu.main(argv("one"), reward_fn=fixed_rewards)
    # 2 ranks x 2 micro-batches, one no_sync each (__main__ below)
    run = torchrun("tests/test_distributed.py", *argv("two"))
    assert run.returncode == 0, run.stdout[-3000:]
    one, two = (
        torch.load(tmp_path / o / "state.pt", weights_only=True)["lora"] for o in ("one", "two")
    )
    assert any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)  # it trained
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-6
    # Adam is blind to a gradient's scale; the logged norm (before clipping) is not: the DDP mean is
    # the batch mean
    r1, r2 = log_rows(tmp_path / "one"), log_rows(tmp_path / "two")
    for key in "samples reward_mean reward_std loss kl grad_norm".split():
        assert abs(r1[0][key] - r2[0][key]) <= 1e-6 * max(1, abs(r1[0][key])), key


def test_torchrun_run_logs_the_whole_batch_once_and_resumes_to_its_own_log(tmp_path):
    """torchrun, 2 processes: one log with B*G samples a step (rank 0 writes), and resume reproduces
    it."""
    pf = tmp_path / "p.txt"
    pf.write_text(
        "a photo of a red circle\na photo of two squares\na photo of a blue triangle\n"
        "a photo of a circle and a square\n"
    )
    common = lambda out, *extra: [
        "--model",
        "tiny-random",
        "--prompts",
        str(pf),
        "--out",
        str(tmp_path / out),
        "--batch-prompts",
        "2",
        "--group-size",
        "2",
        "--micro-batch",
        "1",
        "--save-every",
        "2",
        *extra,
    ]
    for argv in (
        common("a", "--steps", "3"),
        common("b", "--steps", "2"),
        common("b", "--steps", "3", "--resume"),
    ):
        run = torchrun("gvu.py", *argv)
        assert run.returncode == 0, run.stdout[-3000:]
    a = log_rows(tmp_path / "a")
    assert [r["step"] for r in a] == [0, 1, 2] and all(r["samples"] == 2 * 2 for r in a)
    assert log_rows(tmp_path / "b", "seconds") == log_rows(tmp_path / "a", "seconds")
    assert sorted(os.listdir(tmp_path / "a")) == [
        ".lock",
        "adapter",
        "config.json",
        "log.jsonl",
        "sampler.json",
        "samples",
        "state.pt",
    ]


def test_torchrun_dynamic_sampling_refills_every_ranks_groups(tmp_path):
    """--dynamic-sampling under torchrun: each rank refills its own B/N groups from its slice of the
    reserve, so ranks roll out different numbers of batches in a step, yet their collectives still
    meet. Six prompts, one without reward spread, B = 2 for 3 steps (one epoch: the spread-less
    prompt is drawn once). Without the flag that step has a group without spread (frac_zero_std,
    over every rank's rewards, > 0); with it no step has."""
    pf = tmp_path / "p.txt"
    pf.write_text(
        "a photo of a red circle\na photo of a blue triangle\na photo of two squares\n"
        "a photo of a blue circle\na photo of a red triangle\na photo of a circle\n"
    )
    logs = {}
    for out, extra in (("plain", []), ("refill", ["--dynamic-sampling", "2"])):
        run = torchrun(
            "tests/test_distributed.py",
            "--model",
            "tiny-random",
            "--prompts",
            str(pf),
            "--out",
            str(tmp_path / out),
            "--batch-prompts",
            "2",
            "--group-size",
            "2",
            "--steps",
            "3",
            *extra,
        )
        assert run.returncode == 0, run.stdout[-3000:]
        logs[out] = log_rows(tmp_path / out)
    assert all(r["samples"] == 2 * 2 for rs in logs.values() for r in rs)
    assert sorted(r["frac_zero_std"] for r in logs["plain"]) == [0.0, 0.0, 0.5]
    assert [r["frac_zero_std"] for r in logs["refill"]] == [0.0, 0.0, 0.0]
    assert all("rollout_batches" in r for r in logs["refill"]) and not any(
        "rollout_batches" in r for r in logs["plain"]
    )


def test_batch_not_divisible_by_the_processes_is_a_one_line_error(tmp_path, monkeypatch):
    """B=3 prompts on 2 ranks: one line, non-zero exit, nothing created."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        gvu.main(flags(tmp_path, "run", "--batch-prompts", "3"))
    except SystemExit as e:
        msg = e.code
    assert msg == "error: --batch-prompts 3 must be divisible by the 2 processes"
    assert not (tmp_path / "run").exists()


def gloo_workers():
    """This process's threads that run a gloo process group's collectives (their names:
    pt_gloo_runloop)."""
    names = [
        open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")
    ]
    return [n for n in names if n.startswith("pt_gloo")]


@pytest.mark.skipif(
    not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc (Linux)"
)
def test_the_process_group_dies_inside_teardown_after_its_barrier(tmp_path, monkeypatch):
    """The hang CI saw: the gloo group's destructor joins its worker threads while holding the GIL,
    and a worker freeing a collective needs the GIL. So the group must be destroyed inside
    DDP.close, after its barrier, and not later when train's frame drops DDP: right after
    destroy_process_group its workers are gone. (One process, world size 1, gloo: the same code path
    as under torchrun.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    ).items():
        monkeypatch.setenv(k, v)
    real, seen = torch.distributed.destroy_process_group, []

    def destroy(*a, **k):
        seen.append(gloo_workers())  # the group is alive here...
        real(*a, **k)
        seen.append(gloo_workers())  # ...and gone here

    monkeypatch.setattr(torch.distributed, "destroy_process_group", destroy)
    gvu.main(flags(tmp_path, "run", "--steps", "1"))
    assert len(seen) == 2 and seen[0] and seen[1] == [], seen


def test_a_hung_launch_is_retried_from_the_out_folder_as_it_was(tmp_path, monkeypatch):
    """The harness itself: a launch that writes into --out and then hangs is retried on the folder
    as it was."""
    out = tmp_path / "b"
    out.mkdir()
    (out / "log.jsonl").write_text("step 0\n")
    seen = []

    def fake_launch(cmd, timeout):
        seen.append(sorted(os.listdir(out)) if out.exists() else None)
        if len(seen) == 1:  # the first launch writes a step and hangs
            (out / "log.jsonl").write_text("step 0\nstep 1\n")
            (out / "state.pt").write_text("x")
            return None, "hung"
        return subprocess.CompletedProcess(cmd, 0, (out / "log.jsonl").read_text()), ""

    monkeypatch.setattr(sys.modules[__name__], "launch", fake_launch)
    with pytest.warns(UserWarning, match="hung once"):
        run = torchrun("gvu.py", "--out", str(out), "--resume")
    assert seen == [["log.jsonl"], ["log.jsonl"]] and run.stdout == "step 0\n"
    assert sorted(os.listdir(tmp_path)) == ["b"]  # the copy is gone


# run by the equivalence test under torchrun: gvu on the fixed rollout and rewards
# run under torchrun by the equivalence and dynamic-sampling tests: gvu on the fixed rollout and
# rewards; `--dynamic-sampling N` attaches tools/experiments.py's sampler
if __name__ == "__main__":
    from tools import experiments

    torch.set_num_threads(1)
    gvu.rollout = fixed_rollout
    argv, sampler = sys.argv[1:], gvu.sample_and_reward
    if "--dynamic-sampling" in argv:
        i = argv.index("--dynamic-sampling")
        sampler = experiments.dynamic_sampler(int(argv[i + 1]))
        del argv[i : i + 2]
    gvu.main(argv, reward_fn=fixed_rewards, sampler=sampler)
