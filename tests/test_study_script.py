"""The MATH study's run.sh carries an eval stage's answers across machines:
`save` writes them (and the stage's results) beside the README, and a stage
restores them before it starts, so it resumes instead of generating again."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
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
    assert json.loads((study / "manifest.json").read_text())["args"] == {"problems": 3}
    # results only of a stage that finished: `remaining` takes a saved results.json as done
    assert not (study / "results.json").exists()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(
        {"stages": {"dev": {"status": "done", "args": {"problems": 3}}}}))
    assert run_sh(tmp_path, "save", "dev").returncode == 0
    assert (study / "results.json").exists() and not (study / "report.md").exists()

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
    # on a new machine) never shrinks it: the saved copy is the durable one, and its
    # manifest entry stays the one saved with it
    saved_entry = (tmp_path / "study" / "confirm" / "manifest.json").read_text()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(
        {"stages": {"confirm": {"attempts": 9}}}))
    (stage / "generations.jsonl").write_text(json.dumps(rows[0]) + "\n")
    again = run_sh(tmp_path, "save", "confirm")
    assert again.returncode == 0 and "fewer than the 2" in again.stderr
    with gzip.open(tmp_path / "study" / "confirm" / "generations.jsonl.gz", "rt") as f:
        assert len(f.read().splitlines()) == 2
    assert (tmp_path / "study" / "confirm" / "manifest.json").read_text() == saved_entry
    # a save whose compression fails (a full disk) leaves the saved copy as it was
    (stage / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    fake = tmp_path / "bin"
    fake.mkdir()
    real = shutil.which("gzip")  # decompression still works (gunzip calls gzip -d)
    (fake / "gzip").write_text(f"#!/bin/sh\ncase \" $* \" in *\" -d\"*) exec {real} \"$@\";; esac\n"
                               "printf trunc\nexit 1\n")
    (fake / "gzip").chmod(0o755)
    env = {**os.environ, "RUN": str(tmp_path / "run"), "STUDY": str(tmp_path / "study"),
           "PATH": f"{fake}:{os.environ['PATH']}"}
    failed = subprocess.run(["bash", str(SCRIPT), "save", "confirm"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode != 0 and "could not write" in failed.stderr
    with gzip.open(tmp_path / "study" / "confirm" / "generations.jsonl.gz", "rt") as f:
        assert len(f.read().splitlines()) == 2
    assert not list((tmp_path / "study").rglob("*.tmp")) and not list(stage.glob(".*.tmp"))


def test_two_saves_of_one_stage_at_once_both_succeed(tmp_path):
    """A save by hand while `remaining` saves the same stage: one waits for the other."""
    stage = tmp_path / "run" / "confirm"
    stage.mkdir(parents=True)
    rng = np.random.default_rng(0)  # incompressible enough that a save takes a while
    rows = [{"key": f"k{i}", "completion": rng.bytes(600).hex()} for i in range(4000)]
    (stage / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"stages": {"confirm": {}}}))
    env = {**os.environ, "RUN": str(tmp_path / "run"), "STUDY": str(tmp_path / "study")}
    saves = [subprocess.Popen(["bash", str(SCRIPT), "save", "confirm"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [s.communicate(timeout=120) for s in saves]
    assert [s.returncode for s in saves] == [0, 0], outs
    with gzip.open(tmp_path / "study" / "confirm" / "generations.jsonl.gz", "rt") as f:
        assert len(f.read().splitlines()) == 4000
    assert not [p for p in stage.iterdir() if p.name.startswith(".") and "lock" not in p.name]


def test_remaining_skips_every_stage_whose_results_are_saved(tmp_path):
    study = _study(tmp_path, _config(300, 120, 20, 20))
    (study / "validation").mkdir()
    (study / "validation" / "results.json").write_text("{}\n")
    env = {**os.environ, "RUN": str(tmp_path / "run"), "STUDY": str(study)}
    out = subprocess.run(["bash", str(SCRIPT), "remaining"], env=env, capture_output=True,
                         text=True, timeout=60)  # an engine would take minutes to start
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(") is done") == 2 and "every stage is done" in out.stdout
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".remaining.lock"]  # nothing ran
    assert json.loads((study / "verdict.json").read_text())["outcome"]  # then the verdict


def test_remaining_refuses_heldout_until_its_registration_is_committed(tmp_path):
    study = tmp_path / "study"
    (study / "validation").mkdir(parents=True)
    (study / "validation" / "results.json").write_text("{}\n")
    (study / "heldout-registration.json").write_text("{}\n")  # written, not in git
    env = {**os.environ, "RUN": str(tmp_path / "run"), "STUDY": str(study)}
    out = subprocess.run(["bash", str(SCRIPT), "remaining"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 5 and "before heldout runs" in out.stderr
    assert not (tmp_path / "run" / "heldout").exists()


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


@pytest.mark.parametrize(("flags", "isa"), [
    ("fpu sse2 avx avx2 fma", "avx2"), ("avx2 avx512f", "avx512"),
    ("avx2 avx512f avx512_bf16", "avx512_bf16")])
def test_every_stage_runs_float32_on_either_cpu_kind_and_says_which(tmp_path, flags, isa):
    """The 2026-12-08 amendment: no kind is refused; the dtype is float32."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"model name\t: AMD EPYC\nflags\t\t: {flags}\n")
    bin_ = tmp_path / "bin"  # a python3 that only says what it was asked to run
    bin_.mkdir()
    (bin_ / "python3").write_text('#!/bin/bash\necho "python3 $*" >> "$LOG"\n')
    (bin_ / "python3").chmod(0o755)
    env = {**os.environ, "RUN": str(tmp_path / "run"), "STUDY": str(tmp_path / "study"),
           "CPUINFO": str(cpuinfo), "PATH": f"{bin_}:{os.environ['PATH']}",
           "LOG": str(tmp_path / "log")}
    out = subprocess.run(["bash", str(SCRIPT), "heldout"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"float32 on AMD EPYC ({isa})" in out.stdout
    call = (tmp_path / "log").read_text()
    assert "--dtype float32" in call and "--stage heldout" in call
    assert "--modes baseline,always,minus,noise --noise-problems 100" in call
    assert "--problems 300" in call and "--logprobs 20" in call and "--answer-probe" in call


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_smoke_run_of_the_heldout_stage(tmp_path):
    """SMOKE=1 on SmolLM2: heldout (every arm, probe and logprobs on), save, then a
    new machine (the run folder deleted) that resumes from the saved answers,
    and `remaining`, which skips what is saved and ends with the verdict. Run it
    before a real stage after changing run.sh or the pipeline (`pytest -m slow -k smoke`)."""
    env = {**os.environ, "SMOKE": "1", "RUN_SMOKE": str(tmp_path / "run"),
           "STUDY": str(tmp_path / "study")}

    def stage(*args):
        out = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                             text=True, timeout=1800)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    study = tmp_path / "study"
    stage("heldout")
    stage("save", "heldout")
    first = json.loads((study / "heldout" / "manifest.json").read_text())
    assert first["engine_dtypes"] == ["float32"] and first["machines"][0]["isa"]
    answers = [json.loads(x) for x in
               gzip.open(study / "heldout" / "generations.jsonl.gz", "rt").read().splitlines()]
    assert len(answers) == 3 * 8 + 3
    for a in answers:  # every answer keeps its per-token confidence, one value per token
        assert [len(a["confidence"][f]) for f in ("lp", "conf", "sc")] == [a["tokens"]] * 3
        assert a["steering"]["answer_failure_probability"] is not None

    shutil.rmtree(tmp_path / "run")  # a new machine
    again = stage("heldout")
    assert "restored 27 answers of heldout" in again.stdout
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["heldout"]
    assert manifest["results"]["preregistered"] == first["results"]["preregistered"]
    assert manifest["attempts"] == first["attempts"] + 1 and len(manifest["machines"]) == 2
    rest = stage("remaining")
    assert "heldout (results saved" in rest.stdout
    verdict = json.loads((study / "verdict.json").read_text())  # remaining ends with it
    assert verdict["outcome"] in ("helps", "hurts", "no detectable effect")
    assert verdict["noise_floor"]["noise"]["problems"] == 3


def _config(n: int, base_right: int, fixed: int, broken: int, **extra) -> dict:
    """An eval config's numbers as evaluate writes them (p from the exact test)."""
    from scipy.stats import binomtest

    from adaras.pipeline.stats import min_detectable_effect

    p = binomtest(fixed, fixed + broken, 0.5).pvalue if fixed + broken else 1.0
    delta = (base_right + fixed - broken) / n - base_right / n  # as evaluate computes it
    return {"problems": n, "accuracy": (base_right + fixed - broken) / n,
            "accuracy_ci95": [0.3, 0.5], "delta": delta, "ci95": [delta - 0.02, delta + 0.02],
            "mcnemar_p": p, "fixed": fixed, "broken": broken, "changed": 0.1, "truncated": 3,
            "mean_tokens": 500.0, "median_tokens": 480.0,
            "mde80": min_detectable_effect(n, (fixed + broken) / n), **extra}


def _outcomes(n: int, plus_flips: int, noise_flips: int) -> list[dict]:
    """Outcomes whose +S flips `plus_flips` and noise `noise_flips` of the first 10."""
    rows = []
    for i in range(n):
        rows.append({"problem": f"p{i}", "arm": "baseline", "correct": i % 2 == 0})
        rows.append({"problem": f"p{i}", "arm": "always",
                     "correct": (i % 2 == 0) != (i < plus_flips)})
        if i < 10:
            rows.append({"problem": f"p{i}", "arm": "noise",
                         "correct": (i % 2 == 0) != (i < noise_flips)})
    return rows


def _study(tmp_path: Path, always, n: int = 300, secondary_p: float = 0.4,
           plus_flips: int = 3, noise_flips: int = 3, manifest: dict | None = None):
    study = tmp_path / "study"
    (study / "heldout").mkdir(parents=True)
    results = {"alpha": 0.3, "dose_in_sigma": 0.089, "primary": {"config": "always"},
               "configs": {"baseline": _config(n, 120, 0, 0), "always": always,
                           "minus": _config(n, 120, 10, 12)},
               "secondary": {"configs": ["always", "minus"], "problems": n, "delta": 0.01,
                             "ci95": [-0.01, 0.03], "mcnemar_p": secondary_p, "only_a": 12,
                             "only_b": 7}}
    (study / "heldout" / "results.json").write_text(json.dumps(results))
    (study / "heldout" / "outcomes.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in _outcomes(n, plus_flips, noise_flips)))
    (study / "heldout-registration.json").write_text(json.dumps({"arms": {"always": n}}))
    (study / "heldout" / "manifest.json").write_text(json.dumps(manifest or {
        "engine_dtypes": ["float32"], "machines": [{"attempt": 1, "isa": "avx512_bf16"}]}))
    return study


def _verdict(study: Path) -> tuple[dict, str]:
    out = subprocess.run(["python3", str(SCRIPT.parent / "verdict.py"), str(study)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads((study / "verdict.json").read_text()), (study / "verdict.md").read_text()


@pytest.mark.parametrize(("always", "outcome", "words"), [
    ((300, 120, 30, 10), "helps", "helps Qwen2.5-Coder-1.5B on MATH-500 (first 300): +6.7 points"),
    ((300, 120, 10, 30), "hurts", "hurts Qwen2.5-Coder-1.5B on MATH-500 (first 300): -6.7 points"),
    ((300, 120, 18, 12), "no detectable effect", "No detectable effect of AdaRAS +S"),
    ((300, 120, 0, 0), "no detectable effect", "no answer changed"),
])
def test_verdict_applies_the_registered_rule_in_its_words(tmp_path, always, outcome, words):
    v, md = _verdict(_study(tmp_path, _config(*always)))
    assert v["outcome"] == outcome and v["warnings"] == []
    assert words in v["words"] and words in md
    assert v["primary"]["delta"] == pytest.approx((always[2] - always[3]) / 300)
    assert v["key_secondary"]["fixed"] == 12 and v["key_secondary"]["broken"] == 7
    assert "the sign of S made no detectable difference" in v["key_secondary_words"]
    if outcome == "helps":
        assert "on MATH, transfer not measured" in v["words"]
        assert "gain" in v["served_default"]
    else:
        assert v["served_default"].startswith("steering stays off by default")
    if outcome == "no detectable effect" and always[2] + always[3]:
        assert "could detect about" in v["words"]


def test_conditional_arms_are_due_only_below_p_0_1(tmp_path):
    assert not _verdict(_study(tmp_path / "a", _config(300, 120, 18, 12)))[0][
        "conditional_arms_due"]  # p = 0.36
    assert _verdict(_study(tmp_path / "b", _config(300, 120, 18, 12), secondary_p=0.08))[0][
        "conditional_arms_due"]
    assert _verdict(_study(tmp_path / "c", _config(300, 120, 22, 10)))[0][
        "conditional_arms_due"]  # p = 0.05


@pytest.mark.parametrize(("plus", "noise", "within"), [(3, 3, True), (2, 5, True), (6, 2, False)])
def test_the_noise_floor_sets_s_flips_beside_the_reruns(tmp_path, plus, noise, within):
    v, md = _verdict(_study(tmp_path, _config(300, 120, 18, 12), plus_flips=plus,
                            noise_flips=noise))
    nf = v["noise_floor"]
    assert nf["always"]["flips"] == plus and nf["noise"]["flips"] == noise
    assert nf["always"]["problems"] == nf["noise"]["problems"] == 10
    assert nf["within_noise"] is within
    assert ("no more than batch composition does" in md) is within


def test_verdict_flags_a_run_that_differs_from_the_registration(tmp_path):
    study = _study(tmp_path, _config(200, 80, 5, 5), n=200, manifest={
        "engine_dtypes": ["bfloat16"], "machines": [{"isa": "avx512_bf16"}, {"isa": "avx2"}]})
    v, md = _verdict(study)
    assert any("200 problems, not the registered 300" in w for w in v["warnings"])
    assert any("bfloat16" in w for w in v["warnings"])
    assert any("more than one CPU kind" in w for w in v["warnings"])
    assert md.count("**Warning:") == len(v["warnings"]) == 5  # 3 arms, the dtype, the kinds


def test_verdict_needs_the_heldout_results(tmp_path):
    out = subprocess.run(["python3", str(SCRIPT.parent / "verdict.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "run and save heldout first" in out.stderr
