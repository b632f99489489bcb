"""The whole pipeline on a tiny random model, through the steered engine:
collect -> identify (+ ablations) -> train-predictor -> eval (+ sweeps), with
the CLI, resuming, and the behaviour each stage promises.

A random model does not solve problems, so the test first samples the
model's answers with the same seeds the pipeline will use and then writes a
JSONL problem set whose reference answers make some traces right and some
wrong (and some greedy answers right, some wrong). The pipeline itself runs
unchanged on that file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adaras.pipeline.capture import load_parts
from adaras.pipeline.collect import CollectArgs, collect
from adaras.pipeline.data import load_problems
from adaras.pipeline.evaluate import EvalArgs, evaluate
from adaras.pipeline.identify import IdentifyArgs, identify
from adaras.pipeline.llm import EngineOptions, open_engine
from adaras.pipeline.run import Run, StageArgsChanged, read_jsonl
from adaras.pipeline.stats import auroc, expected_calibration_error
from adaras.pipeline.train import TrainArgs, train_predictor
from adaras.profile import SteeringProfile
from adaras.tiny_models import make_tiny_model

pytestmark = pytest.mark.engine

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

N_PROBLEMS, PROBE, SAMPLES, MAX_TOKENS = 24, 6, 6, 48
# A random model never stops on its own, and traces cut off by max_tokens never
# pair; stopping at any of these words (one token each in the tiny vocabulary,
# about 1 in 20 random tokens) ends most traces with finish_reason "stop".
STOP = [" apples", " coins", " students", " books", " hours", " therefore", " total", " each",
        " more", " less", " step", " first", " then", " answer", " question", " equals",
        " times", " minus", " with", " from", " have", " this", " that", " was", " and"]
COLLECT = dict(problems=N_PROBLEMS, probe=PROBE, samples=SAMPLES, temperature=1.0,
               max_tokens=MAX_TOKENS, seed=0, stop=STOP)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("pipe-model") / "qwen3", "qwen3")


@pytest.fixture(scope="module")
def engine(tiny):
    from adaras.pipeline.llm import close_engines

    yield EngineOptions(model=str(tiny), dtype="float32", max_model_len=512, max_num_seqs=32,
                        kv_cache_gib=1, chunk=64)
    close_engines()


def _last_number(text: str) -> str | None:
    from math_verify import parse

    got = parse(text)
    return str(got[-1]) if got else None


def write_problems(path, n, offset=0, answers=None):
    with path.open("w") as f:
        for i in range(n):
            answer = (answers or {}).get(i, "12345")
            f.write(json.dumps({"id": f"t{offset + i}",
                                "question": f"what is {offset + i} plus {i % 7}?",
                                "answer": answer}) + "\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory, engine):
    """A run whose collect stage saw both right and wrong answers."""
    root = tmp_path_factory.mktemp("pipe-run")
    data = root / "problems.jsonl"
    write_problems(data, N_PROBLEMS)
    # Dry run with placeholder answers: what the model says, with the pipeline's seeds.
    dry = Run(root / "dry")
    with pytest.raises(RuntimeError, match="no probe problem has both"):  # all answers wrong
        collect(dry, CollectArgs(dataset=str(data), **COLLECT), engine)
    answers = {}
    greedy = read_jsonl(dry.root / "collect" / "greedy.jsonl")
    samples = read_jsonl(dry.root / "collect" / "samples.jsonl")
    for i, r in enumerate(greedy):
        said = _last_number(r["completion"])
        if i < PROBE:  # probe: the answer of one sampled trace that another trace missed
            said_s = [_last_number(s["completion"]) for s in samples
                      if s["problem"] == r["problem"] and s["finish_reason"] != "length"]
            found = [a for a in said_s if a is not None and said_s.count(a) < len(said_s)]
            if found:
                answers[i] = found[0]
        elif said is not None and i % 2 == 0:  # every other greedy answer right
            answers[i] = said
    write_problems(data, N_PROBLEMS, answers=answers)
    assert sum(i < PROBE for i in answers) >= 2, "the tiny model said too few numbers"
    real = Run(root / "run")
    collect(real, CollectArgs(dataset=str(data), **COLLECT), engine)
    return real


def test_collect_pairs_right_with_wrong_traces_of_the_same_prompt(run):
    out = run.root / "collect"
    samples = {r["key"]: r for r in read_jsonl(out / "samples.jsonl")}
    assert len(samples) == PROBE * SAMPLES
    pairs = json.loads((out / "pairs.json").read_text())
    assert pairs
    for p in pairs:
        a, b = samples[p["correct"]], samples[p["incorrect"]]
        assert a["correct"] and not b["correct"]
        assert a["problem"] == b["problem"] == p["problem"] and a["prompt"] == b["prompt"]
    per_problem = {}
    for p in pairs:
        per_problem[p["problem"]] = per_problem.get(p["problem"], 0) + 1
    assert max(per_problem.values()) <= 4
    greedy = read_jsonl(out / "greedy.jsonl")
    assert len(greedy) == N_PROBLEMS
    assert 0 < sum(r["correct"] for r in greedy) < N_PROBLEMS  # both labels
    entry = run.stage_entry("collect")
    assert entry["status"] == "done" and entry["results"]["pairs"] == len(pairs)
    assert (out / "accuracy.png").stat().st_size > 0


def test_collect_resumes_without_generating_again(run, engine, monkeypatch):
    import adaras.pipeline.collect as collect_module

    before = (run.root / "collect" / "samples.jsonl").read_text()
    args = run.stage_entry("collect")["args"]
    # every trace in place (a rerun on a new machine with the committed traces): no engine
    monkeypatch.setattr(collect_module, "open_engine", _no_engine)
    collect(run, CollectArgs(**{k: v for k, v in args.items() if k != "engine"}), engine)
    assert (run.root / "collect" / "samples.jsonl").read_text() == before
    with pytest.raises(StageArgsChanged, match="samples"):
        collect(run, CollectArgs(**{**{k: v for k, v in args.items() if k != "engine"},
                                    "samples": 3}), engine)


@pytest.fixture(scope="module")
def profile_path(run, engine):
    return identify(run, IdentifyArgs(k=8, alpha=0.5), engine)


def test_identify_captures_teacher_forced_means_and_selects_by_polarity(run, engine, tiny,
                                                                         profile_path):
    import transformers

    from tests.helpers.hf import mean_activations

    prof = SteeringProfile.load(profile_path)
    assert prof.k == 8 and prof.default_alpha == 0.5
    assert sum(prof.layer_histogram()) == 8
    assert prof.provenance["selection"] == "mean-diff"
    pairs = json.loads((run.root / "collect" / "pairs.json").read_text())
    means = load_parts(run.root / "capture", "trace")
    # the engine's capture equals a teacher-forced HF forward over the trace
    trace = next(r for r in read_jsonl(run.root / "collect" / "samples.jsonl")
                 if r["key"] == pairs[0]["correct"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    want = mean_activations(model, trace["prompt"] + trace["completion_ids"], len(trace["prompt"]))
    torch.testing.assert_close(torch.from_numpy(means[trace["key"]]), want, atol=1e-4, rtol=1e-4)
    # every chosen neuron flips sign, delta = S there, and none left out beats them
    pos = np.mean([means[p["correct"]] for p in pairs], axis=0)
    neg = np.mean([means[p["incorrect"]] for p in pairs], axis=0)
    s = pos - neg
    ls, ns = prof.layers.numpy(), prof.neurons.numpy()
    assert (pos[ls, ns] * neg[ls, ns] < 0).all()
    np.testing.assert_allclose(prof.delta.numpy(), s[ls, ns], rtol=1e-4, atol=1e-6)
    mask = (pos * neg < 0)
    mask[ls, ns] = False
    assert np.abs(s[mask]).max() <= np.abs(prof.delta.numpy()).min() + 1e-6
    assert (run.root / "identify" / "rcn_layers.png").exists()


@pytest.mark.parametrize("selection", ["no-polarity", "no-ranking", "random"])
def test_identify_ablations_write_their_own_profiles(run, engine, profile_path, selection):
    path = identify(run, IdentifyArgs(k=8, selection=selection), engine)
    assert path.parent.name == f"identify-{selection}"
    prof = SteeringProfile.load(path)
    main = SteeringProfile.load(profile_path)
    assert prof.k == 8 and prof.provenance["selection"] == selection
    if selection == "random":
        np.testing.assert_allclose(np.sort(prof.delta.numpy()), np.sort(main.delta.numpy()))


def test_identify_reference_recipe_contrasts_unpaired_means_over_question_and_trace(
        run, engine, tiny):
    """--recipe reference: every token of "Question: ...\nThinking process:<trace>" (no chat
    template), all correct traces against all incorrect ones, its ranking; the profile
    steers the last prompt position, carries sigma and a split-half report."""
    import transformers

    from adaras.pipeline.identify import contrast, probe_traces, reference_text, select
    from tests.helpers.hf import mean_activations

    args = IdentifyArgs(k=8, recipe="reference", per_side=2)
    path = identify(run, args, engine)
    assert path.parent.name == "identify-reference"
    prof = SteeringProfile.load(path)
    assert prof.provenance["recipe"] == "reference" and prof.steered_prompt_positions == 1
    assert prof.sigma is not None and prof.dose_in_sigma() > 0
    groups = probe_traces(run, args)
    assert all(1 <= len(pos) <= 2 and 1 <= len(neg) <= 2 for _, pos, neg in groups)
    means = load_parts(run.root / "capture", "reference-trace")
    # the capture is the HF mean over every token of the reference's text
    pid, pos, _ = groups[0]
    trace = next(r for r in read_jsonl(run.root / "collect" / "samples.jsonl") if r["key"] == pos[0])
    question = next(p for p in read_jsonl(run.root / "collect" / "problems.jsonl")
                    if p["id"] == pid)["question"]
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    ids = tok.encode(reference_text(question, trace["completion"]))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    torch.testing.assert_close(torch.from_numpy(means[pos[0]]), mean_activations(model, ids, 0),
                               atol=1e-4, rtol=1e-4)
    layers, neurons, delta = select(contrast(groups, means, "reference"), 8, "reference")
    assert torch.equal(prof.layers, layers) and torch.equal(prof.neurons, neurons)
    assert torch.equal(prof.delta, delta)
    summary = json.loads((path.parent / "summary.json").read_text())
    assert summary["split_half"]["k"] == 8 or summary["split_half"]["overlap"] is None


@pytest.fixture(scope="module")
def trained(run, engine, profile_path):
    return train_predictor(run, TrainArgs(features=16, hidden=32, max_epochs=60, lr=1e-3), engine)


def test_train_predictor_stores_a_working_predictor_and_threshold(run, trained):
    prof = SteeringProfile.load(trained)
    assert prof.predictor is not None and prof.predictor.num_features == 16
    assert 0.0 <= prof.threshold <= 1.0
    metrics = json.loads((run.root / "train-predictor" / "metrics.json").read_text())
    assert sum(metrics["n"].values()) == N_PROBLEMS
    assert set(metrics["baselines_auroc_test"]) == {"l1_logreg_last_token", "l1_logreg_mean_pool",
                                                     "length"}
    preds = json.loads((run.root / "train-predictor" / "predictions.json").read_text())
    test = preds["split"]["test"]
    y = np.array(preds["label_failure"])[test].astype(float)
    p = np.array(preds["p_fail"])[test]
    # the free baseline: the prompt's length in tokens, unfitted
    prompt_len = {r["key"]: len(r["prompt"]) for r in read_jsonl(run.root / "collect" /
                                                                   "greedy.jsonl")}
    assert metrics["baselines_auroc_test"]["length"] == auroc(
        y, np.array([prompt_len[preds["keys"][i]] for i in test], dtype=float))
    assert metrics["ece_test"] == pytest.approx(expected_calibration_error(y, p)["ece"])
    assert metrics["ece_test_ci95"][1] >= metrics["ece_test_ci95"][0] >= 0
    # the stored predictor reproduces the predictions it was evaluated with
    tokens = load_parts(run.root / "capture", next(
        f.name.split("-0")[0] for f in (run.root / "capture").glob("prompt-tokens-*.npz")))
    key = preds["keys"][0]
    assert prof.predictor.prob(torch.from_numpy(tokens[key])) == pytest.approx(
        preds["p_fail"][0], abs=1e-6)
    for name in ("roc.png", "training.png"):
        assert (run.root / "train-predictor" / name).exists()


def test_the_answer_probe_is_a_second_head_read_after_the_prompt(run, engine, tiny, trained):
    """train-predictor --target answer: every collected trace, read at the
    positions after its prompt; the stored head equals an HF teacher-forced
    read of those positions; the prompt head is kept."""
    import transformers

    from adaras.pipeline.train import answer_traces
    from tests.helpers.hf import capture_neurons

    path = train_predictor(run, TrainArgs(features=16, hidden=32, max_epochs=60, lr=1e-3,
                                          target="answer"), engine)
    assert path.parent.name == "train-answer-probe"
    prof, before = SteeringProfile.load(path), SteeringProfile.load(trained)
    assert prof.answer_predictor is not None and prof.answer_predictor.num_features == 16
    assert prof.predictor.config() == before.predictor.config()  # the prompt head is kept
    assert prof.threshold == before.threshold
    traces = answer_traces(run)
    greedy = read_jsonl(run.root / "collect" / "greedy.jsonl")
    samples = read_jsonl(run.root / "collect" / "samples.jsonl")
    assert len(traces) == sum(len(r["completion_ids"]) >= 2 for r in greedy + samples)
    preds = json.loads((run.root / "train-answer-probe" / "predictions.json").read_text())
    split = {k: set(v) for k, v in preds["split"].items()}
    problems = {name: {traces[i]["problem"] for i in idx} for name, idx in split.items()}
    assert not problems["train"] & problems["test"]  # a problem's traces share a split
    assert not problems["train"] & problems["val"]
    # labels: the graded answer is wrong, a truncated one too
    by_key = {r["key"]: r for r in greedy + samples}
    for key, label in zip(preds["keys"], preds["label_failure"]):
        r = by_key[key]
        assert label == int(r["finish_reason"] == "length" or not r["correct"])
    # beside the head: the answer's length (positions read), and the head without the
    # answers cut at max_tokens
    metrics = json.loads((run.root / "train-answer-probe" / "metrics.json").read_text())
    test = preds["split"]["test"]
    y = np.array(preds["label_failure"])
    read = np.array([len(t["ids"]) - t["start"] for t in traces], dtype=float)
    assert metrics["baselines_auroc_test"]["length"] == auroc(y[test], read[test])
    greedy_test = [i for i in test if traces[i]["greedy"]]
    assert metrics["baselines_auroc_test_greedy"]["length"] == auroc(y[greedy_test],
                                                                     read[greedy_test])
    fin = [i for i in test if by_key[preds["keys"][i]]["finish_reason"] != "length"]
    assert metrics["auroc_test_finished"] == auroc(y[fin], np.array(preds["p_fail"])[fin])
    # the head on an HF teacher-forced read of prompt + answer[:-1], from the prompt on
    i = next(j for j, t in enumerate(traces) if len(t["ids"]) - t["start"] >= 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    head = prof.answer_predictor
    with capture_neurons(model, head.feature_layers, head.feature_neurons) as got:
        model(torch.tensor([traces[i]["ids"]]))
    x = got[0][0, traces[i]["start"]:]  # [T_answer, F]
    assert head.prob(x) == pytest.approx(preds["p_fail"][i], abs=1e-5)


def test_eval_with_the_answer_probe_reads_every_arm_and_changes_no_answer(run, engine, trained,
                                                                          tmp_path, monkeypatch):
    """--answer-probe: every arm (the baseline too) reports each answer's
    answer p_fail, in outcomes.jsonl and per arm in results and report; the
    answers are those of a run without it."""
    path = train_predictor(run, TrainArgs(features=16, hidden=32, max_epochs=60, lr=1e-3,
                                          target="answer"), engine)  # done above: resumed
    data = tmp_path / "probe.jsonl"
    write_problems(data, 6, offset=300)
    args = dict(dataset=str(data), problems=6, modes=["baseline", "always", "adaptive"],
                max_tokens=12, bootstrap=100, profile=str(path))
    probed = Run(tmp_path / "probed")
    results = evaluate(probed, EvalArgs(**args, answer_probe=True), engine)
    plain = evaluate(Run(tmp_path / "plain"), EvalArgs(**args), engine)
    outcomes = read_jsonl(probed.root / "eval" / "outcomes.jsonl")
    assert len(outcomes) == 18 and all(0 < o["answer_p_fail"] < 1 for o in outcomes)
    prompt_p = {o["problem"]: o["p_fail"] for o in outcomes if o["arm"] == "adaptive"}
    for name in ("baseline", "always", "adaptive"):
        a = results["configs"][name]["answer_probe"]
        assert a["answers"] == 6 and a["mean"] == pytest.approx(np.mean(
            [o["answer_p_fail"] for o in outcomes if o["arm"] == name]))
        assert "answer_probe" not in plain["configs"][name]
        # beside it, the prompt predictor's p_fail of the same problems (from the gate's arm)
        mine = [o for o in outcomes if o["arm"] == name]
        wrong = np.array([not o["correct"] for o in mine], dtype=float)
        assert a["prompt"]["answers"] == 6 and a["prompt"]["calibration"]["ece"] == \
            pytest.approx(expected_calibration_error(
                wrong, np.array([prompt_p[o["problem"]] for o in mine]))["ece"])
        # the free baselines count the same answers
        assert a["finished"]["answers"] == sum(not o["truncated"] for o in mine)
    report = (probed.root / "eval" / "report.md").read_text()
    assert "## Answer probe" in report and "| length AUROC |" in report
    got = {(r["config"], r["problem"]): r["completion"]
           for r in read_jsonl(probed.root / "eval" / "generations.jsonl")}
    want = {(r["config"], r["problem"]): r["completion"]
            for r in read_jsonl(Run(tmp_path / "plain").root / "eval" / "generations.jsonl")}
    assert got == want
    with pytest.raises(ValueError, match="answer head"):
        evaluate(Run(tmp_path / "none"), EvalArgs(**{**args, "profile": str(trained)},
                                                  answer_probe=True), engine)
    # without --profile, a run that trained both heads evaluates the profile with both
    got = evaluate(run, EvalArgs(**{**args, "profile": None, "modes": ["baseline"]},
                                 answer_probe=True, stage="probe-default"), engine)
    assert got["profile"] == str(path) and got["configs"]["baseline"]["answer_probe"]["answers"]

    # best-of-n on the same problems: samples read by the probe, methods as documented
    from adaras.pipeline.best_of_n import BestOfNArgs, best_of_n

    bon = best_of_n(probed, BestOfNArgs(profile=str(path), problems=4, samples=3, ks=[2, 3],
                                        temperature=1.0, max_tokens=10, bootstrap=50), engine)
    samples = read_jsonl(probed.root / "best-of-n" / "outcomes.jsonl")
    assert len(samples) == 12 and all(0 < r["answer_p_fail"] < 1 for r in samples)
    by = {}
    for r in samples:
        by.setdefault(r["problem"], []).append(r)
    best2 = [min(rows[:2], key=lambda r: r["answer_p_fail"])["correct"] for rows in by.values()]
    assert bon["methods"]["probe best-of-2"]["accuracy"] == pytest.approx(np.mean(best2))
    assert bon["reference"] == "greedy" and bon["methods"]["greedy"]["problems"] == 4
    base = {o["problem"]: o["correct"] for o in outcomes if o["arm"] == "baseline"}
    assert bon["methods"]["greedy"]["accuracy"] == pytest.approx(np.mean([base[i] for i in by]))
    short = [min(rows[:3], key=lambda r: r["tokens"])["correct"] for rows in by.values()]
    assert bon["methods"]["shortest of 3"]["accuracy"] == pytest.approx(np.mean(short))
    assert bon["within_problem_auroc_length"]["problems_with_both"] == \
        bon["within_problem_auroc"]["problems_with_both"]  # every sample read: same problems
    # resumed with every sample in place (a results rerun on a new machine): no engine
    import adaras.pipeline.best_of_n as bon_module

    monkeypatch.setattr(bon_module, "open_engine", _no_engine)
    again = best_of_n(probed, BestOfNArgs(profile=str(path), problems=4, samples=3, ks=[2, 3],
                                          temperature=1.0, max_tokens=10, bootstrap=50), engine)
    assert again["methods"] == bon["methods"]


def test_a_baseline_alone_needs_no_profile_and_reports_lengths(engine, tmp_path):
    """A task pilot: greedy baseline accuracy, median length and truncations
    on a fresh run with no profile."""
    data = tmp_path / "pilot.jsonl"
    write_problems(data, 6, offset=200)
    pilot = Run(tmp_path / "pilot")
    results = evaluate(pilot, EvalArgs(dataset=str(data), problems=6, modes=["baseline"],
                                       max_tokens=8, bootstrap=100, stage="pilot"), engine)
    base = results["configs"]["baseline"]
    rows = read_jsonl(pilot.root / "pilot" / "generations.jsonl")
    assert results["profile"] is None and len(rows) == 6 and set(results["configs"]) == {"baseline"}
    assert base["median_tokens"] == float(np.median([r["tokens"] for r in rows]))
    assert base["truncated"] == sum(r["finish_reason"] == "length" for r in rows)
    with pytest.raises(FileNotFoundError, match="no profile yet"):  # steering needs one
        evaluate(Run(tmp_path / "other"), EvalArgs(dataset=str(data), problems=6,
                                                   modes=["always"]), engine)


def _no_engine(*args, **kwargs):
    raise AssertionError("the engine must not start: nothing is left to generate")


def test_eval_modes_sweeps_and_the_gate(run, engine, trained, tmp_path, monkeypatch):
    data = tmp_path / "eval.jsonl"
    write_problems(data, 8, offset=100)
    near = tmp_path / "near.json"  # the near-duplicate file's format; t101 is in the noise arm
    near.write_text(json.dumps({"pairs": [{"test": "t101"}, {"test": "t107"}, {"test": "x"}]}))
    args = EvalArgs(dataset=str(data), problems=8, alphas=[0.0, 1.0], ks=[2, 4], max_tokens=12,
                    threshold=0.5, bootstrap=500,
                    modes=["baseline", "always", "adaptive", "minus", "random", "noise"],
                    noise_problems=5, registration={"rule": "written first"},
                    secondary="always,minus", also_without=str(near))
    results = evaluate(run, args, engine)
    configs = results["configs"]
    assert set(configs) >= {"baseline", "always", "adaptive", "random", "minus", "noise",
                            "alpha=0", "alpha=1", "k=2", "k=4"}
    registered = run.stage_entry("eval")["results"]["preregistered"]
    assert registered["rule"] == "written first" and registered["noise_problems"] == 5
    assert registered["secondary_test"] == "always vs minus, exact McNemar (two-sided)"
    rows = read_jsonl(run.root / "eval" / "generations.jsonl")
    by = {(r["config"], r["problem"]): r for r in rows}
    # the key secondary, recomputed from the answers: always against minus, paired
    ids8 = [f"t{100 + i}" for i in range(8)]
    plus = np.array([by[("always", i)]["correct"] for i in ids8])
    neg = np.array([by[("minus", i)]["correct"] for i in ids8])
    sec = results["secondary"]
    assert sec["configs"] == ["always", "minus"] and sec["problems"] == 8
    assert sec["only_a"] == int((plus & ~neg).sum()) and sec["only_b"] == int((~plus & neg).sum())
    assert sec["delta"] == pytest.approx(plus.mean() - neg.mean())
    # every comparison again without the listed problems (an id not in the run is ignored)
    without = results["without"]
    assert without["excluded"] == ["t101", "t107"] and without["problems"] == 6
    kept = [i for i in ids8 if i not in {"t101", "t107"}]
    base_kept = np.array([by[("baseline", i)]["correct"] for i in kept])
    assert without["configs"]["baseline"]["accuracy"] == pytest.approx(base_kept.mean())
    assert without["configs"]["always"]["fixed"] == int(
        (np.array([by[("always", i)]["correct"] for i in kept]) & ~base_kept).sum())
    noise_kept = {r["problem"] for r in rows if r["config"] == "noise"} - {"t101", "t107"}
    assert without["configs"]["noise"]["problems"] == len(noise_kept) == 4
    assert "## Without 2 problems" in (run.root / "eval" / "report.md").read_text()
    ids = [p.id for p in load_problems(str(data))]
    # the noise arm: the baseline again on the first 5 problems, in another order
    noise = [r["problem"] for r in rows if r["config"] == "noise"]
    assert sorted(noise) == sorted(ids[:5]) and configs["noise"]["problems"] == 5
    outcomes = read_jsonl(run.root / "eval" / "outcomes.jsonl")
    assert len(outcomes) == len(rows) == 9 * 8 + 5
    assert {(o["arm"], o["problem"]): o["correct"] for o in outcomes} == \
        {(r["config"], r["problem"]): r["correct"] for r in rows}
    minus = SteeringProfile.load(run.root / "eval" / "profile-minus.safetensors")
    main = SteeringProfile.load(run.root / "eval" / "profile-main.safetensors")
    assert torch.equal(minus.delta, -main.delta)
    time.sleep(1.1)  # the registration's date has a resolution of one second
    again = evaluate(run, args, engine)  # resumed: nothing left to generate
    assert run.stage_entry("eval")["results"]["preregistered"] == registered  # nor re-dated
    assert again["configs"]["always"]["accuracy"] == configs["always"]["accuracy"]
    for name, r in configs.items():
        if name == "noise":
            continue
        got = [by[(name, i)]["correct"] for i in ids]
        assert r["accuracy"] == pytest.approx(np.mean(got))
        assert r["ci95"][0] <= r["delta"] <= r["ci95"][1]
    # alpha = 0 is the unsteered model
    assert [by[("alpha=0", i)]["completion"] for i in ids] == \
        [by[("baseline", i)]["completion"] for i in ids]
    # the gate: steered requests decode like `always`, the others like baseline
    alpha = configs["always"]["steering"]["alpha"]
    assert configs["adaptive"]["steering"]["alpha"] == alpha
    for i in ids:
        rep = by[("adaptive", i)]["steering"]
        assert rep["applied"] == (rep["failure_probability"] >= 0.5)
        twin = "always" if rep["applied"] else "baseline"
        assert by[("adaptive", i)]["completion"] == by[(twin, i)]["completion"]
    assert configs["adaptive"]["gate_rate"] == pytest.approx(
        np.mean([by[("adaptive", i)]["steering"]["applied"] for i in ids]))
    report = (run.root / "eval" / "report.md").read_text()
    assert "paired bootstrap 95% CI" in report and "| adaptive |" in report
    for name in ("accuracy.png", "sweep-alpha.png", "sweep-k.png"):
        assert (run.root / "eval" / name).exists()
    # resuming generates nothing new, and with every answer in place starts no engine
    import adaras.pipeline.evaluate as ev

    monkeypatch.setattr(ev, "open_engine", _no_engine)
    n = len(rows)
    final = evaluate(run, args, engine)
    assert final["configs"] == again["configs"]
    assert len(read_jsonl(run.root / "eval" / "generations.jsonl")) == n
    # its results still count the work of the attempt that generated the answers
    assert final["throughput"]["requests"] == n
    assert final["throughput"]["generated_tokens"] == sum(r["tokens"] for r in rows)


def test_cli_runs_a_stage_and_reports_bad_input(run, engine, trained, tmp_path):
    from typer.testing import CliRunner

    from adaras.cli import app

    runner = CliRunner()
    model = ["--model", engine.model, "--dtype", "float32", "--max-model-len", "512",
             "--max-num-seqs", "32", "--kv-cache-gib", "1"]
    data = tmp_path / "eval.jsonl"
    write_problems(data, 3, offset=200)
    res = runner.invoke(app, ["eval", "--run", str(run.root), "--dataset", str(data),
                              "--problems", "3", "--modes", "baseline,always",
                              "--max-tokens", "4", "--stage", "eval-cli", *model])
    assert res.exit_code == 0, res.output
    assert "| always |" in res.output
    bad = runner.invoke(app, ["eval", "--run", str(run.root), "--modes", "sometimes", *model])
    assert bad.exit_code == 2 and "unknown --modes" in bad.output
    empty = runner.invoke(app, ["identify", "--run", str(tmp_path / "nothing"), *model])
    assert empty.exit_code == 2 and "adaras collect" in empty.output


def test_engine_is_shared_between_stages(engine):
    assert open_engine(engine) is open_engine(engine)


@pytest.mark.parametrize("stage", ["eval", "best-of-n"])
def test_a_profile_for_another_model_fails_before_the_engine_starts(tiny, tmp_path, monkeypatch,
                                                                    stage):
    """A run folder without its collect stage (a new machine) once fell back to
    the default model and failed only after minutes of engine start-up."""
    from adaras.pipeline import best_of_n as bon
    from adaras.pipeline import evaluate as ev
    from adaras.profile import ProfileError

    def no_engine(*a, **k):
        raise AssertionError("the engine must not start for a mismatched profile")

    monkeypatch.setattr(ev, "open_engine", no_engine)
    monkeypatch.setattr(bon, "open_engine", no_engine)
    qwen = Path(ev.__file__).parents[1] / "profiles" / "qwen2.5-coder-1.5b-instruct.safetensors"
    data = tmp_path / "eval.jsonl"
    write_problems(data, 4)
    options = EngineOptions(model=str(tiny), dtype="float32", max_model_len=512, kv_cache_gib=1)
    with pytest.raises(ProfileError, match="built for another model shape"):
        if stage == "eval":
            evaluate(Run(tmp_path / "run"), EvalArgs(dataset=str(data), problems=4,
                                                     modes=["always"], profile=str(qwen)),
                     options)
        else:
            bon.best_of_n(Run(tmp_path / "run"), bon.BestOfNArgs(profile=str(qwen)), options)


def test_run_jobs_streams_checkpoints_and_matches_generate(engine):
    """run_jobs keeps at most `chunk` requests in the engine and hands finished
    answers over every `flush`; greedy answers equal one plain llm.generate of
    the same prompts, and a call stopped by its caller leaves nothing behind."""
    from vllm import SamplingParams

    from adaras.pipeline.llm import Job, run_jobs

    llm = open_engine(engine)
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    prompts = [[11 + i, 7, 100 + 3 * i] for i in range(10)]
    jobs = [Job(f"j{i}", p, params) for i, p in enumerate(prompts)]
    batches, progress = [], []
    meter = run_jobs(llm, jobs, lambda rows: batches.append(rows), "test", chunk=4, flush=3,
                     on_progress=progress.append)
    got = {j.key: list(o.outputs[0].token_ids) for rows in batches for j, o, _ in rows}
    assert [j.key for rows in batches for j, _, _ in rows] == [j.key for j in jobs]  # in order
    assert len(batches) >= 3  # handed over while the engine ran, not once at the end
    assert meter["requests"] == 10 and meter["generated_tokens"] == 90
    # the throughput so far after each hand-over: what was handed over, ending at the total
    assert [m["requests"] for m in progress] == list(np.cumsum([len(b) for b in batches]))
    assert progress[-1] == meter
    ref = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert got == {f"j{i}": list(o.outputs[0].token_ids) for i, o in enumerate(ref)}

    def stop(rows):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_jobs(llm, jobs, stop, "stopped", chunk=6, flush=1)
    assert not llm.llm_engine.has_unfinished_requests()  # the rest was aborted
    again = []
    run_jobs(llm, jobs[:2], again.append, "again", chunk=4, flush=1)
    assert sorted(j.key for rows in again for j, _, _ in rows) == ["j0", "j1"]
