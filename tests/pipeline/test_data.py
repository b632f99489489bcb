"""Problem sources: reasoning-gym, HumanEval, JSON lines, Hugging Face; dedupe; prompts."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from adaras.pipeline.data import Problem, build_messages, dedupe_against, load_problems


def write_lines(path: Path, rows: list) -> Path:
    """Write one line per row: dicts as JSON, strings verbatim."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------- rg:


def test_rg_respects_n_and_seed():
    a = load_problems("rg:gsm_symbolic", n=7, seed=1)
    again = load_problems("rg:gsm_symbolic", n=7, seed=1)
    other = load_problems("rg:gsm_symbolic", n=7, seed=2)
    assert len(a) == len(other) == 7
    assert [p.to_json() for p in a] == [p.to_json() for p in again]
    assert len({p.id for p in a}) == 7 and all(":s1:" in p.id for p in a)
    assert not {p.id for p in a} & {p.id for p in other}
    assert [p.question for p in a] != [p.question for p in other]
    assert all(p.kind == "math" and p.meta["task"] == "gsm_symbolic" for p in a)


def test_rg_default_size_is_500():
    assert len(load_problems("rg:chain_sum", seed=3)) == 500


def test_rg_difficulty_is_passed_to_tasks_that_have_it():
    plain = load_problems("rg:gsm_symbolic", n=3, seed=1)
    hard = load_problems("rg:gsm_symbolic", n=3, seed=1, difficulty=1.0)
    assert [p.kind for p in hard] == ["math"] * 3
    assert hard[0].meta["config"]["difficulty"] == 1.0
    assert not {p.id for p in plain} & {p.id for p in hard}  # other config, other ids
    # gsm_symbolic's own config only accepts 1.0: its bare assert comes back as a ValueError
    with pytest.raises(ValueError, match="rejected config.*difficulty"):
        load_problems("rg:gsm_symbolic", n=3, difficulty=0.5)


def test_rg_difficulty_for_a_task_without_it_lists_the_config_fields():
    with pytest.raises(ValueError, match="no 'difficulty'.*options.*min_terms"):
        load_problems("rg:chain_sum", n=3, difficulty=0.5)


def test_rg_options_reach_the_config():
    opts = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    problems = load_problems("rg:chain_sum", n=50, seed=4, options=opts)
    assert all(abs(int(p.answer)) <= 18 for p in problems)
    assert all(p.question.count("+") + p.question.count("-") == 1 for p in problems)
    with pytest.raises(ValueError, match="bad options.*max_terms"):
        load_problems("rg:chain_sum", n=3, options={"nonsense": 1})
    with pytest.raises(ValueError, match="seed and size"):
        load_problems("rg:chain_sum", n=3, options={"size": 9})


@pytest.mark.parametrize("task", ["gsm_symbolic", "basic_arithmetic", "chain_sum"])
def test_rg_numeric_tasks_are_math(task):
    problems = load_problems(f"rg:{task}", n=20, seed=0)
    assert {p.kind for p in problems} == {"math"}
    assert all(float(p.answer) == float(p.meta["entry"]["answer"]) for p in problems)


@pytest.mark.parametrize("task", ["word_sorting", "spell_backward"])
def test_rg_string_tasks_are_rg(task):
    problems = load_problems(f"rg:{task}", n=10, seed=0)
    assert {p.kind for p in problems} == {"rg"}
    assert all(p.answer == p.meta["entry"]["answer"] for p in problems)


def test_rg_meta_is_json_even_for_tuple_metadata():
    (p,) = load_problems("rg:arc_agi", n=1, seed=0)  # metadata holds tuples of tuples
    text = json.dumps(p.to_json())
    assert Problem.from_json(json.loads(text)) == p
    assert p.meta["entry_lossy"] is True


def test_unknown_rg_task_suggests_a_name():
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'gsm_symbolik'.*gsm_symbolic"):
        load_problems("rg:gsm_symbolik", n=3)


@pytest.mark.parametrize("spec", ["nope", "rg", "humaneval2", "data.json", "hf:"])
def test_unknown_spec_names_the_spec(spec):
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        load_problems(spec, n=1)


def test_knobs_a_source_does_not_have_are_refused():
    with pytest.raises(ValueError, match="difficulty only applies"):
        load_problems("humaneval", n=1, difficulty=0.5)
    with pytest.raises(ValueError, match="takes no options"):
        load_problems("humaneval", n=1, options={"x": 1})
    with pytest.raises(ValueError, match="n must be >= 1"):
        load_problems("humaneval", n=0)


# ---------------------------------------------------------------------------- humaneval


def test_humaneval_has_164_problems_in_task_order():
    problems = load_problems("humaneval")
    assert len(problems) == 164
    assert [p.id for p in problems[:11]] == [f"humaneval:HumanEval/{i}" for i in range(11)]
    assert {p.kind for p in problems} == {"code"} and {p.answer for p in problems} == {""}
    first = problems[0]
    assert set(first.meta) == {"prompt", "test", "entry_point"}
    assert (
        first.question == first.meta["prompt"] and first.meta["entry_point"] == "has_close_elements"
    )
    assert [p.id for p in load_problems("humaneval", n=3, seed=9)] == [p.id for p in problems[:3]]


# ---------------------------------------------------------------------------- jsonl


def test_jsonl_round_trip_of_every_kind(tmp_path):
    problems = (
        load_problems("rg:gsm_symbolic", n=2, seed=5)
        + load_problems("rg:word_sorting", n=2, seed=5)
        + load_problems("rg:arc_agi", n=1, seed=5)
        + load_problems("humaneval", n=2)
        + [Problem("mine", "What is 1+1?", "2", "math", {"source": "hand"})]
    )
    path = write_lines(tmp_path / "all.jsonl", [p.to_json() for p in problems])
    assert load_problems(f"jsonl:{path}") == problems
    assert load_problems(str(path), n=3) == problems[:3]


def test_jsonl_aliases_ids_and_blank_lines(tmp_path):
    rows = [
        {"problem": "2+2?", "solution": 4},
        "",
        {"prompt": "3*3?", "target": "9", "id": "nine"},
        {"question": "q", "answer": "a", "kind": "math"},
        {"prompt": "def f():\n", "kind": "code", "test": "def check(c): pass", "entry_point": "f"},
    ]
    problems = load_problems(str(write_lines(tmp_path / "mixed.jsonl", rows)))
    assert [(p.id, p.question, p.answer, p.kind) for p in problems] == [
        ("jsonl:mixed:1", "2+2?", "4", "math"),
        ("nine", "3*3?", "9", "math"),
        ("jsonl:mixed:4", "q", "a", "math"),
        ("jsonl:mixed:5", "def f():\n", "", "code"),
    ]
    assert problems[3].meta == {
        "prompt": "def f():\n",
        "test": "def check(c): pass",
        "entry_point": "f",
    }


def test_jsonl_options_keep_problems_by_their_meta_fields():
    from pathlib import Path

    path = str(Path(__file__).parents[2] / "data" / "math" / "validation.jsonl")
    every = load_problems(path)
    hard = load_problems(path, options={"level": "4,5"})
    assert {p.meta["level"] for p in hard} == {4, 5}
    assert [p.id for p in hard] == [p.id for p in every if p.meta["level"] >= 4]
    assert len(load_problems(path, n=7, options={"level": "5", "subject": "algebra"})) == 7
    assert load_problems(path, options={"level": "6"}) == []


def test_the_math_splits_are_distinct_problems_with_unique_ids():
    from pathlib import Path

    from adaras.pipeline.data import dedupe_against

    root = Path(__file__).parents[2] / "data" / "math"
    splits = {s: load_problems(str(root / f"{s}.jsonl")) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 700, "validation": 300, "test": 500}
    ids = [p.id for v in splits.values() for p in v]
    assert len(set(ids)) == len(ids)
    _, dropped = dedupe_against(splits["test"], splits["train"] + splits["validation"])
    assert dropped == 0


def test_jsonl_bad_line_reports_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [{"question": "a", "answer": "1"}, "", "{oops"])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:3: not valid JSON"):
        load_problems(f"jsonl:{path}")
    write_lines(path, [[1, 2]])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:1: expected a JSON object"):
        load_problems(f"jsonl:{path}")


@pytest.mark.parametrize(
    ("row", "missing"),
    [
        ({"question": "a"}, "'answer'"),
        ({"answer": "1"}, "'question'"),
        ({"prompt": "def f():\n", "kind": "code", "test": "t"}, "'entry_point'"),
        ({"question": "q", "kind": "rg", "task": "word_sorting"}, "'entry'"),
    ],
)
def test_jsonl_missing_field_is_named(tmp_path, row, missing):
    path = write_lines(tmp_path / "m.jsonl", [{"question": "ok", "answer": "1"}, row])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: missing field {missing}"):
        load_problems(str(path))


def test_jsonl_other_errors(tmp_path):
    path = write_lines(tmp_path / "k.jsonl", [{"question": "q", "answer": "1", "kind": "essay"}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:1: unknown kind 'essay'"):
        load_problems(str(path))
    write_lines(path, [{"id": "x", "question": "q", "answer": "1"}] * 2)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: duplicate id 'x'"):
        load_problems(str(path))
    with pytest.raises(ValueError, match="no such file"):
        load_problems(str(tmp_path / "absent.jsonl"))


# ---------------------------------------------------------------------------- hf:


def fake_datasets(monkeypatch, rows=None, error=None) -> list:
    """Install a stand-in `datasets` module; returns the list of load_dataset calls."""
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if error:
            raise error
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="pip install datasets"):
        load_problems("hf:openai/gsm8k:main@test", n=5)


def test_hf_reads_rows_and_gsm8k_answers(monkeypatch):
    rows = [{"question": f"q{i}", "answer": f"work\n#### {i * 10} "} for i in range(5)]
    calls = fake_datasets(monkeypatch, rows)
    problems = load_problems("hf:openai/gsm8k:main@train", n=3)
    assert calls == [("openai/gsm8k", "main", "train")]
    assert [(p.id, p.question, p.answer, p.kind) for p in problems] == [
        (f"hf:openai/gsm8k:main@train:{i}", f"q{i}", str(i * 10), "math") for i in range(3)
    ]
    load_problems("hf:some/set")
    assert calls[-1] == ("some/set", None, "test")


def test_hf_field_options(monkeypatch):
    fake_datasets(monkeypatch, [{"text": "Q", "final": "7", "answer": "wrong"}])
    (p,) = load_problems("hf:x/y", options={"question_field": "text", "answer_field": "final"})
    assert (p.question, p.answer) == ("Q", "7")
    with pytest.raises(ValueError, match=r"none of the fields \['problem'\].*columns"):
        load_problems("hf:x/y", options={"question_field": "problem"})
    with pytest.raises(ValueError, match="unknown options"):
        load_problems("hf:x/y", options={"shuffle": True})


def test_hf_load_errors_become_value_errors(monkeypatch):
    fake_datasets(monkeypatch, error=ConnectionError("offline"))
    with pytest.raises(ValueError, match="could not be loaded: ConnectionError: offline"):
        load_problems("hf:openai/gsm8k:main")
    with pytest.raises(ValueError, match="malformed"):
        load_problems("hf:a:b:c@d")


# ---------------------------------------------------------------------------- misc


def test_dedupe_against_ignores_case_and_whitespace():
    mk = lambda i, q: Problem(f"p{i}", q, "1", "math", {})  # noqa: E731
    problems = [mk(0, "What is  2+2?"), mk(1, "Name a prime."), mk(2, "what is 2+2?\n"), mk(3, "x")]
    exclude = [mk(9, "WHAT IS 2+2?"), mk(8, "x y")]
    kept, dropped = dedupe_against(iter(problems), exclude)
    assert [p.id for p in kept] == ["p1", "p3"] and dropped == 2
    assert dedupe_against(problems, []) == (problems, 0)


def test_build_messages():
    math = Problem("m", "What is 2+2?", "4", "math", {})
    (msg,) = build_messages(math)
    assert msg["role"] == "user"
    assert msg["content"] == (
        "What is 2+2?\n\nReason step by step, then give only the final answer inside \\boxed{}."
    )
    code = load_problems("humaneval", n=1)[0]
    (msg,) = build_messages(code)
    assert msg["content"].startswith("Complete the following Python function. Reply with the")
    assert msg["content"].endswith(f"```python\n{code.meta['prompt']}```")


def test_problem_validates_kind_and_is_hashable():
    with pytest.raises(ValueError, match="unknown kind"):
        Problem("a", "q", "1", "proof", {})
    p = Problem("a", "q", "1", "math", {"x": [1]})
    assert len({p, Problem("a", "q", "1", "math", {"x": [1]})}) == 1


def test_load_distinct_skips_repeats_and_the_excluded_set():
    from adaras.pipeline.data import distinct, load_distinct

    spec = "rg:chain_sum"
    small = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
             "allow_negation": False}
    raw = load_problems(spec, n=200, seed=0, options=small)
    kept, repeats = distinct(raw)
    assert repeats > 0  # a one-digit task repeats itself
    got, _ = load_distinct(spec, 40, seed=0, options=small)
    assert len(got) == 40 and len({p.question for p in got}) == 40
    other, dropped = load_distinct(spec, 20, seed=1, options=small, exclude=got)
    assert dropped > 0 and not {p.question for p in other} & {p.question for p in got}
    with pytest.raises(ValueError, match="distinct problems"):
        load_distinct(spec, 500, seed=0, options=small)  # the task has fewer than 500
