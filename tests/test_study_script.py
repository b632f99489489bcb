"""The MATH study's run.sh carries an eval stage's answers across machines:
`save` writes them (and the stage's results) beside the README, and a stage
restores them before it starts, so it resumes instead of generating again."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = (Path(__file__).resolve().parents[1] / "docs" / "results"
          / "qwen2.5-coder-1.5b-math-study" / "run.sh")


def run_sh(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RUN": str(tmp_path / "run"), "STUDY": str(tmp_path / "study")}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_save_then_restore_round_trips_a_stages_answers(tmp_path):
    stage = tmp_path / "run" / "dev"
    stage.mkdir(parents=True)
    rows = [{"key": f"baseline|p{i}", "correct": i % 2 == 0} for i in range(3)]
    (stage / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (stage / "results.json").write_text('{"configs": {}}\n')
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(
        {"stages": {"dev": {"status": "running", "args": {"problems": 3}}}}))

    saved = run_sh(tmp_path, "save", "dev")
    assert saved.returncode == 0, saved.stderr
    study = tmp_path / "study" / "dev"
    with gzip.open(study / "generations.jsonl.gz", "rt") as f:
        assert [json.loads(line) for line in f] == rows
    assert (study / "results.json").exists() and not (study / "report.md").exists()
    assert json.loads((study / "manifest.json").read_text())["args"] == {"problems": 3}

    (stage / "generations.jsonl").unlink()  # a new machine: the run folder is gone
    (tmp_path / "run" / "manifest.json").unlink()
    restored = run_sh(tmp_path, "restore", "dev")
    assert restored.returncode == 0 and "restored 3 answers" in restored.stdout
    assert (stage / "generations.jsonl").read_text().splitlines() == \
        [json.dumps(r) for r in rows]
    # with its manifest entry: a resumed stage still refuses other arguments
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["dev"]["args"] == {"problems": 3}

    (stage / "generations.jsonl").write_text(json.dumps(rows[0]) + "\n")  # newer work here
    assert run_sh(tmp_path, "restore", "dev").returncode == 0
    assert len((stage / "generations.jsonl").read_text().splitlines()) == 1  # never clobbered


def test_save_of_a_running_stage_keeps_complete_answers_only(tmp_path):
    """`remaining` saves a stage while it writes: a line cut short is left out."""
    stage = tmp_path / "run" / "confirm"
    stage.mkdir(parents=True)
    rows = [{"key": f"baseline|p{i}", "correct": True} for i in range(2)]
    (stage / "generations.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"key": "always|p0", "corr')
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"stages": {"confirm": {}}}))
    saved = run_sh(tmp_path, "save", "confirm")
    assert saved.returncode == 0 and "saved 2 answers" in saved.stdout, saved.stderr
    with gzip.open(tmp_path / "study" / "confirm" / "generations.jsonl.gz", "rt") as f:
        assert [json.loads(line) for line in f] == rows
    assert not list((tmp_path / "study" / "confirm").glob("*.tmp"))
    # a run folder with fewer answers than the saved copy (restored from an older save
    # on a new machine) never shrinks it: the saved copy is the durable one
    (stage / "generations.jsonl").write_text(json.dumps(rows[0]) + "\n")
    again = run_sh(tmp_path, "save", "confirm")
    assert again.returncode == 0 and "fewer than the 2" in again.stderr
    with gzip.open(tmp_path / "study" / "confirm" / "generations.jsonl.gz", "rt") as f:
        assert len(f.read().splitlines()) == 2


def test_remaining_skips_every_stage_whose_results_are_saved(tmp_path):
    study = tmp_path / "study"
    for stage in ("dev", "confirm", "best-of-n", "humaneval"):
        (study / stage).mkdir(parents=True)
        (study / stage / "results.json").write_text("{}\n")
    (study / "confirm-registration.json").write_text("{}\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Intel Xeon\nflags\t\t: avx512f avx512_bf16\n")
    env = {**os.environ, "RUN": str(tmp_path / "run"), "STUDY": str(study),
           "CPUINFO": str(cpuinfo)}
    out = subprocess.run(["bash", str(SCRIPT), "remaining"], env=env, capture_output=True,
                         text=True, timeout=60)  # an engine would take minutes to start
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(") is done") == 4 and "every stage is done" in out.stdout
    assert not (tmp_path / "run").exists()  # nothing ran


@pytest.mark.parametrize("args", [("save", "dev"), ("save",), ("restore",)])
def test_save_and_restore_refuse_without_a_stage_or_answers(tmp_path, args):
    out = run_sh(tmp_path, *args)
    assert out.returncode != 0 and out.stderr


@pytest.mark.parametrize("stage", ["pilot", "stage1", "bundle"])
def test_smoke_mode_never_runs_a_stage_that_writes_real_results(tmp_path, stage):
    out = subprocess.run(["bash", str(SCRIPT), stage], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "SMOKE": "1",
                                          "RUN_SMOKE": str(tmp_path / "run")})
    assert out.returncode == 2 and "not in SMOKE mode" in out.stderr


def test_a_generating_stage_refuses_a_cpu_without_avx512_bf16(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"  # an AVX2 EPYC, as on 2026-12-03
    cpuinfo.write_text("model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n")
    env = {**os.environ, "RUN": str(tmp_path / "run"), "STUDY": str(tmp_path / "study"),
           "CPUINFO": str(cpuinfo)}
    for stage in ("dev", "confirm", "best-of-n", "humaneval", "remaining"):
        out = subprocess.run(["bash", str(SCRIPT), stage], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 3 and "no AVX-512 bf16 (AMD EPYC)" in out.stderr, out.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_smoke_run_of_every_generating_stage(tmp_path):
    """SMOKE=1 on SmolLM2: dev, save, register, confirm, save, then a new machine
    (the run folder deleted) that resumes confirm from the saved answers, and
    `remaining`, which skips what is saved and runs (and saves) best-of-n and
    humaneval. About 20 minutes on 2 cores; run it before a real
    stage after changing run.sh or the pipeline (`pytest -m slow -k smoke`)."""
    env = {**os.environ, "SMOKE": "1", "RUN_SMOKE": str(tmp_path / "run"),
           "STUDY": str(tmp_path / "study")}

    def stage(*args):
        out = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                             text=True, timeout=1800)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    study = tmp_path / "study"
    stage("dev")
    stage("save", "dev")
    register = subprocess.run(["bash", str(SCRIPT), "register"], env=env, capture_output=True,
                              text=True, timeout=300)
    assert register.returncode == 0, register.stderr[-2000:]
    reg = json.loads((study / "confirm-registration.json").read_text())
    assert 0 < reg["adaptive_threshold"] < 1 and reg["arms"]["noise"] == 3
    stage("confirm")
    stage("save", "confirm")
    first = json.loads((study / "confirm" / "manifest.json").read_text())
    answers = gzip.open(study / "confirm" / "generations.jsonl.gz", "rt").read().splitlines()
    assert len(answers) == 5 * 8 + 3

    import shutil
    shutil.rmtree(tmp_path / "run")  # a new machine
    again = stage("confirm")
    assert "restored 43 answers of confirm" in again.stdout
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["confirm"]
    assert manifest["results"]["preregistered"] == first["results"]["preregistered"]
    assert manifest["attempts"] == first["attempts"] + 1
    assert len((tmp_path / "run" / "confirm" / "generations.jsonl").read_text().splitlines()) == 43
    # the rest in one job, as a session starts it: dev and confirm are saved as done
    env["SAVE_EVERY"] = "5"
    rest = stage("remaining")
    assert "dev (results saved" in rest.stdout and "confirm (results saved" in rest.stdout
    for name, answers in (("best-of-n", "samples"), ("humaneval", "generations")):
        assert (study / name / "results.json").exists()
        assert (study / name / f"{answers}.jsonl.gz").exists()
    results = json.loads((tmp_path / "run" / "humaneval" / "results.json").read_text())
    assert set(results["configs"]) == {"baseline", "always"}
