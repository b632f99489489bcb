import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from adaras.predictor import FailurePredictor
from adaras.profile import ModelShape, ProfileError, SteeringProfile

SHAPE = ModelShape("LlamaForCausalLM", num_layers=6, intermediate_size=48, hidden_size=16)


def make_profile(k: int = 40, with_predictor: bool = True) -> SteeringProfile:
    p = SteeringProfile.random("gsm8k-llama_v1.0", SHAPE, k, seed=3)
    p.default_alpha = 0.45
    p.threshold = 0.6
    p.provenance = {"dataset": "gsm8k", "problems": 100, "pairs": 250, "k": k, "selection": {"top": k}}
    if with_predictor:
        torch.manual_seed(0)
        fl = torch.tensor([0, 1, 5, 5, 2], dtype=torch.int32)
        fn = torch.tensor([0, 47, 3, 9, 20], dtype=torch.int32)
        pred = FailurePredictor(fl, fn, hidden=8)
        with torch.no_grad():
            pred.mean.copy_(torch.randn(5))
            pred.std.copy_(torch.rand(5) + 0.5)
        p.predictor = pred.eval()
    return p


def good_parts(p: SteeringProfile | None = None):
    """(tensors, metadata) exactly as save() would write them, for hand-made broken files."""
    p = p or make_profile()
    tensors = {"layers": p.layers.clone(), "neurons": p.neurons.clone(), "delta": p.delta.clone()}
    for key, t in p.predictor.to_tensors().items():
        tensors["predictor." + key] = t
    metadata = {
        "format": "adaras-profile",
        "format_version": "1",
        "name": p.name,
        "default_alpha": "0.45",
        "threshold": "0.6",
        "model": json.dumps(SHAPE.__dict__),
        "provenance": json.dumps(p.provenance),
        "predictor": json.dumps(p.predictor.config()),
    }
    return tensors, metadata


def write(tmp_path, tensors, metadata, name="broken.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------ round trip
def test_round_trip_preserves_everything(tmp_path):
    p = make_profile()
    path = tmp_path / "p.safetensors"
    p.save(path)
    q = SteeringProfile.load(path)
    for attr in ("layers", "neurons", "delta"):
        a, b = getattr(p, attr), getattr(q, attr)
        assert torch.equal(a, b) and a.dtype == b.dtype, attr
    assert q.name == p.name
    assert q.model == p.model
    assert q.default_alpha == p.default_alpha
    assert q.threshold == p.threshold
    assert q.provenance == p.provenance
    assert q.summary() == p.summary()
    assert q.fingerprint() == p.fingerprint()
    pt, qt = p.predictor.to_tensors(), q.predictor.to_tensors()
    assert pt.keys() == qt.keys()
    for key in pt:
        assert torch.equal(pt[key], qt[key]), key
    assert q.predictor.config() == p.predictor.config()
    x = torch.randn(13, 5)
    assert q.predictor.prob(x) == p.predictor.prob(x)


def test_round_trip_without_predictor_or_threshold(tmp_path):
    p = make_profile(with_predictor=False)
    p.threshold = None
    p.save(tmp_path / "p.safetensors")
    q = SteeringProfile.load(tmp_path / "p.safetensors")
    assert q.predictor is None and q.threshold is None
    assert q.summary()["has_predictor"] is False
    assert torch.equal(q.delta, p.delta)


def test_summary_is_json():
    s = make_profile().summary()
    json.dumps(s)
    assert s["k"] == 40 and s["has_predictor"] is True
    assert set(s) == {
        "name", "k", "default_alpha", "threshold", "model", "provenance",
        "layer_histogram", "has_predictor", "has_answer_predictor", "dose_in_sigma",
        "fingerprint",
    }


def test_empty_profile_warns(tmp_path):
    p = make_profile(k=0, with_predictor=False)
    with pytest.warns(UserWarning, match="K = 0"):
        p.save(tmp_path / "empty.safetensors")
    with pytest.warns(UserWarning, match="K = 0"):
        q = SteeringProfile.load(tmp_path / "empty.safetensors")
    assert q.k == 0 and q.by_layer() == {} and q.layer_histogram() == [0] * SHAPE.num_layers


def test_no_warning_for_nonempty(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_profile().save(tmp_path / "p.safetensors")


# ------------------------------------------------------------------- queries
def test_by_layer_and_histogram_match_manual():
    p = SteeringProfile.random("r", SHAPE, 100, seed=7)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    p.layers, p.neurons, p.delta = p.layers[perm], p.neurons[perm], p.delta[perm]  # unsorted entries
    manual: dict[int, list[tuple[int, float]]] = {}
    for layer, neuron, d in zip(p.layers.tolist(), p.neurons.tolist(), p.delta.tolist()):
        manual.setdefault(layer, []).append((neuron, d))
    got = p.by_layer()
    assert set(got) == set(manual)
    for layer, pairs in manual.items():
        pairs.sort()
        neurons, delta = got[layer]
        assert neurons.dtype == torch.int64 and delta.dtype == torch.float32
        assert neurons.tolist() == [n for n, _ in pairs]
        assert torch.equal(delta, torch.tensor([d for _, d in pairs], dtype=torch.float32))
    hist = p.layer_histogram()
    assert hist == [len(manual.get(i, [])) for i in range(SHAPE.num_layers)]
    assert sum(hist) == p.k


def test_random_profile_is_unique_and_valid():
    p = SteeringProfile.random("r", SHAPE, SHAPE.num_layers * SHAPE.intermediate_size, seed=1)
    p.validate(SHAPE)
    pairs = set(zip(p.layers.tolist(), p.neurons.tolist()))
    assert len(pairs) == p.k
    assert torch.equal(SteeringProfile.random("r", SHAPE, 10, seed=5).delta, SteeringProfile.random("r", SHAPE, 10, seed=5).delta)


def test_fingerprint(tmp_path):
    p = make_profile()
    fp = p.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    p.save(tmp_path / "p.safetensors")
    assert SteeringProfile.load(tmp_path / "p.safetensors").fingerprint() == fp
    # entry order does not matter
    perm = torch.randperm(p.k)
    q = SteeringProfile(p.name, p.layers[perm], p.neurons[perm], p.delta[perm], p.model)
    assert q.fingerprint() == fp
    # any delta change does
    p.delta[7] += 1e-3
    assert p.fingerprint() != fp
    p.delta[7] -= 1e-3
    p.model = ModelShape("LlamaForCausalLM", 6, 48, 32)
    assert p.fingerprint() != fp


# ----------------------------------------------------------------- ModelShape
def test_model_shape_compatibility():
    assert SHAPE.compatible_with(ModelShape("SteeredLlamaForCausalLM", 6, 48, 16))
    assert SHAPE.compatible_with(ModelShape("llamaforcausallm", 6, 48, 16))
    assert SHAPE.compatible_with(ModelShape("", 6, 48, 16))
    assert not SHAPE.compatible_with(ModelShape("Qwen3ForCausalLM", 6, 48, 16))
    assert not SHAPE.compatible_with(ModelShape("LlamaForCausalLM", 7, 48, 16))
    assert not SHAPE.compatible_with(ModelShape("LlamaForCausalLM", 6, 49, 16))
    assert not SHAPE.compatible_with(ModelShape("LlamaForCausalLM", 6, 48, 17))


def test_model_shape_from_hf_config():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        num_hidden_layers=6, intermediate_size=48, hidden_size=16,
        num_attention_heads=4, num_key_value_heads=4, architectures=["LlamaForCausalLM"],
    )
    assert ModelShape.from_hf_config(cfg) == SHAPE
    nested = SimpleNamespace(
        architectures=["Gemma3ForConditionalGeneration"],
        text_config=SimpleNamespace(num_hidden_layers=6, intermediate_size=48, hidden_size=16),
    )
    assert ModelShape.from_hf_config(nested) == ModelShape("Gemma3ForConditionalGeneration", 6, 48, 16)
    as_dict = {"architectures": ["X"], "text_config": {"num_hidden_layers": 6, "intermediate_size": 48}, "hidden_size": 16}
    assert ModelShape.from_hf_config(as_dict) == ModelShape("X", 6, 48, 16)
    with pytest.raises(ProfileError, match="intermediate_size"):
        ModelShape.from_hf_config(SimpleNamespace(architectures=None, num_hidden_layers=2, hidden_size=4))


# ----------------------------------------------------------------- refusals
def test_expect_mismatch_shows_both_shapes(tmp_path):
    path = tmp_path / "p.safetensors"
    make_profile().save(path)
    other = ModelShape("Qwen3ForCausalLM", 28, 3072, 1024)
    with pytest.raises(ProfileError, match="another model shape") as e:
        SteeringProfile.load(path, expect=other)
    msg = str(e.value)
    assert str(path) in msg and "LlamaForCausalLM" in msg and "Qwen3ForCausalLM" in msg and "3072" in msg
    assert SteeringProfile.load(path, expect=ModelShape("SteeredLlamaForCausalLM", 6, 48, 16)).k == 40


def _set(d, key, value):
    d[key] = value


def _bad_entry(key, index, value):
    def mutate(t, m):
        t[key] = t[key].clone()
        t[key][index] = value

    return mutate


BROKEN = {
    "layer out of range": (_bad_entry("layers", 3, 6), r"entry 3: layer index 6 is out of range; valid range is 0\.\.5"),
    "negative layer": (_bad_entry("layers", 0, -1), "layer index -1 is out of range"),
    "neuron out of range": (_bad_entry("neurons", 5, 48), r"entry 5: neuron index 48 is out of range; valid range is 0\.\.47"),
    "nan delta": (_bad_entry("delta", 2, float("nan")), "NaN or Inf"),
    "inf delta": (_bad_entry("delta", 2, float("inf")), "NaN or Inf"),
    "duplicate pair": (
        lambda t, m: (_bad_entry("layers", 9, int(t["layers"][4]))(t, m), _bad_entry("neurons", 9, int(t["neurons"][4]))(t, m)),
        r"duplicate \(layer, neuron\) pair .* at entries 4 and 9",
    ),
    "unknown format": (lambda t, m: _set(m, "format", "gguf"), "unknown format 'gguf'"),
    "unknown version": (lambda t, m: _set(m, "format_version", "3"), "unsupported format_version '3'"),
    "v1 with sigma": (lambda t, m: _set(t, "sigma", torch.ones(40)),
                      "unexpected tensor 'sigma' \\(a format_version 1 profile has no such tensor\\)"),
    "missing format": (lambda t, m: m.pop("format"), "missing metadata key 'format'"),
    "missing name": (lambda t, m: m.pop("name"), "missing metadata key 'name'"),
    "missing model": (lambda t, m: m.pop("model"), "missing metadata key 'model'"),
    "missing default_alpha": (lambda t, m: m.pop("default_alpha"), "missing metadata key 'default_alpha'"),
    "missing provenance": (lambda t, m: m.pop("provenance"), "missing metadata key 'provenance'"),
    "missing delta": (lambda t, m: t.pop("delta"), "missing tensor 'delta'"),
    "missing layers": (lambda t, m: t.pop("layers"), "missing tensor 'layers'"),
    "unexpected tensor": (lambda t, m: _set(t, "bias", torch.zeros(3)), "unexpected tensor 'bias'"),
    "length mismatch": (lambda t, m: _set(t, "delta", t["delta"][:-1].clone()), "mismatched tensor lengths"),
    "layers int64": (lambda t, m: _set(t, "layers", t["layers"].long()), "tensor 'layers' has dtype int64, expected int32"),
    "delta float16": (lambda t, m: _set(t, "delta", t["delta"].half()), "tensor 'delta' has dtype float16, expected float32"),
    "2-D delta": (lambda t, m: _set(t, "delta", t["delta"].reshape(8, 5).clone()), "'delta' must be 1-D"),
    "negative alpha": (lambda t, m: _set(m, "default_alpha", "-0.1"), "default_alpha must be a finite number >= 0"),
    "nan alpha": (lambda t, m: _set(m, "default_alpha", "nan"), "default_alpha must be a finite number >= 0"),
    "alpha not a number": (lambda t, m: _set(m, "default_alpha", "strong"), "'default_alpha' is not a number"),
    "threshold > 1": (lambda t, m: _set(m, "threshold", "1.5"), r"threshold must be a probability in \[0, 1\]"),
    "threshold < 0": (lambda t, m: _set(m, "threshold", "-0.01"), r"threshold must be a probability in \[0, 1\]"),
    "threshold nan": (lambda t, m: _set(m, "threshold", "nan"), r"threshold must be a probability"),
    "bad name traversal": (lambda t, m: _set(m, "name", "../../etc/passwd"), "invalid profile name"),
    "bad name dots": (lambda t, m: _set(m, "name", "a..b"), "invalid profile name"),
    "bad name slash": (lambda t, m: _set(m, "name", "a/b"), "invalid profile name"),
    "bad name empty": (lambda t, m: _set(m, "name", ""), "invalid profile name"),
    "bad name newline": (lambda t, m: _set(m, "name", "abc\n"), "invalid profile name"),
    "bad name too long": (lambda t, m: _set(m, "name", "a" * 65), "invalid profile name"),
    "model bad json": (lambda t, m: _set(m, "model", "{architecture: llama"), "metadata 'model' is malformed JSON"),
    "model not object": (lambda t, m: _set(m, "model", "[1, 2]"), "metadata 'model' must be a JSON object"),
    "model missing field": (
        lambda t, m: _set(m, "model", json.dumps({"architecture": "x", "num_layers": 6, "hidden_size": 16})),
        "metadata 'model' is missing the field 'intermediate_size'",
    ),
    "model bad int": (
        lambda t, m: _set(m, "model", json.dumps({**SHAPE.__dict__, "num_layers": "6"})),
        "'num_layers' must be a positive integer",
    ),
    "provenance bad json": (lambda t, m: _set(m, "provenance", "{'dataset': 'gsm8k'}"), "metadata 'provenance' is malformed JSON"),
    "predictor nan": (
        lambda t, m: _set(t, "predictor.fc1.weight", torch.full_like(t["predictor.fc1.weight"], float("nan"))),
        r"'predictor\.fc1\.weight' contains NaN",
    ),
    "predictor missing tensor": (lambda t, m: t.pop("predictor.attn.bias"), r"'predictor\.attn\.bias' is missing"),
    "predictor wrong shape": (
        lambda t, m: _set(t, "predictor.fc1.weight", torch.zeros(9, 5)),
        r"'predictor\.fc1\.weight' has shape \[9, 5\], expected \[8, 5\]",
    ),
    "predictor feature out of range": (
        _bad_entry("predictor.feature_neurons", 1, 48),
        r"predictor feature entry 1: neuron index 48 is out of range",
    ),
    "predictor feature layer out of range": (
        _bad_entry("predictor.feature_layers", 0, 99),
        r"predictor feature entry 0: layer index 99 is out of range",
    ),
    "predictor config missing": (lambda t, m: m.pop("predictor"), "no 'predictor' metadata"),
    "predictor tensors missing": (
        lambda t, m: [t.pop(k) for k in list(t) if k.startswith("predictor.")],
        r"no 'predictor\.\*' tensors",
    ),
    "predictor config bad json": (lambda t, m: _set(m, "predictor", "{"), "metadata 'predictor' is malformed JSON"),
    "predictor config wrong type": (
        lambda t, m: _set(m, "predictor", json.dumps({**json.loads(m["predictor"]), "type": "gbdt"})),
        "predictor config 'type' is 'gbdt'",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_file_refused(tmp_path, case):
    mutate, keyword = BROKEN[case]
    tensors, metadata = good_parts()
    mutate(tensors, metadata)
    path = write(tmp_path, tensors, metadata)
    with pytest.raises(ProfileError, match=keyword) as e:
        SteeringProfile.load(path)
    assert str(path) in str(e.value)  # always names the file


def test_good_parts_loads(tmp_path):
    """The hand-made file used by the refusal tests is itself valid."""
    tensors, metadata = good_parts()
    assert SteeringProfile.load(write(tmp_path, tensors, metadata)).k == 40


def test_missing_and_non_safetensors_files(tmp_path):
    with pytest.raises(ProfileError, match="does not exist") as e:
        SteeringProfile.load(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(e.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ProfileError, match="not a readable safetensors file"):
        SteeringProfile.load(junk)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ProfileError, match="not a readable safetensors file"):
        SteeringProfile.load(empty)
    with pytest.raises(ProfileError, match="not a regular file"):
        SteeringProfile.load(tmp_path)
    # a valid safetensors file without the profile metadata
    plain = write(tmp_path, {"x": torch.zeros(2)}, None, name="plain.safetensors")
    with pytest.raises(ProfileError, match="not an AdaRAS steering profile"):
        SteeringProfile.load(plain)


@pytest.mark.parametrize("name", ["../evil", "..", "a/b", "a\\b", ".hidden", "-x", "x..y", "a b", "é", "a" * 65])
def test_path_traversal_names_refused_in_memory(tmp_path, name):
    p = make_profile()
    p.name = name
    with pytest.raises(ProfileError, match="invalid profile name"):
        p.validate()
    with pytest.raises(ProfileError, match="invalid profile name"):
        p.save(tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize("name", ["a", "gsm8k", "Llama-3.1_8B.v2", "0" * 64])
def test_good_names_accepted(name):
    p = make_profile()
    p.name = name
    p.validate()


def test_validate_in_memory_refusals():
    p = make_profile()
    p.default_alpha = -1.0
    with pytest.raises(ProfileError, match="default_alpha"):
        p.validate()
    p = make_profile()
    p.threshold = 2.0
    with pytest.raises(ProfileError, match="threshold"):
        p.validate()
    p = make_profile()
    p.layers = p.layers.long()
    with pytest.raises(ProfileError, match="'layers' has dtype int64, expected int32"):
        p.validate()
    p = make_profile()
    with torch.no_grad():
        p.predictor.mean[0] = float("inf")
    with pytest.raises(ProfileError, match=r"'predictor\.mean' contains NaN or Inf"):
        p.validate()
    p = make_profile()
    p.provenance = {"when": object()}
    with pytest.raises(ProfileError, match="provenance is not JSON-serialisable"):
        p.validate()
    p = make_profile()
    with pytest.raises(ProfileError, match="another model shape"):
        p.validate(ModelShape("LlamaForCausalLM", 6, 64, 16))


def test_unwritable_path_is_profile_error(tmp_path):
    with pytest.raises(ProfileError, match="cannot write"):
        make_profile().save(tmp_path / "no" / "such" / "dir" / "p.safetensors")


def test_read_validates_and_fingerprints_from_one_read_of_the_file(tmp_path, monkeypatch):
    """The server's load-by-path: one read gives the profile and its version."""
    import pathlib

    import safetensors

    from adaras.profile import file_version

    path = tmp_path / "p.safetensors"
    want = SteeringProfile.random("p", SHAPE, k=6, seed=2)
    want.save(path)
    reads = []
    real = pathlib.Path.read_bytes
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: reads.append(self) or real(self))
    monkeypatch.setattr(safetensors, "safe_open", None)  # no second read through safetensors
    profile, version = SteeringProfile.read(path, expect=SHAPE)
    assert reads == [path] and version == file_version(path)
    assert torch.equal(profile.delta, want.delta) and torch.equal(profile.neurons, want.neurons)
    path.write_bytes(b"\x08" + b"\0" * 7 + b"{oops}!!")
    with pytest.raises(ProfileError, match="not a readable safetensors file"):
        SteeringProfile.read(path, expect=SHAPE)


# ------------------------------------------------------------ format version 2
def make_v2(k: int = 40) -> SteeringProfile:
    p = make_profile(k)
    p.sigma = torch.linspace(0.05, 2.0, k)  # float32 [K]
    torch.manual_seed(1)
    head = FailurePredictor(torch.tensor([3, 4], dtype=torch.int32),
                            torch.tensor([1, 2], dtype=torch.int32), hidden=4)
    p.answer_predictor = head.eval()
    return p


def test_v2_round_trip_keeps_sigma_and_both_heads(tmp_path):
    p = make_v2()
    p.save(tmp_path / "p.safetensors")
    q = SteeringProfile.load(tmp_path / "p.safetensors")
    assert torch.equal(q.sigma, p.sigma) and q.sigma.dtype == torch.float32
    x = torch.randn(7, 2)
    assert q.answer_predictor.prob(x) == p.answer_predictor.prob(x)
    assert q.answer_predictor.config() == p.answer_predictor.config()
    assert q.predictor.config() == p.predictor.config()
    assert q.summary() == p.summary() and q.summary()["has_answer_predictor"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        assert f.metadata()["format_version"] == "2"
        assert {k.split(".")[0] for k in f.keys()} == {"layers", "neurons", "delta", "sigma",
                                                        "predictor", "answer_predictor"}


@pytest.mark.parametrize("heads", [(), ("predictor",), ("answer_predictor",),
                                   ("predictor", "answer_predictor")])
def test_a_profile_carries_neither_one_or_both_heads(tmp_path, heads):
    p = make_v2()
    for head in ("predictor", "answer_predictor"):
        if head not in heads:
            setattr(p, head, None)
    p.save(tmp_path / "p.safetensors")
    q = SteeringProfile.load(tmp_path / "p.safetensors")
    assert (q.predictor is not None, q.answer_predictor is not None) == \
        ("predictor" in heads, "answer_predictor" in heads)


def test_v1_files_still_load_without_sigma_or_answer_head(tmp_path):
    q = SteeringProfile.load(write(tmp_path, *good_parts()))
    assert q.sigma is None and q.answer_predictor is None and q.predictor is not None
    assert q.dose_in_sigma() is None


def test_dose_in_sigma_is_mean_alpha_delta_over_sigma_and_linear_in_alpha():
    p = make_v2(3)
    p.delta = torch.tensor([1.0, -2.0, 0.5])
    p.sigma = torch.tensor([0.5, 4.0, 0.0])  # the last has no spread: left out
    assert p.dose_in_sigma(0.3) == pytest.approx(0.3 * (2.0 + 0.5) / 2)
    assert p.dose_in_sigma(0.6) == pytest.approx(2 * p.dose_in_sigma(0.3))
    assert p.dose_in_sigma(0.0) == 0.0
    p.default_alpha = 0.3
    assert p.dose_in_sigma() == p.dose_in_sigma(0.3)


def _v2_parts():
    p = make_v2()
    tensors, metadata = good_parts(p)
    metadata["format_version"] = "2"
    tensors["sigma"] = p.sigma.clone()
    for key, t in p.answer_predictor.to_tensors().items():
        tensors["answer_predictor." + key] = t
    metadata["answer_predictor"] = json.dumps(p.answer_predictor.config())
    return tensors, metadata


BROKEN_V2 = {
    "negative sigma": (_bad_entry("sigma", 4, -0.1), "sigma must be finite and >= 0"),
    "nan sigma": (_bad_entry("sigma", 4, float("nan")), "sigma must be finite and >= 0"),
    "sigma length": (lambda t, m: _set(t, "sigma", t["sigma"][:-2].clone()),
                     "tensor 'sigma' has 38 entries; 'delta' has 40"),
    "sigma float64": (lambda t, m: _set(t, "sigma", t["sigma"].double()),
                      "tensor 'sigma' must be a 1-D float32 tensor"),
    "answer head without config": (lambda t, m: m.pop("answer_predictor"),
                                   "has 'answer_predictor.\\*' tensors but no 'answer_predictor' "
                                   "metadata"),
    "answer config without tensors": (
        lambda t, m: [t.pop(k) for k in list(t) if k.startswith("answer_predictor.")],
        "metadata 'answer_predictor' is present but there are no 'answer_predictor.\\*' tensors"),
    "answer feature out of range": (_bad_entry("answer_predictor.feature_neurons", 1, 48),
                                    "answer_predictor feature entry 1: neuron index 48 is out of "
                                    "range"),
    "answer config bad json": (lambda t, m: _set(m, "answer_predictor", "{"),
                               "metadata 'answer_predictor' is malformed JSON"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_V2))
def test_broken_v2_profiles_are_refused_with_a_clear_message(tmp_path, case):
    mutate, pattern = BROKEN_V2[case]
    tensors, metadata = _v2_parts()
    assert SteeringProfile.load(write(tmp_path, tensors, metadata, "ok.safetensors")).sigma \
        is not None
    mutate(tensors, metadata)
    with pytest.raises(ProfileError, match=pattern):
        SteeringProfile.load(write(tmp_path, tensors, metadata))
