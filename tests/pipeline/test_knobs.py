"""pipeline.knobs fixes the held-out knobs from a validation capture by the
registered rules: checked on made-up validation rows whose answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adaras.pipeline import knobs as K


def _rows(n=120, seed=0):
    """Wrong answers have a higher probe logit and dip in confidence for a
    stretch of 40 tokens; right ones do not. Answers differ in their level of
    confidence, so the mean over a whole answer barely sees the dip."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        wrong = int(i % 3 != 0)
        t = int(rng.integers(200, 700))
        conf = rng.normal(8.0 + rng.normal(0, 0.5), 0.3, size=t)  # answers differ in level
        if wrong:
            at = int(rng.integers(0, t - 40))
            conf[at:at + 40] -= 3.0
        logit = rng.normal(1.0 if wrong else -1.0, 1.0)
        rows.append({"key": f"k{i}", "problem": f"p{i // 2}", "label": wrong,
                     "answer_logit": logit, "tokens": t,
                     "running_logits": [logit * (j + 1) / 4 for j in range((t - 2) // 64)],
                     "confidence": {"lp": (-0.1 * np.ones(t)).tolist(), "conf": conf.tolist(),
                                    "sc": (conf / 10).tolist()}})
    return rows


@pytest.fixture
def folder(tmp_path):
    rows = _rows()
    (tmp_path / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [{"problem": f"p{i}", "label": int(i % 2), "prompt_logit": 0.5 * (i % 2) + 0.1 * i % 1}
               for i in range(40)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return tmp_path


def test_the_window_that_sees_a_40_token_dip_beats_the_whole_answer(folder):
    out = K.fix_knobs(folder)
    assert out["window"] in (32, 64)  # a group about the dip's length finds it
    assert out["best_logprob_score"] in ("conf_lowest_group", "conf_bottom10")
    assert out["logprob_aurocs_validation"]["conf_lowest_group"] > \
        out["logprob_aurocs_validation"]["conf_mean"]


def test_platt_map_calibrates_the_logit_it_was_fit_on(folder):
    out = K.fix_knobs(folder)
    rows = K.read_rows(folder / "traces.jsonl")
    y = np.array([r["label"] for r in rows])
    m = out["calibration"]["answer"]
    p = K.sigmoid(m["a"] * np.array([r["answer_logit"] for r in rows]) + m["b"])
    assert p.mean() == pytest.approx(y.mean(), abs=1e-4)  # a fitted logistic matches the base rate


def test_bounds_follow_their_rules():
    y = np.array([0] * 12 + [1] * 12)
    p = np.linspace(0.01, 0.99, 24)
    t = K.finish_bound(p, y)
    below = p < t
    assert below.sum() >= 10 and (1 - y[below]).mean() >= 0.8
    assert K.finish_bound(p, 1 - y) is None  # the low scores are all wrong: no safe bound
    running = [(300, float(v), int(v > 0.5)) for v in p] + [(64, 0.99, 0)] * 50
    a = K.abort_bound(running)
    assert a is not None and all(yy == 1 for tok, v, yy in running if tok >= 256 and v > a)
    assert K.abort_bound([(64, 0.9, 1)] * 20) is None  # no reading after 256 tokens


def test_the_combined_score_is_cross_validated_by_problem(folder):
    out = K.fix_knobs(folder)
    c = out["combined"]
    assert len(c["coef"]) == len(c["inputs"]) == 8
    assert c["earns_its_place"] == (c["cv_auroc_validation"] > out["heads_auroc_validation"]["answer"]
                                    and c["cv_auroc_validation"]
                                    > out["logprob_aurocs_validation"][out["best_logprob_score"]])


def _heads():
    from types import SimpleNamespace

    import torch

    from adaras.predictor import FailurePredictor

    torch.manual_seed(0)
    answer = FailurePredictor(torch.arange(6, dtype=torch.int32) % 2,
                              torch.arange(6, dtype=torch.int32), hidden=8).eval()
    prompt = FailurePredictor(torch.arange(4, dtype=torch.int32) % 2,
                              torch.arange(4, dtype=torch.int32) + 9, hidden=8).eval()
    return SimpleNamespace(answer_predictor=answer, predictor=prompt, threshold=0.5,
                           provenance={})


def test_calibration_folds_an_affine_map_into_each_head_and_keeps_the_gate():
    from adaras.pipeline.validation import head_logit

    prof = _heads()
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(int(rng.integers(3, 20)), 6)).astype(np.float32) for _ in range(30)]
    ps = [rng.normal(size=(int(rng.integers(3, 20)), 4)).astype(np.float32) for _ in range(40)]
    raw_a = np.array([head_logit(prof.answer_predictor, x) for x in xs])
    raw_p = np.array([head_logit(prof.predictor, x) for x in ps])
    prof.threshold = float(K.sigmoid(np.median(raw_p)))  # a gate that splits these prompts
    before_gate = K.sigmoid(raw_p) >= prof.threshold
    cal = {"answer": {"a": 0.6, "b": -0.4}, "prompt": {"a": 1.7, "b": 0.3}}
    out = K.calibrate(prof, cal, "validation split")
    new_a = np.array([head_logit(out.answer_predictor, x) for x in xs])
    new_p = np.array([head_logit(out.predictor, x) for x in ps])
    np.testing.assert_allclose(new_a, 0.6 * raw_a - 0.4, atol=1e-5)
    np.testing.assert_allclose(new_p, 1.7 * raw_p + 0.3, atol=1e-5)
    assert ((K.sigmoid(new_p) >= out.threshold) == before_gate).all()  # the same prompts gated
    assert 0 < before_gate.sum() < len(ps)
    assert out.provenance["calibration"]["fit_on"] == "validation split"
    with pytest.raises(ValueError, match="Platt slope"):
        K.calibrate(_heads(), {**cal, "answer": {"a": -1.0, "b": 0}}, "x")


def test_held_out_answers_are_scored_with_the_registered_knobs(tmp_path, folder):
    """score_answers applies the validation's Platt map and knobs to an eval
    arm's answers: the calibrated probe is the map of the raw one, the gain is
    measured against the registered best score, and each probability gets a
    reliability diagram."""
    from sklearn.metrics import roc_auc_score

    from adaras.pipeline.score_answers import score_answers

    knobs = K.fix_knobs(folder)
    rows = []
    for i, r in enumerate(_rows(90, seed=3)):
        p = float(K.sigmoid(r["answer_logit"]))
        rows.append({"config": "baseline" if i < 80 else "always", "problem": r["problem"],
                     "correct": not r["label"], "finish_reason": "stop", "tokens": r["tokens"],
                     "steering": {"answer_failure_probability": p},
                     "confidence": r["confidence"]})
    stage = tmp_path / "heldout"
    stage.mkdir()
    (stage / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = score_answers(stage, knobs, "baseline", stage, n=100)
    y = np.array([not r["correct"] for r in rows[:80]])
    raw = np.array([r["steering"]["answer_failure_probability"] for r in rows[:80]])
    assert out["answers"] == 80
    assert out["scores"]["probe_raw"]["auroc"] == pytest.approx(roc_auc_score(y, raw))
    # a Platt map with a > 0 keeps the ranking: the same AUROC, another calibration
    assert out["scores"]["probe"]["auroc"] == pytest.approx(out["scores"]["probe_raw"]["auroc"])
    assert out["probe_gain_over_registered_best"]["score"] == knobs["best_logprob_score"]
    g = out["probe_gain_over_registered_best"]
    assert g["gain"] == pytest.approx(out["scores"]["probe"]["auroc"]
                                      - out["scores"][g["score"]]["auroc"])
    assert {"brier", "slope", "calibration"} <= set(out["scores"]["probe"])
    assert "brier" not in out["scores"]["conf_mean"]  # a ranking, not a probability
    assert (stage / "reliability-probe.png").stat().st_size > 0
    assert ("combined" in out["scores"]) == knobs["combined"]["earns_its_place"]


def test_the_validation_split_is_the_one_the_heads_were_fit_with():
    """capture-validation reads stage 1's committed traces and draws the heads'
    validation splits as train-predictor did: the sizes its metrics recorded."""
    from pathlib import Path

    from adaras.pipeline.validation import validation_traces

    stage1 = (Path(__file__).resolve().parents[2] / "docs" / "results"
              / "qwen2.5-coder-1.5b-math-study" / "stage1")
    traces, prompts = validation_traces(stage1)
    answer = json.loads((stage1 / "train-answer-probe-metrics.json").read_text())
    prompt = json.loads((stage1 / "train-predictor-metrics.json").read_text())
    assert len(traces) == answer["n"]["val"] == 144
    assert len({t["problem"] for t in traces}) == answer["problems"]["val"] == 64
    assert len(prompts) == prompt["n"]["val"] == 64
    assert all(len(t["completion"]) > 1 and t["prompt"] for t in traces)


def test_the_prompt_heads_validation_problems_are_drawn_on_the_labels_it_was_trained_with():
    """Stage 1's prompt head was split on the grader's verdict alone (before the
    cut rule); its splits are stratified by label, so drawing them on the cut
    rule's labels would move problems between them and read training problems
    as validation ones (the first capture did: 34 of its 64 were training problems)."""
    from pathlib import Path

    from adaras.pipeline.grade import counts_as_correct
    from adaras.pipeline.train import TrainArgs, split_problems
    from adaras.pipeline.validation import read_rows, validation_traces

    stage1 = (Path(__file__).resolve().parents[2] / "docs" / "results"
              / "qwen2.5-coder-1.5b-math-study" / "stage1")
    greedy = read_rows(stage1, "greedy")
    a = TrainArgs()
    as_trained = split_problems(np.array([int(not r["correct"]) for r in greedy]),
                                a.val_fraction, a.test_fraction, a.seed)
    by_rule = split_problems(np.array([int(not counts_as_correct(r)) for r in greedy]),
                             a.val_fraction, a.test_fraction, a.seed)
    _, prompts = validation_traces(stage1)
    got = {r["problem"] for r in prompts}
    assert got == {greedy[i]["problem"] for i in as_trained["val"]}
    # the cut rule's split would have read 34 of the head's training problems as validation
    wrong = {greedy[i]["problem"] for i in by_rule["val"]}
    assert len(wrong & {greedy[i]["problem"] for i in as_trained["train"]}) == 34
