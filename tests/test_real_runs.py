"""Real-model pipeline runs. The full runs take from minutes (SmolLM2-135M)
to hours (Qwen2.5-Coder-1.5B) on a CPU, so they are `slow` (run with
`pytest -m slow`) and their recorded results live in docs/results/. The fast
tests here check that what is committed there is consistent and loadable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaras.profile import SteeringProfile

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
RECORDED = sorted(p.parent for p in RESULTS.glob("*/profile.safetensors"))


@pytest.mark.parametrize("folder", RECORDED, ids=[p.name for p in RECORDED])
def test_recorded_profiles_load_and_match_their_reports(folder):
    prof = SteeringProfile.load(folder / "profile.safetensors")
    assert prof.predictor is not None and prof.threshold is not None
    assert prof.provenance["selection"] == "mean-diff"
    stage = "eval" if (folder / "eval").is_dir() else "screen"  # the study: screen so far
    results = json.loads((folder / stage / "results.json").read_text())
    report = (folder / stage / "report.md").read_text()
    for name, r in results["configs"].items():  # the report shows the recorded numbers
        assert f"| {name} | {r['accuracy']:.3f} |" in report
    manifest = json.loads((folder / "manifest.json").read_text())
    exported = [d.name for d in folder.iterdir() if d.is_dir()]  # every stage recorded here
    assert all(manifest["stages"][name]["status"] == "done" for name in exported)


def test_the_served_default_profile_is_the_recorded_smollm2_profile():
    from adaras.api.defaults import bundled_profile

    bundled = bundled_profile("smollm2-135m-instruct")
    assert bundled is not None, "the package must ship the SmolLM2 default profile"
    recorded = RESULTS / "smollm2-chain-sum" / "profile.safetensors"
    assert bundled.read_bytes() == recorded.read_bytes()
    prof = SteeringProfile.load(bundled)
    assert (prof.model.num_layers, prof.model.intermediate_size) == (30, 1536)  # SmolLM2-135M


def test_the_served_qwen_profile_is_the_math_study_reference_profile():
    """`adaras serve --model qwen2.5-coder-1.5b-instruct` serves the MATH study's
    stage-1 profile, the reference recipe's neurons at the reference dose, with
    its heads calibrated on their validation split (issue 31: the study's
    validation/profile-calibrated.safetensors, written by run.sh knobs)."""
    from adaras.api.defaults import bundled_profile

    bundled = bundled_profile("qwen2.5-coder-1.5b-instruct")
    assert bundled is not None, "the package must ship the Qwen2.5-Coder-1.5B profile"
    study = RESULTS / "qwen2.5-coder-1.5b-math-study"
    calibrated = study / "validation" / "profile-calibrated.safetensors"
    assert bundled.read_bytes() == calibrated.read_bytes()
    stage1 = SteeringProfile.load(study / "stage1" / "profile.safetensors")
    prof = SteeringProfile.load(bundled)
    for field in ("layers", "neurons", "delta", "sigma"):  # the same steering
        assert torch.equal(getattr(prof, field), getattr(stage1, field)), field
    knobs = json.loads((study / "validation" / "knobs.json").read_text())
    assert prof.provenance["calibration"]["answer"] == knobs["calibration"]["answer"]
    assert prof.name == "qwen2.5-coder-math"  # the name requests use
    assert (prof.model.num_layers, prof.model.intermediate_size) == (28, 8960)
    assert prof.provenance["recipe"] == "reference" and prof.default_alpha == 0.3
    assert prof.steered_prompt_positions == 1 and prof.sigma is not None
    summary = json.loads((study / "stage1" / "identify-reference-summary.json").read_text())
    assert prof.k == summary["k"] and prof.dose_in_sigma() == pytest.approx(
        summary["dose_in_sigma"], rel=1e-5)
    assert prof.predictor is not None and prof.threshold is not None
    assert prof.answer_predictor is not None  # the answer probe's head (issue 19)


def _cli(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "adaras.cli", *args], check=True, cwd=cwd)


@pytest.mark.slow
def test_smollm2_pipeline_small(tmp_path):
    """A reduced SmolLM2 run end to end through the CLI (about 10 minutes on 2 cores)."""
    run = str(tmp_path / "run")
    data = ["--dataset", "rg:chain_sum", "--option", "min_terms=2", "--option", "max_terms=2",
            "--option", "min_digits=1", "--option", "max_digits=1",
            "--option", "allow_negation=false"]
    _cli("collect", "--run", run, "--model", "smollm2-135m-instruct", *data, "--problems", "80",
         "--probe", "12", "--samples", "8", "--max-tokens", "192", cwd=tmp_path)
    _cli("identify", "--run", run, "--k", "50", cwd=tmp_path)
    _cli("train-predictor", "--run", run, cwd=tmp_path)
    _cli("eval", "--run", run, *data, "--problems", "60", "--seed", "1", "--max-tokens", "192",
         cwd=tmp_path)
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert set(results["configs"]) == {"baseline", "always", "adaptive", "random"}
    assert 0 < results["configs"]["baseline"]["accuracy"] < 1


@pytest.mark.slow
def test_qwen_pipeline_small(tmp_path):
    """Qwen2.5-Coder-1.5B on a handful of GSM problems (about an hour on 2 cores)."""
    run = str(tmp_path / "run")
    _cli("collect", "--run", run, "--model", "qwen2.5-coder-1.5b-instruct", "--dataset",
         "rg:gsm_symbolic", "--problems", "30", "--probe", "4", "--samples", "6",
         "--temperature", "0.8", "--max-tokens", "512", cwd=tmp_path)
    _cli("identify", "--run", run, "--k", "50", cwd=tmp_path)
    _cli("train-predictor", "--run", run, cwd=tmp_path)
    _cli("eval", "--run", run, "--problems", "10", "--seed", "1", "--max-tokens", "512",
         "--modes", "baseline,always,adaptive", cwd=tmp_path)
    assert (tmp_path / "run" / "eval" / "report.md").exists()
