"""Tests for eval_geneval.py compare: several trained runs against a base, with bootstrap intervals over
prompts. Each test names the invariant it checks and compares against a hand or analytic computation."""

import json
import statistics

import numpy as np
import pytest

import eval_geneval as E


def write_results(folder, per_prompt):
    """A score output folder: results.jsonl with one row per image; per_prompt: {(tag, index): [correct, ...]}."""
    folder.mkdir(parents=True)
    rows = [
        {"index": i, "sample": f"{k:04d}", "tag": t, "prompt": f"p{i}", "correct": c, "reason": ""}
        for (t, i), cs in per_prompt.items()
        for k, c in enumerate(cs)
    ]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_a_constant_per_prompt_gain_has_a_zero_width_interval_at_that_gain():
    """If every prompt gains exactly the same, every resample does too: the interval is that gain."""
    base = {"colors": {i: 0.25 for i in range(10)}}
    run = {"colors": {i: 0.75 for i in range(10)}}
    draws = E.bootstrap_deltas(base, [run], n_boot=200)
    assert np.allclose(draws["colors"], 0.5) and np.allclose(draws["overall"], 0.5)


def test_interval_width_matches_the_standard_error_of_the_mean_delta():
    """With many prompts the 95% percentile interval is about mean ± 1.96 * sd / sqrt(P) (normal approximation)."""
    rng = np.random.default_rng(1)
    P = 400
    b, r = rng.random(P), rng.random(P)
    draws = E.bootstrap_deltas(
        {"t": dict(enumerate(b))}, [{"t": dict(enumerate(r))}], n_boot=4000, seed=3
    )
    d = r - b
    se = statistics.pstdev(d.tolist()) / P**0.5
    lo, hi = np.percentile(draws["t"], [2.5, 97.5])
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(d.mean(), abs=0.2 * se)


def test_bootstrap_is_paired_so_an_unchanged_tag_has_no_spread():
    """The same prompts are drawn for base and runs: a tag the runs did not change has delta 0 in every draw."""
    base = {"a": {0: 0.0, 1: 1.0, 2: 0.5}, "b": {0: 0.0, 1: 1.0}}
    run = {"a": {0: 0.0, 1: 1.0, 2: 0.5}, "b": {0: 1.0, 1: 1.0}}
    draws = E.bootstrap_deltas(base, [run], n_boot=300)
    assert np.all(draws["a"] == 0) and draws["b"].std() > 0
    assert np.allclose(draws["overall"], (draws["a"] + draws["b"]) / 2)


def test_overall_is_the_mean_of_tag_deltas_and_runs_are_averaged_per_prompt():
    """The delta of several runs is the mean over runs; overall is the mean of the tag deltas (GenEval's overall)."""
    base = {"a": {0: 0.0, 1: 0.0}, "b": {0: 0.5}}
    runs = [{"a": {0: 1.0, 1: 0.0}, "b": {0: 0.5}}, {"a": {0: 0.0, 1: 0.0}, "b": {0: 1.0}}]
    draws = E.bootstrap_deltas(base, runs, n_boot=50)
    assert set(np.round(draws["a"], 6)) <= {
        0.0,
        0.25,
        0.5,
    }  # per-prompt deltas 0.5 and 0, averaged over 2 prompts
    assert np.allclose(draws["b"], 0.25)


def test_compare_cli_prints_mean_std_across_runs_and_the_interval(tmp_path, capsys):
    """compare BASE RUN1 RUN2 on score folders: per tag base, mean ± std over runs (hand values), delta, interval."""
    base = write_results(
        tmp_path / "base", {("colors", 0): [0, 0], ("colors", 1): [1, 0], ("counting", 2): [0, 0]}
    )
    r1 = write_results(
        tmp_path / "r1", {("colors", 0): [1, 1], ("colors", 1): [1, 0], ("counting", 2): [1, 0]}
    )
    r2 = write_results(
        tmp_path / "r2", {("colors", 0): [1, 0], ("colors", 1): [1, 0], ("counting", 2): [1, 1]}
    )
    E.main(["compare", str(base), str(r1), str(r2), "--bootstrap", "500"])
    out = capsys.readouterr().out
    # colors: base (0 + 0.5) / 2 = 0.25; runs 0.75 and 0.5 -> mean 0.625, sample std 0.1768; delta +0.375
    assert "| colors | 2 | 0.2500 | 0.6250 ± 0.1768 | +0.3750 |" in out
    # counting: one prompt, base 0, runs 0.5 and 1.0: a single prompt gives a zero-width interval at +0.75
    assert "| counting | 1 | 0.0000 | 0.7500 ± 0.3536 | +0.7500 | [+0.7500, +0.7500] |" in out
    assert "| **overall** | 3 | 0.1250 | 0.6875 ± 0.0884 | +0.5625 (+450.0%) |" in out


def test_compare_of_several_runs_without_results_is_a_one_line_error(tmp_path):
    """Several runs need per-prompt results for the statistics; bare summaries are refused with one line."""
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(
            json.dumps({"tags": {}, "overall": 0, "prompts_any_correct": 0})
        )
    with pytest.raises(SystemExit) as e:
        E.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")])
    assert "results.jsonl" in str(e.value) and "\n" not in str(e.value)
