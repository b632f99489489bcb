"""The pipeline's numerical pieces on data whose answer is known: mean
difference, polarity filter, selection ablations, bootstrap CI, threshold
calibration, the run manifest. No engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaras.pipeline.arms import randomize, truncate
from adaras.pipeline.capture import load_parts, save_part
from adaras.pipeline.identify import mean_difference, select
from adaras.pipeline.run import Run, StageArgsChanged, append_jsonl, read_jsonl
from adaras.pipeline.train import select_features, split_problems
from adaras.profile import ModelShape, SteeringProfile

L, I = 3, 10


def synthetic_means(rng):
    """Pairs where neuron (0,1) flips sign (+2 correct / -2 incorrect), neuron
    (1,4) differs hugely but keeps its sign (10 vs 4), (2,7) flips weakly."""
    means, pairs = {}, []
    for k in range(4):
        pos = rng.normal(0, 0.01, (L, I)).astype(np.float32)
        neg = rng.normal(0, 0.01, (L, I)).astype(np.float32)
        pos[0, 1], neg[0, 1] = 2.0, -2.0
        pos[1, 4], neg[1, 4] = 10.0, 4.0
        pos[2, 7], neg[2, 7] = -0.5, 0.5
        means[f"p{k}"], means[f"n{k}"] = pos, neg
        pairs.append({"problem": f"q{k}", "correct": f"p{k}", "incorrect": f"n{k}"})
    return pairs, means


def test_mean_difference_is_the_mean_of_pair_differences():
    pairs, means = synthetic_means(np.random.default_rng(0))
    score = mean_difference(pairs, means)
    want = np.mean([means[p["correct"]] - means[p["incorrect"]] for p in pairs], axis=0)
    np.testing.assert_allclose(score["s"], want, rtol=1e-6, atol=1e-6)
    assert score["survivors"][0, 1] and score["survivors"][2, 7]
    assert not score["survivors"][1, 4]  # same sign on both sides: filtered


def test_polarity_filter_and_ranking():
    pairs, means = synthetic_means(np.random.default_rng(1))
    score = mean_difference(pairs, means)
    layers, neurons, delta = select(score, 2, "mean-diff")
    assert list(zip(layers.tolist(), neurons.tolist())) == [(0, 1), (2, 7)]
    np.testing.assert_allclose(delta.numpy(), [4.0, -1.0], atol=0.05)
    # without the filter the big same-sign neuron wins
    layers, neurons, _ = select(score, 1, "no-polarity")
    assert (layers.item(), neurons.item()) == (1, 4)


def test_no_ranking_draws_from_survivors_and_random_keeps_the_deltas():
    pairs, means = synthetic_means(np.random.default_rng(2))
    score = mean_difference(pairs, means)
    survivors = set(zip(*np.nonzero(score["survivors"])))
    layers, neurons, delta = select(score, 5, "no-ranking", seed=3)
    assert set(zip(layers.tolist(), neurons.tolist())) <= survivors
    s = score["s"][layers.numpy(), neurons.numpy()]
    real = select(score, 5, "mean-diff")[2].numpy()
    # S at the drawn neurons, scaled to the real profile's norm
    np.testing.assert_allclose(delta.numpy(), s * np.linalg.norm(real) / np.linalg.norm(s),
                               rtol=1e-5)
    _, _, rdelta = select(score, 5, "random", seed=3)
    np.testing.assert_allclose(np.sort(rdelta.numpy()), np.sort(real))
    a = select(score, 5, "random", seed=3)
    b = select(score, 5, "random", seed=4)
    assert (a[0].tolist(), a[1].tolist()) != (b[0].tolist(), b[1].tolist())


def test_selection_refuses_an_unknown_mode():
    pairs, means = synthetic_means(np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown selection"):
        select(mean_difference(pairs, means), 2, "best")


def _profile(k=6) -> SteeringProfile:
    shape = ModelShape("Qwen3ForCausalLM", L, I, 8)
    return SteeringProfile.random("p", shape, k=k, seed=0, scale=1.0, default_alpha=0.3)


def test_randomize_is_matched_per_layer_and_in_norm_on_other_neurons():
    prof = _profile()
    rnd = randomize(prof, seed=1)
    rnd.validate(prof.model)
    assert rnd.layer_histogram() == prof.layer_histogram()
    for layer, (neurons, values) in prof.by_layer().items():
        r_neurons, r_values = rnd.by_layer()[layer]
        np.testing.assert_array_equal(np.sort(r_values.numpy()), np.sort(values.numpy()))
        assert not set(r_neurons.tolist()) & set(neurons.tolist())  # none of the profile's
    assert float(rnd.delta.norm()) == pytest.approx(float(prof.delta.norm()), rel=1e-6)
    assert randomize(prof, seed=2).fingerprint() != rnd.fingerprint()
    assert randomize(prof, seed=1).fingerprint() == rnd.fingerprint()


def test_negate_is_minus_s_on_the_same_neurons():
    from adaras.pipeline.arms import negate

    prof = _profile()
    neg = negate(prof)
    assert torch.equal(neg.delta, -prof.delta) and torch.equal(neg.layers, prof.layers)
    assert torch.equal(neg.neurons, prof.neurons) and neg.default_alpha == prof.default_alpha


def test_the_control_arms_keep_the_profiles_heads_so_their_answers_are_probed():
    """--answer-probe on every arm: the -S and random profiles carry the answer
    head (and the prompt head with its threshold); before, -S answers read none."""
    from adaras.pipeline.arms import negate
    from adaras.predictor import FailurePredictor

    prof = _profile()
    prof.answer_predictor = FailurePredictor(torch.tensor([0, 1], dtype=torch.int32),
                                             torch.tensor([2, 3], dtype=torch.int32), hidden=4)
    prof.predictor = FailurePredictor(torch.tensor([1], dtype=torch.int32),
                                      torch.tensor([5], dtype=torch.int32), hidden=4)
    prof.threshold = 0.6
    for arm in (negate(prof), randomize(prof, seed=1)):
        arm.validate(prof.model)
        assert arm.answer_predictor is prof.answer_predictor
        assert arm.predictor is prof.predictor and arm.threshold == 0.6


def test_truncate_keeps_the_largest():
    prof = _profile()
    top = truncate(prof, 2)
    assert sorted(np.abs(top.delta.numpy())) == sorted(np.abs(prof.delta.numpy()))[-2:]


def test_anova_finds_the_informative_neuron():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    X = rng.normal(size=(40, 50))
    X[:, 17] += 3 * y
    assert 17 in select_features(X, y, 3)
    with pytest.raises(ValueError, match="exceeds"):
        select_features(X, y, 51)


def test_split_is_stratified_and_disjoint():
    y = np.array([0] * 30 + [1] * 20)
    split = split_problems(y, 0.2, 0.2, seed=0)
    idx = np.concatenate(list(split.values()))
    assert sorted(idx.tolist()) == list(range(50))
    assert y[split["test"]].sum() == 4
    with pytest.raises(ValueError, match="only one label"):
        split_problems(np.zeros(20, int), 0.2, 0.2, seed=0)


def test_parts_round_trip_any_keys_and_shapes(tmp_path):
    arrays = {"rg:x:s1:0#3": np.arange(6, dtype=np.float32).reshape(2, 3),
              "humaneval:HumanEval/0#greedy": np.ones((4, 1), np.float32)}
    save_part(tmp_path / "t-000000.npz", arrays)
    back = load_parts(tmp_path, "t")
    assert set(back) == set(arrays)
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])


def test_run_manifest_records_and_refuses_other_arguments(tmp_path):
    run = Run(tmp_path / "r")
    with run.stage("collect", {"a": 1}) as out:
        (out / "x.txt").write_text("x")
    entry = run.stage_entry("collect")
    assert entry["status"] == "done" and "collect/x.txt" in entry["artifacts"]
    assert "python" in entry["versions"] and entry["seconds"] >= 0
    with pytest.raises(StageArgsChanged, match="a"):
        with run.stage("collect", {"a": 2}):
            pass
    with run.stage("collect", {"a": 2}, restart=True) as out:
        assert not (out / "x.txt").exists()
    # a newer version of the code with one more option, left at its None default,
    # resumes the stage (the confirm run spans sessions and commits); a set one does not
    meter = {"requests": 3, "prompt_tokens": 30, "generated_tokens": 100, "seconds": 10.0}
    with run.stage("collect", {"a": 2}, restart=True):
        run.record("collect", answers=3)
        run.record_throughput("generate", meter)
    with run.stage("collect", {"a": 2, "new_option": None}):
        total = run.record_throughput("generate", {**meter, "generated_tokens": 300,
                                                   "seconds": 30.0})
    entry = run.stage_entry("collect")
    assert entry["attempts"] == 2 and entry["results"]["answers"] == 3  # kept on resume
    tp = entry["results"]["throughput"]["generate"]  # both attempts' work together
    assert tp["requests"] == 6 and tp["generated_tokens"] == 400 and tp["generated_tok_s"] == 10.0
    assert total == tp  # what the stage writes into its results.json
    with run.stage("collect", {"a": 2}):  # a third attempt with nothing left to generate
        idle = run.record_throughput("generate", {**meter, "requests": 0,
                                                  "generated_tokens": 0, "seconds": 0.0})
    assert idle == tp == run.stage_entry("collect")["results"]["throughput"]["generate"]
    # an attempt killed without warning (no finally runs) counts what it handed over: its
    # recorder wrote the total so far at every hand-over, and the next attempt adds to it
    with run.stage("collect", {"a": 2}):
        record = run.throughput_recorder("generate")
        for done in (1, 2):
            record({**meter, "requests": done, "generated_tokens": 50 * done})
    killed = run.stage_entry("collect")["results"]["throughput"]["generate"]
    assert killed["requests"] == 8 and killed["generated_tokens"] == 500
    with run.stage("collect", {"a": 2}):
        last = run.record_throughput("generate", {**meter, "requests": 1,
                                                  "generated_tokens": 20})
    assert last["requests"] == 9 and last["generated_tokens"] == 520
    with pytest.raises(StageArgsChanged, match="newer"):
        with run.stage("collect", {"a": 2, "newer": 0}):
            pass
    with pytest.raises(RuntimeError):
        with run.stage("identify", {}):
            raise RuntimeError("boom")
    assert run.stage_entry("identify")["status"] == "failed"
    with pytest.raises(FileNotFoundError, match="adaras identify"):
        run.require("identify")


def test_jsonl_drops_a_torn_last_line_only(tmp_path):
    path = tmp_path / "g.jsonl"
    append_jsonl(path, [{"k": 1}, {"k": 2}])
    with path.open("a") as f:
        f.write('{"k": 3')  # interrupted write
    assert read_jsonl(path) == [{"k": 1}, {"k": 2}]
    append_jsonl(path, [{"k": 3}])
    assert [r["k"] for r in read_jsonl(path)] == [1, 2, 3]
    path.write_text('{"k": 1}\n{bad\n{"k": 2}\n')
    with pytest.raises(ValueError, match=":2"):
        read_jsonl(path)


def test_cpu_binding_splits_the_usable_cores_over_tp_ranks(monkeypatch):
    import os

    from adaras.pipeline.llm import cpu_binding

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpu_binding(1) == "0-3"
    assert cpu_binding(2) == "0-1|2-3"
    assert cpu_binding(4) == "0|1|2|3"
    assert cpu_binding(8) is None  # fewer cores than ranks: leave vLLM's default
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5, 6})
    assert cpu_binding(2) == "0,2|5,6"


def test_engine_env_gives_every_sequence_a_capture_slot():
    from adaras.pipeline.llm import EngineOptions, engine_env

    env = engine_env(EngineOptions(max_num_seqs=48, kv_cache_gib=3))
    assert env["ADARAS_CAPTURE_SLOTS"] == "48" and env["VLLM_CPU_KVCACHE_SPACE"] == "3"


# ---- the reference recipe, sigma, split-half reliability ---------------------------------

def reference_groups(rng, problems=8, per_side=3, signal=((0, 1, 2.0), (2, 7, -0.5))):
    """Unpaired traces by problem; the `signal` neurons sit at +v on correct
    traces and -v on incorrect ones, everything else is noise."""
    means, groups = {}, []
    for q in range(problems):
        pos, neg = [], []
        for side, keys in ((1, pos), (-1, neg)):
            for t in range(per_side):
                m = rng.normal(0, 0.3, (L, I)).astype(np.float32)
                for layer, neuron, v in signal:
                    m[layer, neuron] = side * v + rng.normal(0, 0.05)
                key = f"q{q}{'+' if side > 0 else '-'}{t}"
                means[key] = m
                keys.append(key)
        groups.append((f"q{q}", pos, neg))
    return groups, means


def test_reference_ranking_is_its_csv_order_relative_difference_then_size():
    from adaras.pipeline.identify import contrast

    rng = np.random.default_rng(5)
    groups, means = reference_groups(rng, signal=())
    score = contrast(groups, means, "reference")
    g, b = score["mu_pos"], score["mu_neg"]
    # the reference script in plain Python: float32 columns, sort by (rel, |w|) descending,
    # stable, then the first K rows; the polarity filter keeps the sign flips it ranks first
    w = (g - b).reshape(-1)
    rel = (np.abs(w) / (np.abs(g) + np.abs(b) + np.float32(1e-8)).reshape(-1)).astype(np.float32)
    order = sorted(range(w.size), key=lambda i: (-float(rel[i]), -abs(float(w[i]))))
    flips = (g * b < 0).reshape(-1)
    want = [i for i in order if flips[i]][:6]
    layers, neurons, delta = select(score, 6, "reference")
    assert (layers.numpy() * I + neurons.numpy()).tolist() == want
    np.testing.assert_array_equal(delta.numpy(), w[want])
    assert all(rel[i] > 0.999 for i in want)  # sign flips: relative difference ~1


def test_reference_contrast_is_unpaired_over_all_traces():
    from adaras.pipeline.identify import contrast

    rng = np.random.default_rng(6)
    groups, means = reference_groups(rng)
    groups[0] = (groups[0][0], groups[0][1][:1], groups[0][2])  # unequal sides are fine
    score = contrast(groups, means, "reference")
    pos = np.mean([means[k] for _, keys, _ in groups for k in keys], axis=0)
    neg = np.mean([means[k] for _, _, keys in groups for k in keys], axis=0)
    np.testing.assert_allclose(score["s"], pos - neg, rtol=1e-5, atol=1e-6)
    layers, neurons, _ = select(score, 2, "reference")
    assert sorted(zip(layers.tolist(), neurons.tolist())) == [(0, 1), (2, 7)]


def test_sigma_is_the_spread_of_trace_means_at_each_chosen_neuron():
    import torch

    from adaras.pipeline.identify import trace_spread

    rng = np.random.default_rng(7)
    groups, means = reference_groups(rng)
    keys = [k for _, pos, neg in groups for k in (*pos, *neg)]
    layers, neurons = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([1, 7], dtype=torch.int32)
    sigma = trace_spread(means, keys, layers, neurons)
    want = [np.std([means[k][0, 1] for k in keys], ddof=1),
            np.std([means[k][2, 7] for k in keys], ddof=1)]
    np.testing.assert_allclose(sigma.numpy(), want, rtol=1e-5)
    assert sigma.dtype == torch.float32 and sigma[0] > sigma[1]  # +-2 spreads more than +-0.5


@pytest.mark.parametrize("recipe", ["paired", "reference"])
def test_split_half_finds_a_real_signal_and_not_noise(recipe):
    from adaras.pipeline.identify import IdentifyArgs, split_half

    args = IdentifyArgs(k=2, recipe=recipe, split_half_permutations=10)
    rng = np.random.default_rng(8)
    groups, means = reference_groups(rng, problems=10)
    real = split_half(groups, means, args)
    assert real["overlap"] == 2 and real["problems"] == [5, 5]
    assert real["chance_random_neurons"] == pytest.approx(4 / (L * I))
    assert real["label_shuffled_mean"] < 1  # shuffled labels lose the two neurons
    groups, means = reference_groups(np.random.default_rng(9), problems=10, signal=())
    noise = split_half(groups, means, args)
    assert noise["overlap"] <= 1
    assert split_half(groups[:3], means, args)["overlap"] is None  # too few problems


def test_best_of_n_methods_and_within_problem_auroc():
    from adaras.pipeline.best_of_n import choose, majority, within_problem_auroc

    rows = [{"correct": False, "extracted": "3", "tokens": 10, "answer_p_fail": 0.9},
            {"correct": True, "extracted": "4", "tokens": 20, "answer_p_fail": 0.2},
            {"correct": False, "extracted": "3", "tokens": 30, "answer_p_fail": 0.5},
            {"correct": True, "extracted": None, "tokens": 40, "answer_p_fail": 0.1}]
    got = choose(rows, 3)
    assert got["probe best-of-3"] == (1.0, 60)  # the lowest p_fail of the first 3
    assert got["majority vote of 3"] == (0.0, 60)  # "3" twice beats "4" once
    assert got["random sample of 3"] == (pytest.approx(1 / 3), 20)
    assert got["shortest of 3"] == (0.0, 60)  # 10 tokens, wrong
    assert choose(rows, 4)["probe best-of-4"] == (1.0, 100)
    tie = [{**r, "tokens": 20} for r in rows]
    assert choose(tie[1:], 2)["shortest of 2"] == (1.0, 40)  # equal lengths: the first
    assert majority([{"extracted": None, "correct": False}])["correct"] is False
    # within a problem: 2 wrong x 1 right, both ordered correctly; a tie counts 1/2
    w, p = np.array([True, False, True]), np.array([0.9, 0.2, 0.2])
    assert within_problem_auroc([(w, p)]) == (pytest.approx(0.75), 2)
    # problems with one label only add no pair; pairs never cross problems
    one = (np.array([True, True]), np.array([0.0, 0.0]))
    assert within_problem_auroc([(w, p), one]) == (pytest.approx(0.75), 2)


def test_a_resumed_draw_keeps_its_seed():
    """pending_samples numbers each draw among all of them, so a draw left
    over by an interrupted stage gets the seed a fresh stage gives it."""
    from adaras.pipeline.collect import pending_samples
    from adaras.pipeline.data import Problem

    problems = [Problem(id=f"p{i}", question="q", answer="1", kind="math") for i in range(3)]
    fresh = pending_samples(problems, 4, set())
    assert [n for *_, n in fresh] == list(range(1, 13))
    assert [k for k, *_ in fresh][:5] == ["p0#0", "p0#1", "p0#2", "p0#3", "p1#0"]
    done = {"p0#0", "p0#3", "p1#1", "p2#2"}
    resumed = pending_samples(problems, 4, done)
    assert resumed == [d for d in fresh if d[0] not in done]
