"""The steered engine against its references: stock vLLM, a Hugging Face
forward pass with hooks, and the offline predictor."""

from __future__ import annotations

import math

import pytest
import torch
from vllm import SamplingParams

from adaras.engine import admission, load_profile, reports_of, unload_profile
from adaras.profile import SteeringProfile
from tests.helpers.hf import capture_neurons, steering_hooks

from .conftest import generate, prompt_ids

pytestmark = pytest.mark.engine

MAX_TOKENS = 12


def params(steering=None, *, max_tokens=MAX_TOKENS, logprobs=None):
    extra = {"steering": steering} if steering is not None else None
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          logprobs=logprobs, extra_args=extra)


def tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


# ---- unsteered parity ------------------------------------------------------

def test_unsteered_requests_match_stock_in_a_mixed_batch(qwen3_llm, qwen3_stock):
    # 70-token prompts with max_num_batched_tokens=32: every prompt is chunked.
    prompts = prompt_ids(12, 70, seed=11)
    stock = generate(qwen3_stock, prompts, params(logprobs=3))
    mixed_params = [
        params(None if i % 3 == 0 else
               {"mode": "always", "profile": "ab"[i % 2], "alpha": 0.25 * (1 + i % 4)}
               if i % 3 == 1 else {"mode": "off"}, logprobs=3)
        for i in range(len(prompts))
    ]
    mixed = generate(qwen3_llm, prompts, mixed_params)
    unsteered = [i for i in range(len(prompts)) if i % 3 != 1]
    steered = [i for i in range(len(prompts)) if i % 3 == 1]
    for i in unsteered:
        assert tokens(mixed)[i] == tokens(stock)[i], f"unsteered request {i} diverged from stock"
        got = [lp[t].logprob for lp, t in zip(mixed[i].outputs[0].logprobs, tokens(mixed)[i])]
        want = [lp[t].logprob for lp, t in zip(stock[i].outputs[0].logprobs, tokens(stock)[i])]
        assert got == want  # bitwise: unsteered rows never touch the steering path
    # The steered ones really were steered.
    assert sum(tokens(mixed)[i] != tokens(stock)[i] for i in steered) >= len(steered) - 1


def test_steered_request_in_a_batch_matches_it_alone(qwen3_llm):
    prompts = prompt_ids(6, 40, seed=12)
    configs = [{"mode": "always", "profile": "ab"[i % 2], "alpha": 0.2 + 0.1 * i} for i in range(6)]
    together = tokens(generate(qwen3_llm, prompts, [params(c) for c in configs]))
    for i in (0, 3, 5):
        alone = tokens(generate(qwen3_llm, [prompts[i]], params(configs[i])))[0]
        assert alone == together[i]


# ---- steered parity with Hugging Face -------------------------------------

def hf_logprobs(model_dir, profile, alpha, prompt, output, start=None):
    """log p(output[j] | prompt + output[:j]) from transformers, with steering
    on the positions the engine steers (generated tokens fed back; from
    `start`, default the first generated position)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        if profile is None:
            logits = model(ids).logits
        else:
            with steering_hooks(model, profile, alpha,
                                start=len(prompt) if start is None else start):
                logits = model(ids).logits
    logp = torch.log_softmax(logits[0].float(), dim=-1)  # [T, V]
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(output) - 1)
    return logp[pos, torch.tensor(output)]  # [len(output)]


def engine_logprobs(out) -> torch.Tensor:
    toks = list(out.outputs[0].token_ids)
    return torch.tensor([lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, toks)])


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_steered_logprobs_match_hf_hook(qwen3_llm, qwen3_dir, qwen3_profiles, alpha):
    profile = SteeringProfile.load(qwen3_profiles["a"])
    prompt = prompt_ids(1, 20, seed=13)[0]
    out = generate(qwen3_llm, [prompt], params({"mode": "always", "profile": "a", "alpha": alpha},
                                               logprobs=1))[0]
    output = list(out.outputs[0].token_ids)
    want = hf_logprobs(qwen3_dir, profile, alpha, prompt, output)
    torch.testing.assert_close(engine_logprobs(out), want, atol=2e-3, rtol=1e-3)
    # ... and steering moved them: the unsteered reference is far away.
    base = hf_logprobs(qwen3_dir, None, 0.0, prompt, output)
    assert (base - want)[1:].abs().max() > 0.05


def test_steering_the_last_prompt_position_matches_hf_and_moves_the_first_token(
        qwen3_llm, qwen3_dir, qwen3_profiles, tmp_path):
    # Decode-only steering never changes the first generated token's logits:
    # they come from the last prompt position. A profile with
    # provenance steer_prompt="last" steers that position too.
    profile = SteeringProfile.load(qwen3_profiles["a"])
    profile.provenance = {**profile.provenance, "steer_prompt": "last"}
    profile.save(tmp_path / "last.safetensors")
    load_profile(qwen3_llm, "a-last", str(tmp_path / "last.safetensors"))
    try:
        prompt = prompt_ids(1, 45, seed=13)[0]  # chunked: 32 + 13 tokens
        alpha = 1.0
        out = generate(qwen3_llm, [prompt], params(
            {"mode": "always", "profile": "a-last", "alpha": alpha}, logprobs=1))[0]
        output = list(out.outputs[0].token_ids)
        want = hf_logprobs(qwen3_dir, profile, alpha, prompt, output, start=len(prompt) - 1)
        torch.testing.assert_close(engine_logprobs(out), want, atol=2e-3, rtol=1e-3)
        decode_only = hf_logprobs(qwen3_dir, profile, alpha, prompt, output)
        assert abs(float(want[0] - decode_only[0])) > 0.05  # the first token moved
        # adaptive requests decide after the prompt: the prompt stays unsteered,
        # so their first token equals the unsteered one
        base = generate(qwen3_llm, [prompt], params(logprobs=1))[0]
        gated = generate(qwen3_llm, [prompt], params(
            {"mode": "adaptive", "profile": "a-last", "alpha": alpha, "threshold": 0.0},
            logprobs=1))[0]
        assert engine_logprobs(gated)[0] == engine_logprobs(base)[0]
    finally:
        unload_profile(qwen3_llm, "a-last")


def test_alpha_zero_gives_unsteered_output(qwen3_llm):
    prompts = prompt_ids(4, 30, seed=14)
    base = generate(qwen3_llm, prompts, params(logprobs=2))
    zero = generate(qwen3_llm, prompts, params({"mode": "always", "profile": "a", "alpha": 0.0},
                                               logprobs=2))
    assert tokens(zero) == tokens(base)
    for z, b in zip(zero, base):
        assert torch.equal(engine_logprobs(z), engine_logprobs(b))
    reports = reports_of(zero)
    assert all(r["applied"] and r["alpha"] == 0.0 for r in reports.values())


def test_doubling_alpha_doubles_the_first_steered_logit_shift(qwen3_llm, qwen3_dir, qwen3_profiles):
    # For small alpha the logit shift is ~linear in alpha (first steered position).
    prompt = prompt_ids(1, 16, seed=15)[0]
    shifts = []
    base = engine_logprobs(generate(qwen3_llm, [prompt], params(max_tokens=2, logprobs=1))[0])
    for alpha in (1e-3, 2e-3):
        out = generate(qwen3_llm, [prompt],
                       params({"mode": "always", "profile": "a", "alpha": alpha}, max_tokens=2,
                              logprobs=1))[0]
        shifts.append(engine_logprobs(out)[1] - base[1])
    assert abs(shifts[0].item()) > 1e-6
    assert math.isclose(shifts[1].item(), 2 * shifts[0].item(), rel_tol=0.05)


# ---- prefix caching -------------------------------------------------------

def test_prefix_cache_never_serves_steered_kv_to_unsteered(qwen3_llm, qwen3_stock, monkeypatch):
    prompt = prompt_ids(1, 40, seed=16)[0]
    steer = {"mode": "always", "profile": "a", "alpha": 2.0}
    qwen3_llm.reset_prefix_cache()
    steered = tokens(generate(qwen3_llm, [prompt], params(steer, max_tokens=48)))[0]
    # The continuation prompt covers whole blocks whose KV was computed under steering.
    follow = prompt + steered
    got = tokens(generate(qwen3_llm, [follow], params()))[0]
    want = tokens(generate(qwen3_stock, [follow], params()))[0]
    assert got == want

    # Negative control: without the salt the same sequence does reuse steered KV.
    qwen3_llm.reset_prefix_cache()
    monkeypatch.setattr(admission, "steering_salt", lambda extra_args: None)
    generate(qwen3_llm, [prompt], params(steer, max_tokens=48))
    leaked = tokens(generate(qwen3_llm, [follow], params()))[0]
    qwen3_llm.reset_prefix_cache()
    assert leaked != want, "control failed: steered KV did not change the continuation"


# ---- adaptive gate and in-engine predictor --------------------------------

def offline_p_fail(model_dir, profile: SteeringProfile, prompt: list[int]) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pred = profile.predictor
    with torch.no_grad(), capture_neurons(model, pred.feature_layers, pred.feature_neurons) as feats:
        model(torch.tensor([prompt]))
    return pred.prob(feats[0][0])


def test_in_engine_p_fail_matches_offline_predictor_under_chunked_prefill(
        qwen3_llm, qwen3_dir, qwen3_profiles):
    profile = SteeringProfile.load(qwen3_profiles["pred"])
    # 45..100 tokens, max_num_batched_tokens=32: split over 2-4 steps.
    prompts = [prompt_ids(1, n, seed=20 + n)[0] for n in (45, 60, 77, 100, 33, 90)]
    offline = [offline_p_fail(qwen3_dir, profile, p) for p in prompts]
    ranked = sorted(offline)
    threshold = (ranked[2] + ranked[3]) / 2  # halfway: no request sits on the boundary
    outs = generate(qwen3_llm, prompts,
                    params({"mode": "adaptive", "profile": "pred", "threshold": threshold}))
    reports = reports_of(outs)
    engine = [reports[o.request_id]["failure_probability"] for o in outs]
    torch.testing.assert_close(torch.tensor(engine), torch.tensor(offline), atol=1e-4, rtol=1e-4)

    applied = [reports[o.request_id]["applied"] for o in outs]
    assert applied == [p >= threshold for p in offline]
    assert 0 < sum(applied) < len(applied)
    # Gated requests decode exactly like `always`; the others like unsteered.
    always = tokens(generate(qwen3_llm, prompts, params({"mode": "always", "profile": "pred"})))
    base = tokens(generate(qwen3_llm, prompts, params()))
    for i, on in enumerate(applied):
        assert tokens(outs)[i] == (always[i] if on else base[i])


def test_profiles_load_and_unload_at_runtime(qwen3_llm, qwen3_dir, tmp_path):
    import transformers

    from adaras.profile import ModelShape

    shape = ModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(qwen3_dir))
    path = tmp_path / "c.safetensors"
    SteeringProfile.random("c", shape, k=10, seed=9, scale=3.0).save(path)
    summary = load_profile(qwen3_llm, "c", str(path))
    assert summary["k"] == 10
    prompt = prompt_ids(1, 20, seed=17)
    out = generate(qwen3_llm, prompt, params({"mode": "always", "profile": "c", "alpha": 1.0}))
    assert reports_of(out)[out[0].request_id]["profile"] == "c"
    assert unload_profile(qwen3_llm, "c")
    with pytest.raises(ValueError, match="steering.profile"):
        generate(qwen3_llm, prompt, params({"mode": "always", "profile": "c"}))


def test_profile_for_another_model_is_refused(qwen3_llm, tmp_path):
    from adaras.profile import ModelShape

    other = ModelShape("Qwen3ForCausalLM", 4, 999, 64)
    path = tmp_path / "other.safetensors"
    SteeringProfile.random("other", other, k=5).save(path)
    with pytest.raises(Exception, match="shape|intermediate|layers"):
        load_profile(qwen3_llm, "other", str(path))


# ---- bad input -------------------------------------------------------------

@pytest.mark.parametrize("steering, field", [
    ({"mode": "sometimes"}, "mode"),
    ({"mode": "always", "alpha": -1.0}, "alpha"),
    ({"mode": "always", "alpha": float("nan")}, "alpha"),
    ({"mode": "adaptive", "threshold": 1.5}, "threshold"),
    ({"mode": "always", "alpha": "big"}, "alpha"),
    ({"mode": "always", "colour": "red"}, "colour"),
    ({"mode": "always", "profile": "no-such-profile"}, "profile"),
    ("always", "<object>"),
])
def test_bad_steering_is_refused_with_the_field_named(qwen3_llm, steering, field):
    with pytest.raises(ValueError, match=f"steering.{field}"):
        generate(qwen3_llm, prompt_ids(1, 8), params(steering))


def test_reloading_a_profile_mid_request_keeps_the_old_one(qwen3_llm, qwen3_dir, tmp_path):
    """Deterministic in-flight swap: step the engine by hand, replace the
    profile between two decode steps, and the request finishes on the old one."""
    import transformers

    from adaras.profile import ModelShape

    shape = ModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(qwen3_dir))
    v1, v2 = tmp_path / "v1.safetensors", tmp_path / "v2.safetensors"
    SteeringProfile.random("swap", shape, k=24, seed=51, scale=3.0).save(v1)
    SteeringProfile.random("swap", shape, k=24, seed=52, scale=3.0).save(v2)
    prompt = prompt_ids(1, 20, seed=53)
    p = params({"mode": "always", "profile": "swap", "alpha": 1.0}, max_tokens=24)
    load_profile(qwen3_llm, "swap", str(v1))
    ref_v1 = tokens(generate(qwen3_llm, prompt, p))[0]
    load_profile(qwen3_llm, "swap", str(v2))
    ref_v2 = tokens(generate(qwen3_llm, prompt, p))[0]
    assert ref_v1 != ref_v2
    load_profile(qwen3_llm, "swap", str(v1))

    engine = qwen3_llm.llm_engine
    engine.add_request("swap-in-flight", {"prompt_token_ids": prompt[0]}, p)
    outs = []
    for _ in range(4):  # prefill + a few decode steps on v1
        outs += engine.step()
    assert not any(o.finished for o in outs)
    load_profile(qwen3_llm, "swap", str(v2))  # between two steps of the request
    while engine.has_unfinished_requests():
        outs += engine.step()
    final = next(o for o in outs if o.finished)
    assert list(final.outputs[0].token_ids) == ref_v1
    assert tokens(generate(qwen3_llm, prompt, p))[0] == ref_v2  # new requests get v2
    unload_profile(qwen3_llm, "swap")


def test_seeded_sampling_survives_chunked_prefill(qwen3_llm):
    # max_num_batched_tokens=32: these 70-token prompts are prefilled in 3 steps,
    # and stock vLLM-CPU dies rewinding the seeded generators ("CPU Generator
    # does not use offset"). Seeds still make the draws reproducible.
    prompts = prompt_ids(3, 70, seed=90)
    sp = [SamplingParams(max_tokens=8, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 1)]
    first = tokens(generate(qwen3_llm, prompts[:1] * 3, sp))
    again = tokens(generate(qwen3_llm, prompts[:1] * 3, sp))
    assert first == again
    assert first[0] == first[2] and first[0] != first[1]  # same seed, same draw
    assert all(len(t) == 8 for t in tokens(generate(qwen3_llm, prompts, sp)))


# ---- the offline API -------------------------------------------------------

def test_the_offline_steering_api_steers_and_attaches_reports(qwen3_llm):
    from adaras.engine import Steering

    prompts = prompt_ids(3, 24, seed=21)
    steer = Steering(profile="a", alpha=0.5)
    outs = Steering.reports(qwen3_llm, generate(qwen3_llm, prompts[:2], SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, extra_args=steer.args())))
    raw = generate(qwen3_llm, prompts[:2], params({"mode": "always", "profile": "a", "alpha": 0.5}))
    assert tokens(outs) == tokens(raw)  # the same request as the raw extra_args
    assert tokens(outs) != tokens(generate(qwen3_llm, prompts[:2], params()))
    for o in outs:
        assert o.steering["mode"] == "always" and o.steering["profile"] == "a"
        assert o.steering["alpha"] == 0.5 and o.steering["applied"] is True
    plain = Steering.reports(qwen3_llm, generate(qwen3_llm, prompts[2:], params()))
    assert plain[0].steering is None


def test_the_offline_steering_api_refuses_bad_values_when_built():
    from adaras.engine import Steering, SteeringConfigError

    with pytest.raises(SteeringConfigError, match="steering.alpha: must be >= 0"):
        Steering(profile="a", alpha=-1.0)
    with pytest.raises(SteeringConfigError, match="steering.threshold"):
        Steering(profile="a", threshold=0.5)  # threshold belongs to adaptive
    assert Steering(mode="adaptive", threshold=0.4).args(seed=1) == {
        "seed": 1, "steering": {"mode": "adaptive", "threshold": 0.4}}
