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
    study = _study(tmp_path, _config(500, 200, 20, 20), _config(164, 100, 2, 2), best=BEST)
    (study / "dev").mkdir()
    (study / "dev" / "results.json").write_text("{}\n")
    (study / "confirm-registration.json").write_text("{}\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Intel Xeon\nflags\t\t: avx512f avx512_bf16\n")
    env = {**os.environ, "RUN": str(tmp_path / "run"), "STUDY": str(study),
           "CPUINFO": str(cpuinfo)}
    out = subprocess.run(["bash", str(SCRIPT), "remaining"], env=env, capture_output=True,
                         text=True, timeout=60)  # an engine would take minutes to start
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(") is done") == 4 and "every stage is done" in out.stdout
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".remaining.lock"]  # nothing ran
    assert json.loads((study / "verdict.json").read_text())["helps"] is False  # then the verdict


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
    verdict = json.loads((study / "verdict.json").read_text())  # remaining ends with it
    assert verdict["humaneval"]["problems"] == 3 and verdict["helps"] in (True, False)
    results = json.loads((tmp_path / "run" / "humaneval" / "results.json").read_text())
    assert set(results["configs"]) == {"baseline", "always"}


def _config(n: int, base_right: int, fixed: int, broken: int, **extra) -> dict:
    """An eval config's numbers as evaluate writes them (p from the exact test)."""
    from scipy.stats import binomtest

    p = binomtest(fixed, fixed + broken, 0.5).pvalue if fixed + broken else 1.0
    delta = (base_right + fixed - broken) / n - base_right / n  # as evaluate computes it
    return {"problems": n, "accuracy": (base_right + fixed - broken) / n,
            "accuracy_ci95": [0.3, 0.5], "delta": delta, "ci95": [delta - 0.02, delta + 0.02],
            "mcnemar_p": p, "fixed": fixed, "broken": broken, "changed": 0.1, "truncated": 3,
            "median_tokens": 480.0, **extra}


BEST = {"reference": "greedy", "within_problem_auroc": {"auroc": 0.7, "pairs": 300},
        "methods": {"greedy": {"accuracy": 0.4, "mean_tokens": 500, "problems": 100},
                    "probe best-of-4": {"accuracy": 0.46, "delta_vs_greedy": 0.06,
                                        "ci95": [0.0, 0.12], "mean_tokens": 2000,
                                        "problems": 100}}}


def _study(tmp_path: Path, confirm_always, humaneval_always=None, probe=None, best=None):
    study = tmp_path / "study"
    (study / "confirm").mkdir(parents=True)
    baseline = _config(500, 200, 0, 0, **({"answer_probe": probe} if probe else {}))
    confirm = {"alpha": 0.3, "dose_in_sigma": 0.089, "primary": {"config": "always"},
               "configs": {"baseline": baseline, "always": confirm_always,
                           "minus": _config(500, 200, 10, 12)},
               "secondary": {"configs": ["always", "minus"], "problems": 500, "delta": 0.01,
                             "ci95": [-0.01, 0.03], "mcnemar_p": 0.4, "only_a": 12,
                             "only_b": 7}}
    (study / "confirm" / "results.json").write_text(json.dumps(confirm))
    (study / "confirm-registration.json").write_text(json.dumps({"arms": {"always": 500}}))
    if humaneval_always is not None:
        (study / "humaneval").mkdir()
        (study / "humaneval" / "results.json").write_text(json.dumps(
            {"configs": {"baseline": _config(164, 100, 0, 0), "always": humaneval_always}}))
    if best is not None:
        (study / "best-of-n").mkdir()
        (study / "best-of-n" / "results.json").write_text(json.dumps(best))
    return study


def _verdict(study: Path) -> tuple[dict, str]:
    out = subprocess.run(["python3", str(SCRIPT.parent / "verdict.py"), str(study)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads((study / "verdict.json").read_text()), (study / "verdict.md").read_text()


@pytest.mark.parametrize(("always", "humaneval", "helps", "goal"), [
    ((500, 200, 40, 15), (164, 100, 3, 4), True, True),     # +5 points, p < 0.05; HE no loss
    ((500, 200, 30, 18), (164, 100, 3, 4), False, False),   # +2.4 points, p = 0.11
    ((500, 200, 40, 15), (164, 100, 1, 12), False, True),   # the HumanEval loss vetoes
    ((500, 200, 40, 15), None, None, True),                 # gain, HumanEval not yet run
    ((500, 200, 15, 40), None, False, False),               # a loss: nothing left to decide
    ((500, 200, 28, 14), (164, 100, 3, 4), True, False),    # significant, under +3 points
    ((500, 160, 15, 0), (164, 100, 3, 4), True, True),      # exactly +3: 0.35 - 0.32 < 0.03
])
def test_verdict_applies_the_registered_rules(tmp_path, always, humaneval, helps, goal):
    study = _study(tmp_path, _config(*always), _config(*humaneval) if humaneval else None)
    v, md = _verdict(study)
    assert v["helps"] is helps and v["goal_met"] is goal and v["warnings"] == []
    assert v["primary"]["delta"] == pytest.approx((always[2] - always[3]) / 500)
    assert v["key_secondary"]["fixed"] == 12 and v["key_secondary"]["broken"] == 7
    if helps:
        assert "keeps these neurons with alpha 0.3" in v["served_default"]
    elif helps is False:
        assert "did not help at the paper's own dose" in v["served_default"]
    else:
        assert v["served_default"].startswith("pending")
    assert {True: "yes", False: "no", None: "pending"}[helps] in md.split("Helps")[1][:40]


def test_verdict_judges_the_answer_probe_goals_on_the_point_estimates(tmp_path):
    probe = {"answers": 498, "auroc": 0.89, "auroc_ci95": [0.86, 0.92],
             "calibration": {"ece": 0.06}, "ece_ci95": [0.05, 0.09]}
    v, md = _verdict(_study(tmp_path, _config(500, 200, 20, 20), None, probe, BEST))
    ap = v["answer_probe"]
    assert ap["auroc_goal_met"] and not ap["ece_goal_met"]
    assert ap["best_of_n"]["best_of_4_goal_met"]  # +6 points, though its CI reaches 0
    assert "AUROC ≥ 0.88 met; ECE ≤ 0.05 not met" in md
    # results written before the free baselines existed: reported blank, nothing judged on them
    assert ap["baseline"]["length"] is None and "| baseline |  |  |  |  |  |" in md


def test_verdict_reports_the_free_baselines_beside_the_probe_without_judging_them(tmp_path):
    probe = {"answers": 498, "auroc": 0.80, "auroc_ci95": [0.76, 0.84],
             "calibration": {"ece": 0.04}, "ece_ci95": [0.03, 0.07],
             "length": {"auroc": 0.71, "auroc_ci95": [0.66, 0.76], "answer_auroc_gain": 0.09,
                        "answer_auroc_gain_ci95": [0.05, 0.13]},
             "finished": {"answers": 470, "auroc": 0.77, "auroc_ci95": [0.72, 0.81],
                          "length": {"auroc": 0.70, "answer_auroc_gain": 0.07,
                                     "answer_auroc_gain_ci95": [0.02, 0.12]}}}
    best = {**BEST, "within_problem_auroc_length": {"auroc": 0.62, "pairs": 280,
                                                    "ci95": [0.55, 0.69]}}
    v, md = _verdict(_study(tmp_path, _config(500, 200, 20, 20), None, probe, best))
    ap = v["answer_probe"]
    assert ap["baseline"]["length"]["auroc"] == 0.71 and ap["baseline"]["finished"]["answers"] == 470
    assert ap["auroc_goal_met"] is False and ap["ece_goal_met"] is True  # the goals as before
    assert ("| baseline | 0.710 (0.660–0.760) | 0.090 (0.050–0.130) | 470 | 0.770 (0.720–0.810) "
            "| 0.070 (0.020–0.120) |") in md
    assert "the samples' length alone: 0.620 (0.550–0.690) over 280 pairs" in md


def test_remaining_stops_after_registering_stage_3_so_that_it_is_committed_first(tmp_path):
    study = tmp_path / "study"
    (study / "dev").mkdir(parents=True)
    (study / "dev" / "results.json").write_text(json.dumps({"configs": {
        "always": {"fixed": 6, "broken": 4, "problems": 80},
        "adaptive": {"youden_threshold": 0.61}}}))
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Intel Xeon\nflags\t\t: avx512f avx512_bf16\n")
    env = {**os.environ, "RUN": str(tmp_path / "run"), "STUDY": str(study),
           "CPUINFO": str(cpuinfo)}
    out = subprocess.run(["bash", str(SCRIPT), "remaining"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "stage 3 is registered; commit" in out.stdout
    reg = json.loads((study / "confirm-registration.json").read_text())
    assert reg["adaptive_threshold"] == 0.61 and reg["mde_at_80_power"] > 0
    assert not (tmp_path / "run" / "confirm").exists()  # confirm waits for the commit
    again = subprocess.run(["bash", str(SCRIPT), "remaining"], env=env, capture_output=True,
                           text=True, timeout=120)  # not committed (this study is not in git)
    assert again.returncode == 5 and "before confirm runs" in again.stderr
    assert not (tmp_path / "run" / "confirm").exists()


def test_remaining_runs_once_per_run_folder(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Intel Xeon\nflags\t\t: avx512f avx512_bf16\n")
    env = {**os.environ, "RUN": str(tmp_path / "run"), "STUDY": str(tmp_path / "study"),
           "CPUINFO": str(cpuinfo)}
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen(["flock", str(tmp_path / "run" / ".remaining.lock"), "sleep", "30"])
    try:
        import time
        time.sleep(0.5)
        out = subprocess.run(["bash", str(SCRIPT), "remaining"], env=env, capture_output=True,
                             text=True, timeout=60)
    finally:
        holder.kill()
    assert out.returncode == 4 and "another one holds" in out.stderr


def test_verdict_leaves_a_goal_it_cannot_judge_unjudged_and_flags_unregistered_runs(tmp_path):
    unread = {"answers": 0, "unread": 500, "calibration": {"ece": 0.0, "bins": []}}
    first = {**BEST, "reference": "first sample",
             "methods": {"probe best-of-4": {"accuracy": 0.5, "delta_vs_first sample": 0.1,
                                             "mean_tokens": 2000, "problems": 100},
                         "first sample": {"accuracy": 0.4, "mean_tokens": 500,
                                          "problems": 100}}}
    study = _study(tmp_path, _config(400, 160, 20, 20), _config(100, 60, 2, 2), unread, first)
    v, md = _verdict(study)
    ap = v["answer_probe"]
    assert ap["auroc_goal_met"] is None and ap["ece_goal_met"] is None  # no answer read
    assert ap["best_of_n"]["best_of_4_goal_met"] is None  # no greedy reference
    assert "ECE ≤ 0.05 cannot be judged" in md
    assert any("400 problems, not the registered 500" in w for w in v["warnings"])
    assert any("HumanEval ran 100 problems" in w for w in v["warnings"])
    assert md.count("**Warning:") == 2


def test_verdict_needs_the_confirm_results(tmp_path):
    out = subprocess.run(["python3", str(SCRIPT.parent / "verdict.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "run and save confirm first" in out.stderr
