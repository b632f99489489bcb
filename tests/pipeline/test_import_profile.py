"""`adaras import-profile`: the reference implementation's neuron CSV as a
validated profile, and every malformed or hostile list refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaras.pipeline.import_csv import import_reference_csv
from adaras.profile import ModelShape, SteeringProfile
from adaras.tiny_models import make_tiny_model

HEADER = "overall_neuron_index,layer,neuron_index_in_layer,weight,abs_weight"


def reference_rows(n: int = 12, layers: int = 2, width: int = 192, seed: int = 0):
    """(layer, neuron, weight) rows ranked as the reference ranks: by |weight|, descending."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(layers * width, size=n, replace=False)
    weight = rng.normal(0, 1, n).astype(np.float32)
    order = np.argsort(-np.abs(weight), kind="stable")
    return [(int(flat[i] // width), int(flat[i] % width), float(weight[i])) for i in order]


def write_csv(path, rows, width: int = 192, header: str = HEADER, extra: str = "") -> str:
    lines = [header + extra]
    for layer, neuron, w in rows:
        lines.append(f"{layer * width + neuron},{layer},{neuron},{w!r},{abs(w)!r}"
                     + (",False" if extra else ""))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("import") / "qwen3", "qwen3")


@pytest.fixture(scope="module")
def shape(tiny):
    from adaras.pipeline.identify import model_shape

    return model_shape(str(tiny))


def test_the_cli_writes_the_first_k_rows_in_file_order_as_a_servable_profile(tmp_path, tiny,
                                                                              shape):
    from typer.testing import CliRunner

    from adaras.cli import app

    rows = reference_rows(12)
    csv_path = write_csv(tmp_path / "top_200_neurons_by_rel_abs_diff.csv", rows,
                         extra=",useless")
    out = tmp_path / "paper.safetensors"
    result = CliRunner().invoke(app, ["import-profile", csv_path, "--model", str(tiny),
                                      "--out", str(out), "--k", "10", "--name", "paper"])
    assert result.exit_code == 0, result.output
    prof = SteeringProfile.load(out, expect=shape)
    assert prof.name == "paper" and prof.k == 10 and prof.default_alpha == 0.3
    assert list(zip(prof.layers.tolist(), prof.neurons.tolist())) == [r[:2] for r in rows[:10]]
    assert torch.equal(prof.delta, torch.tensor([r[2] for r in rows[:10]], dtype=torch.float32))
    assert prof.provenance["recipe"] == "reference" and prof.steered_prompt_positions == 1
    assert prof.sigma is None  # a list carries no spread
    assert len(prof.provenance["csv_sha256"]) == 64


def test_the_default_k_is_the_reference_configs_50(tmp_path, shape):
    prof = import_reference_csv(write_csv(tmp_path / "l.csv", reference_rows(60)), shape)
    assert prof.k == 50


def raw(path, content) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


BAD = {
    "missing column": (lambda p, rows: write_csv(p, rows, header=HEADER.replace(",abs_weight", ""))
                       , r"missing column\(s\) \['abs_weight'\]"),
    "fewer rows than k": (lambda p, rows: write_csv(p, rows[:3]), "3 neuron rows, fewer than --k 5"),
    "another intermediate size": (lambda p, rows: write_csv(p, rows, width=6144),
                                  "outside|is not layer \\* 192"),
    "layer out of range": (lambda p, rows: write_csv(p, [(7, 3, 0.5)] + rows),
                           r"neuron \(layer 7, index 3\) is outside"),
    "not a number": (lambda p, rows: raw(p, HEADER + "\n1,0,1,abc,1\n" * 6),
                     "column 'weight' is not a number: 'abc'"),
    "nan weight": (lambda p, rows: raw(p, HEADER + "\n1,0,1,nan,nan\n" * 6),
                   "column 'weight' is not finite"),
    "abs mismatch": (lambda p, rows: raw(p, HEADER + "\n1,0,1,0.5,0.7\n" * 6),
                     r"abs_weight is not \|weight\|"),
    "duplicate neuron": (lambda p, rows: write_csv(p, [rows[0]] + rows), "duplicate"),
    "not utf-8": (lambda p, rows: raw(p, b"\xff\xfe\x00bad"), "not UTF-8"),
    "no such file": (lambda p, rows: str(p) + ".missing", "no such file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_lists_are_refused_with_the_row_and_reason(tmp_path, shape, case):
    make, pattern = BAD[case]
    path = make(tmp_path / "list.csv", reference_rows(12))
    with pytest.raises(ValueError, match=pattern):
        import_reference_csv(path, shape, k=5)


def test_a_huge_upload_is_refused_before_it_is_read(tmp_path, shape, monkeypatch):
    import adaras.pipeline.import_csv as mod

    monkeypatch.setattr(mod, "MAX_CSV_BYTES", 1000)
    path = write_csv(tmp_path / "big.csv", reference_rows(40))
    with pytest.raises(ValueError, match="bytes; a neuron list is far smaller"):
        import_reference_csv(path, shape, k=5)


def test_a_list_for_another_model_shape_fails_on_the_shape(tmp_path):
    wide = ModelShape("Qwen3ForCausalLM", num_layers=28, intermediate_size=6144, hidden_size=2048)
    rows = [(27, 6000, 1.0), (0, 1, -0.5)]
    path = write_csv(tmp_path / "qwen3.csv", rows, width=6144)
    prof = import_reference_csv(path, wide, k=2)
    assert prof.layers.tolist() == [27, 0]
    small = ModelShape("Qwen3ForCausalLM", num_layers=2, intermediate_size=192, hidden_size=64)
    with pytest.raises(ValueError, match="another model"):
        import_reference_csv(path, small, k=2)


QWEN3 = {"1.7B": ModelShape("Qwen3ForCausalLM", num_layers=28, intermediate_size=6144,
                            hidden_size=2048),
         "4B": ModelShape("Qwen3ForCausalLM", num_layers=36, intermediate_size=9728,
                          hidden_size=2560)}


@pytest.mark.parametrize("name", ["AIME_Qwen3-1.7B", "AIME_Qwen3-4B", "AMC_Qwen3-1.7B",
                                  "HumanEval_Qwen3-1.7B", "Math_Qwen3-1.7B", "Mbpp_Qwen3-1.7B",
                                  "gsm8k_Qwen3-1.7B"])
def test_the_papers_released_lists_import_for_their_models(name):
    from pathlib import Path

    path = Path(__file__).parents[2] / "data" / "reference_rcns" / f"{name}.csv"
    shape = QWEN3[name.rsplit("-", 1)[1]]
    prof = import_reference_csv(path, shape)
    assert prof.k == 50 and prof.model == shape
    with pytest.raises(ValueError, match="another"):  # and only for them
        import_reference_csv(path, QWEN3["4B" if shape is QWEN3["1.7B"] else "1.7B"])
