"""The efficacy study's rules on data whose answer is known: truncated traces
never pair, manifests name the code, eval stages keep their problems apart,
McNemar, the minimum detectable effect, calibration, the alpha screen, and
ablations that vary placement but not size. No engine."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from adaras.pipeline.arms import same_norm
from adaras.pipeline.collect import CollectArgs, pair, write_problems
from adaras.pipeline.data import Problem
from adaras.pipeline.eval_score import answer_probe_metrics, screen, summarize
from adaras.pipeline.evaluate import EvalArgs, evaluate, other_stage_problems
from adaras.pipeline.identify import mean_difference, select, skip_last_layers
from adaras.pipeline.run import Run, append_jsonl, source_state
from adaras.pipeline.stats import expected_calibration_error
from adaras.profile import ModelShape, ProfileError, SteeringProfile

from .test_stages_math import I, L, synthetic_means


def _problem(i: int) -> Problem:
    return Problem(id=f"rg:t:{i}", kind="math", question=f"what is {i}+{i}?", answer=str(2 * i))


def _trace(problem: str, s: int, correct: bool, finish: str = "stop") -> dict:
    return {"key": f"{problem}#{s}", "problem": problem, "sample": s, "prompt": [1],
            "completion": "", "completion_ids": [2], "finish_reason": finish,
            "correct": correct, "extracted": None, "error": None}


def test_a_truncated_trace_is_neither_correct_nor_incorrect(tmp_path):
    problems = [_problem(0), _problem(1)]
    append_jsonl(tmp_path / "greedy.jsonl", [_trace(p.id, -1, True) for p in problems])
    # problem 0: its only "incorrect" trace was cut off by max_tokens -> no pair
    # problem 1: one finished incorrect trace, one cut off -> exactly one pair
    append_jsonl(tmp_path / "samples.jsonl", [
        _trace("rg:t:0", 0, True), _trace("rg:t:0", 1, False, "length"),
        _trace("rg:t:1", 0, True), _trace("rg:t:1", 1, True),
        _trace("rg:t:1", 2, False), _trace("rg:t:1", 3, False, "length")])
    summary = pair(tmp_path, problems, CollectArgs(probe=2, samples=4, pairs_per_problem=4))
    import json
    pairs = json.loads((tmp_path / "pairs.json").read_text())
    assert [p["incorrect"] for p in pairs] == ["rg:t:1#2"]
    assert summary["problems_with_both"] == 1 and summary["samples_truncated"] == 2


def test_the_manifest_names_the_commit_and_a_dirty_tree(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "f.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert source_state(repo) == {"commit": head.strip(), "dirty": False}
    (repo / "f.py").write_text("x = 2\n")
    assert source_state(repo)["dirty"] is True
    assert source_state(tmp_path / "nowhere") == {"commit": None, "dirty": None}
    # and every stage entry carries the state of the code that ran
    run = Run(tmp_path / "run")
    with run.stage("collect", {}):
        pass
    assert run.stage_entry("collect")["source"] == source_state()


def test_eval_stages_keep_their_problems_apart(tmp_path):
    run = Run(tmp_path / "r")
    write_problems(run.stage_dir("collect") / "problems.jsonl", [_problem(0), _problem(1)])
    write_problems(run.stage_dir("eval-dev") / "problems.jsonl", [_problem(2)])
    used, stages = other_stage_problems(run, "eval-confirm")
    assert sorted(p.id for p in used) == ["rg:t:0", "rg:t:1", "rg:t:2"]
    assert stages == ["collect", "eval-dev"]
    used, stages = other_stage_problems(run, "eval-dev")  # a stage never excludes itself
    assert stages == ["collect"]


def test_eval_refuses_a_primary_comparison_it_does_not_run(tmp_path):
    prof = SteeringProfile.random("p", ModelShape("Qwen3ForCausalLM", L, I, 8), k=4, seed=0)
    prof.save(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="--primary 'adaptive'"):
        evaluate(Run(tmp_path / "r"), EvalArgs(modes=["baseline", "always"], primary="adaptive",
                                               profile=str(tmp_path / "p.safetensors")), None)
    with pytest.raises(ValueError, match="--screen needs --alphas"):
        evaluate(Run(tmp_path / "r"), EvalArgs(screen=True,
                                               profile=str(tmp_path / "p.safetensors")), None)


@pytest.mark.parametrize("secondary", ["always", "always,adaptive", "always,always",
                                       "always,minus,baseline"])
def test_eval_refuses_a_secondary_comparison_it_cannot_make(tmp_path, secondary):
    with pytest.raises(ValueError, match="--secondary must be two of this run's configs"):
        evaluate(Run(tmp_path / "r"), EvalArgs(modes=["baseline", "always", "minus"],
                                               secondary=secondary), None)


@pytest.mark.parametrize("content", [None, "not json", '{"pairs": [{"sibling": "a"}]}',
                                     '[1, 2]', '{"other": []}'])
def test_eval_refuses_an_unreadable_list_of_problems_to_leave_out(tmp_path, content):
    path = tmp_path / "ids.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="--also-without"):
        evaluate(Run(tmp_path / "r"), EvalArgs(modes=["baseline"], also_without=str(path)),
                 None)


def test_the_near_duplicate_file_reads_as_the_test_problems_ids():
    from pathlib import Path

    from adaras.pipeline.evaluate import read_ids

    path = Path(__file__).resolve().parents[2] / "data" / "math" / "near_duplicates.json"
    ids = read_ids(str(path))
    assert len(ids) == 6 and all(i.startswith("math500-") for i in ids)


def test_the_answer_probe_is_measured_beside_the_prompt_predictor_on_the_same_answers():
    """Issue 19's held-out numbers: AUROC and ECE of answer p_fail with bootstrap
    CIs, the prompt p_fail's on the same answers, and the paired AUROC gain."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    n = 400
    correct = rng.random(n) < 0.4
    wrong = ~correct
    answer = np.clip(0.5 + 0.35 * np.where(wrong, 1, -1) + rng.normal(0, 0.2, n), 0.01, 0.99)
    prompt = np.clip(0.5 + 0.1 * np.where(wrong, 1, -1) + rng.normal(0, 0.25, n), 0.01, 0.99)
    prompt[:10] = np.nan  # problems whose prompt p_fail nobody reported
    tokens = rng.integers(100, 1000, n) + 150 * wrong  # wrong answers run a little longer
    cut = wrong & (rng.random(n) < 0.2)  # some wrong answers hit max_tokens
    tokens[cut] = 1280
    rows = [{"steering": {"answer_failure_probability": float(a)}, "tokens": int(t),
             "finish_reason": "length" if c else "stop"} for a, t, c in zip(answer, tokens, cut)]
    rows[-1] = {**rows[-1], "steering": {"answer_failure_probability": None}}  # one token
    got = answer_probe_metrics(rows, correct, seed=0, prompt_p=prompt, n=500)
    read = np.r_[np.ones(n - 1, bool), False]
    both = read & ~np.isnan(prompt)
    assert got["answers"] == n - 1 and got["unread"] == 1 and got["prompt"]["answers"] == n - 11
    # each number is the plain statistic: the head's own on every answer it read, the
    # comparison on the answers both heads read ...
    assert got["auroc"] == pytest.approx(roc_auc_score(wrong[read], answer[read]))
    assert got["calibration"]["ece"] == pytest.approx(
        expected_calibration_error(wrong[read].astype(float), answer[read])["ece"])
    want_answer = roc_auc_score(wrong[both], answer[both])
    want_prompt = roc_auc_score(wrong[both], prompt[both])
    assert got["prompt"]["auroc"] == pytest.approx(want_prompt)
    assert got["prompt"]["answer_auroc"] == pytest.approx(want_answer)
    assert got["auroc_gain"] == pytest.approx(want_answer - want_prompt)
    # ... inside its bootstrap CI; the gain's paired CI excludes 0 for a clearly better head
    for m, key in [(got, "auroc"), (got["prompt"], "auroc"), (got, "auroc_gain")]:
        assert m[f"{key}_ci95"][0] <= m[key] <= m[f"{key}_ci95"][1]
    for m in (got, got["prompt"]):
        assert m["ece_ci95"][0] <= m["calibration"]["ece"] <= m["ece_ci95"][1]
    assert got["auroc_gain_ci95"][0] > 0
    # the free baselines: the answer's length ranked as a score (AUROC only), the head's
    # gain over it, and the head on the answers not cut at max_tokens
    want_length = roc_auc_score(wrong[read], tokens[read])
    assert set(got["length"]) == {"auroc", "auroc_ci95", "answer_auroc_gain",
                                  "answer_auroc_gain_ci95"}
    assert got["length"]["auroc"] == pytest.approx(want_length)
    assert got["length"]["answer_auroc_gain"] == pytest.approx(got["auroc"] - want_length)
    lo, hi = got["length"]["answer_auroc_gain_ci95"]
    assert 0 < lo <= got["length"]["answer_auroc_gain"] <= hi
    fin = read & ~cut
    assert got["finished"]["answers"] == fin.sum() < read.sum()
    assert got["finished"]["auroc"] == pytest.approx(roc_auc_score(wrong[fin], answer[fin]))
    assert got["finished"]["length"]["auroc"] == pytest.approx(
        roc_auc_score(wrong[fin], tokens[fin]))
    assert got["finished"]["length"]["answer_auroc_gain"] == pytest.approx(
        got["finished"]["auroc"] - got["finished"]["length"]["auroc"])
    assert "calibration" not in got["finished"] and "calibration" not in got["length"]
    # the same head twice: no gain, and the paired CI is exactly zero
    same = answer_probe_metrics(rows, correct, seed=0, prompt_p=answer, n=200)
    assert same["auroc_gain"] == 0 and same["auroc_gain_ci95"] == [0.0, 0.0]
    # the answer head's own numbers, CIs included, do not depend on the head beside it
    # (every head sees the same resamples): with or without a prompt p_fail for each answer
    full = np.nan_to_num(prompt, nan=0.5)
    beside = answer_probe_metrics(rows, correct, seed=0, prompt_p=full, n=300)
    own = answer_probe_metrics(rows, correct, seed=0, n=300)
    for key in ("auroc", "auroc_ci95", "ece_ci95", "calibration", "answers", "mean"):
        assert beside[key] == own[key]
    assert beside["prompt"]["answers"] == n - 1
    # one class: calibration only, no AUROC; no prompt p_fail: nothing beside it
    alone = answer_probe_metrics(rows, np.ones(n, bool), seed=0, n=50)
    assert "auroc" not in alone and "prompt" not in alone and "ece_ci95" in alone


def _screen_results(rows):
    configs = {"baseline": {"mean_tokens": 200.0, "changed": 0.0, "fixed": 0, "broken": 0,
                            "accuracy": 0.5, "truncated": 0}}
    for alpha, changed, fixed, broken in rows:
        configs[f"alpha={alpha:g}"] = {"changed": changed, "fixed": fixed, "broken": broken,
                                       "accuracy": 0.5 + (fixed - broken) / 100,
                                       "mean_tokens": 210.0, "truncated": 0}
    return {"configs": configs}


def test_the_screen_picks_the_largest_alpha_that_moves_answers_without_a_net_loss():
    got = screen(_screen_results([(1, 0.02, 1, 1), (3, 0.12, 5, 3), (10, 0.25, 6, 6),
                                  (30, 0.60, 4, 20)]))
    assert got["alpha_star"] == 10 and got["verdict"] == "alpha* = 10"
    assert [r["net"] for r in got["alphas"]] == [0, 2, 0, -16]
    inert = screen(_screen_results([(1, 0.01, 0, 0), (3, 0.05, 2, 1)]))
    assert inert["alpha_star"] is None and inert["verdict"].startswith("inert")
    harmful = screen(_screen_results([(1, 0.01, 0, 0), (10, 0.3, 2, 9)]))
    assert harmful["alpha_star"] is None and "loses" in harmful["verdict"]


def test_ablations_keep_the_real_profiles_delta_norm():
    pairs, means = synthetic_means(np.random.default_rng(3))
    score = mean_difference(pairs, means)
    real = np.linalg.norm(select(score, 2, "mean-diff")[2].numpy())
    for selection in ("no-polarity", "no-ranking", "random"):
        delta = select(score, 2, selection, seed=1)[2].numpy()
        assert np.linalg.norm(delta) == pytest.approx(real, rel=1e-5), selection
    shape = ModelShape("Qwen3ForCausalLM", L, I, 8)
    a = SteeringProfile.random("a", shape, k=5, seed=0, scale=1.0)
    b = SteeringProfile.random("b", shape, k=3, seed=1, scale=7.0)
    scaled = same_norm(b, a)
    assert float(scaled.delta.norm()) == pytest.approx(float(a.delta.norm()), rel=1e-5)
    assert scaled.neurons.tolist() == b.neurons.tolist()  # same placement


def test_skipping_the_last_layers():
    pairs, means = synthetic_means(np.random.default_rng(0))
    score = skip_last_layers(mean_difference(pairs, means), 1)
    for selection in ("mean-diff", "no-polarity", "no-ranking", "random"):
        layers = select(score, 2, selection, seed=2)[0]
        assert layers.max() < L - 1, selection
    assert skip_last_layers(score, 0) is score


def test_a_profile_says_which_prompt_positions_it_steers():
    shape = ModelShape("Qwen3ForCausalLM", L, I, 8)
    prof = SteeringProfile.random("p", shape, k=3, seed=0)
    assert prof.steered_prompt_positions == 0
    for value, want in (("last", 1), ("all", -1), (True, -1), ("none", 0)):
        prof.provenance = {"steer_prompt": value}
        prof.validate()
        assert prof.steered_prompt_positions == want
    for bad in ("first", 2, ["last"]):
        prof.provenance = {"steer_prompt": bad}
        with pytest.raises(ProfileError, match="steer_prompt"):
            prof.validate()


def test_each_stage_records_its_engine_throughput(tmp_path):
    from adaras.pipeline.llm import Meter

    run = Run(tmp_path / "r")
    meter = Meter(requests=4, prompt_tokens=400, generated_tokens=1000, seconds=8.0).to_dict()
    assert meter["generated_tok_s"] == 125.0 and meter["prompt_tok_s"] == 50.0
    run.record_throughput("ignored", meter)  # no stage running: nowhere to put it
    with run.stage("eval", {}):
        run.record_throughput("generate", meter)
        run.record_throughput("empty", Meter().to_dict())  # nothing generated: not recorded
    assert run.stage_entry("eval")["results"]["throughput"] == {"generate": meter}
    assert run.manifest()["stages"].keys() == {"eval"}


def test_dev_hands_confirm_the_youden_cut_of_the_adaptive_arms_p_fail(tmp_path):
    """The adaptive arm reports the p_fail cut that maximises TPR - FPR against
    the baseline's failures: the threshold a dev stage hands to confirm."""
    rng = np.random.default_rng(3)
    problems = [_problem(i) for i in range(40)]
    wrong = rng.random(40) < 0.5
    p_fail = np.clip(0.3 * wrong + rng.random(40) * 0.7, 0.01, 0.99)  # informative, not perfect
    rows = []
    for i, prob in enumerate(problems):
        base = {"problem": prob.id, "correct": not wrong[i], "extracted": str(i), "tokens": 5,
                "finish_reason": "stop"}
        rows.append({**base, "config": "baseline", "steering": None})
        rows.append({**base, "config": "adaptive", "steering": {
            "failure_probability": float(p_fail[i]), "applied": bool(p_fail[i] >= 0.5),
            "threshold": 0.5}})
    append_jsonl(tmp_path / "generations.jsonl", rows)
    configs = {"baseline": None, "adaptive": {"mode": "adaptive", "alpha": 0.3}}
    got = summarize(tmp_path, problems, configs, EvalArgs(bootstrap=50))
    cut = got["configs"]["adaptive"]["youden_threshold"]

    def youden(c: float) -> float:
        return (p_fail[wrong] >= c).mean() - (p_fail[~wrong] >= c).mean()

    assert youden(cut) == pytest.approx(max(youden(c) for c in p_fail))
    assert youden(cut) > youden(0.5)  # the stored cut is not simply the one that ran


def test_an_answer_cut_at_max_tokens_counts_as_a_failure_whatever_it_had_boxed(tmp_path):
    """The registered rule (truncations count as failures in every arm): a cut
    answer whose last boxed answer grades right is wrong in accuracy, in the
    comparisons and in outcomes.jsonl; collect's accuracy and best-of-n count
    it the same way; the grader's own verdict stays in the stored rows."""
    import json

    from adaras.pipeline.best_of_n import BestOfNArgs
    from adaras.pipeline.best_of_n import summarize as summarize_best

    problems = [_problem(i) for i in range(4)]
    rows = []
    for i, prob in enumerate(problems):
        base = {"problem": prob.id, "correct": True, "extracted": str(2 * i), "tokens": 9,
                "finish_reason": "stop", "steering": None}
        rows.append({**base, "config": "baseline"})
        # `always` writes the right answer on problems 0 and 1, then loops to the cap
        rows.append({**base, "config": "always", "steering": {"mode": "always"},
                     **({"finish_reason": "length", "tokens": 64} if i < 2 else {})})
    append_jsonl(tmp_path / "generations.jsonl", rows)
    configs = {"baseline": None, "always": {"mode": "always", "alpha": 0.3}}
    got = summarize(tmp_path, problems, configs, EvalArgs(bootstrap=50))["configs"]["always"]
    assert got["accuracy"] == 0.5 and got["broken"] == 2 and got["truncated"] == 2
    outcomes = [json.loads(x) for x in (tmp_path / "outcomes.jsonl").read_text().splitlines()]
    assert [o["correct"] for o in outcomes if o["arm"] == "always"] == [False, False, True, True]
    stored = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert all(r["correct"] for r in stored)  # the grader's verdict is kept
    # collect: a cut greedy answer graded right is not counted right
    append_jsonl(tmp_path / "greedy.jsonl", [_trace("rg:t:0", -1, True, "length"),
                                             _trace("rg:t:1", -1, True)])
    append_jsonl(tmp_path / "samples.jsonl", [_trace("rg:t:0", 0, True), _trace("rg:t:0", 1, False),
                                              _trace("rg:t:0", 2, True, "length")])
    summary = pair(tmp_path, problems[:2], CollectArgs(probe=1, samples=3))
    assert summary["greedy_accuracy"] == 0.5 and summary["sample_accuracy"] == pytest.approx(1 / 3)
    # best-of-n: the shortest sample is cut and boxed the right answer: it counts wrong
    (tmp_path / "bon").mkdir()
    append_jsonl(tmp_path / "bon" / "samples.jsonl", [
        {**_trace("rg:t:0", s, c, f), "tokens": t, "answer_p_fail": p, "extracted": "0"}
        for s, (c, f, t, p) in enumerate([(True, "length", 5, 0.1), (True, "stop", 9, 0.2)])])
    best = summarize_best(tmp_path / "bon", problems[:1], {},
                          BestOfNArgs(profile="p", samples=2, ks=[2], bootstrap=20))
    assert best["methods"]["probe best-of-2"]["accuracy"] == 0.0  # lowest p_fail: the cut one
    assert best["methods"]["shortest of 2"]["accuracy"] == 0.0
    assert best["methods"]["random sample of 2"]["accuracy"] == 0.5
    # within the problem, the cut (wrong) sample has the lower p_fail and is the shorter:
    # both orderings are wrong on the one pair
    for key in ("within_problem_auroc", "within_problem_auroc_length"):
        assert (best[key]["auroc"], best[key]["pairs"]) == (0.0, 1)


def test_brier_selective_accuracy_and_calibration_slope_follow_their_definitions():
    from adaras.pipeline.stats import brier, calibration_slope, selective_accuracy

    wrong = np.array([1, 0, 1, 0, 0, 1, 0, 0, 1, 0], bool)
    p = np.array([0.9, 0.1, 0.8, 0.3, 0.2, 0.6, 0.4, 0.05, 0.7, 0.5])
    assert brier(wrong, p) == pytest.approx(np.mean((p - wrong) ** 2))
    sel = selective_accuracy(wrong, p)
    # half: the five lowest scores (0.05, 0.1, 0.2, 0.3, 0.4) are all right
    assert sel["0.5"] == 1.0 and sel["0.7"] == pytest.approx(6 / 7) and sel["0.9"] == \
        pytest.approx(6 / 9)
    rng = np.random.default_rng(0)
    q = rng.uniform(0.05, 0.95, 4000)
    y = rng.random(4000) < q  # calibrated by construction: slope near 1
    s = calibration_slope(y, q, n=100)
    assert 0.85 < s["slope"] < 1.15 and s["slope_ci95"][0] < s["slope"] < s["slope_ci95"][1]
    sharp = np.clip(0.5 + 2 * (q - 0.5), 0.01, 0.99)  # overconfident: slope below 1
    assert calibration_slope(y, sharp, n=50)["slope"] < 0.7


def test_the_logprob_confidences_are_scored_beside_the_probe_on_the_same_answers():
    """eval --logprobs: each answer's DeepConf and logprob scores against the
    head, with the head's paired gain over each; the best ranks best here."""
    from sklearn.metrics import roc_auc_score

    from adaras.confidence import Knobs, trace_scores

    rng = np.random.default_rng(5)
    n = 200
    correct = rng.random(n) < 0.5
    wrong = ~correct
    rows = []
    for w in wrong:
        t = int(rng.integers(50, 300))
        conf = rng.normal(9 - 1.5 * w, 1.0, t)  # wrong answers are less confident
        rows.append({"steering": {"answer_failure_probability":
                                  float(np.clip(0.5 + 0.3 * (1 if w else -1)
                                                + rng.normal(0, 0.15), 0.01, 0.99))},
                     "tokens": t, "finish_reason": "stop",
                     "confidence": {"lp": (-0.2 - 0.1 * w + rng.normal(0, 0.05, t)).tolist(),
                                    "conf": conf.tolist(), "sc": (conf / 5).tolist()}})
    got = answer_probe_metrics(rows, correct, seed=0, n=200, knobs=Knobs(window=32, tail=64))
    c = got["confidence"]
    assert c["knobs"] == {"window": 32, "tail": 64, "bottom_fraction": 0.1}
    mean = np.array([trace_scores(r["confidence"], Knobs(32, 64))["conf_mean"] for r in rows])
    assert c["scores"]["conf_mean"]["auroc"] == pytest.approx(roc_auc_score(wrong, mean))
    assert c["scores"]["conf_mean"]["answer_auroc_gain"] == pytest.approx(
        got["auroc"] - c["scores"]["conf_mean"]["auroc"])
    assert c["best"] == max(c["scores"], key=lambda k: c["scores"][k]["auroc"])
    assert set(c["scores"]["conf_tail"]["selective_accuracy"]) == {"0.5", "0.7", "0.9"}
    assert "calibration" not in c["scores"]["conf_mean"]  # a ranking, not a probability
    assert got["brier"] is not None and got["slope"] is not None
    # answers without per-token logprobs: no confidence block
    bare = [{k: v for k, v in r.items() if k != "confidence"} for r in rows]
    assert "confidence" not in answer_probe_metrics(bare, correct, seed=0, n=50)
