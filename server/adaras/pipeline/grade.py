"""Grade model completions against `Problem`s.

math: math-verify on the last \\boxed{} (or the whole completion when there is none).
rg:   reasoning-gym's own scorer on the extracted answer; correct only for a score of exactly 1.
code: the problem's tests, run in a separate, resource-limited Python process.

math-verify times out with signal.alarm(), which only works in the main thread, so math is
always graded in the calling thread and without math-verify's timeouts off the main thread.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from adaras.pipeline.data import Problem

MEMORY_LIMIT = 2 * 1024**3  # bytes of address space for a code problem's process
FILE_LIMIT = 10 * 1024**2  # largest file (stdout / stderr included) it may write
CHILD_ENV = {"PATH": "/usr/bin:/bin"}

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|texttt|mathrm|mathbf)\{(.*)\}", re.S)
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PYTHON_LANGS = ("python", "py", "python3")
_SYNTAX_ERRORS = ("SyntaxError", "IndentationError", "TabError")

# Runs in the child before the program: limits (soft = hard, so the program cannot raise them),
# then the program as __main__. Done here rather than in preexec_fn, which is not thread-safe.
_BOOTSTRAP = """\
import resource, runpy, sys
for name, value in {limits!r}:
    resource.setrlimit(getattr(resource, name), (value, value))
path = sys.argv[1]
sys.argv = [path]
del resource, name, value
runpy.run_path(path, run_name="__main__")
"""


@dataclass(frozen=True)
class Grade:
    """correct: the verdict. extracted: the answer we read (code: the program's first 200
    chars). error: why it is wrong when we could not even grade it (no answer, timeout, ...)."""

    correct: bool
    extracted: str | None
    error: str | None = None


def is_cut(row: dict) -> bool:
    """Whether a generated answer (a row with the engine's `finish_reason`) was
    cut at max_tokens before it finished."""
    return row["finish_reason"] == "length"


def counts_as_correct(row: dict) -> bool:
    """The verdict every stage counts for a generated answer (a row with the
    grader's `correct` and the engine's `finish_reason`): right only when graded
    right and not cut at max_tokens. A cut answer is a failure as served (the
    client gets no finished answer; on MATH it is nearly always a loop), even
    when the last boxed answer it wrote before the cut grades right. The
    grader's own verdict stays in the stored rows."""
    return bool(row["correct"]) and not is_cut(row)


def grade(problem: Problem, completion: str, timeout: float = 10.0) -> Grade:
    """Grade one completion; `timeout` (seconds) bounds a code run or a math-verify step."""
    if problem.kind == "math":
        return _grade_math(problem, completion, timeout)
    if problem.kind == "rg":
        return _grade_rg(problem, completion)
    return _grade_code(problem, completion, timeout)


def grade_all(
    problems: list[Problem], completions: list[str], timeout: float = 10.0, workers: int = 2
) -> list[Grade]:
    """Grade pairwise, in input order. Code runs `workers` subprocesses at a time; everything
    else is graded in the calling thread (math-verify's timeouts need the main thread)."""
    if len(problems) != len(completions):
        raise ValueError(f"grade_all: {len(problems)} problems but {len(completions)} completions")
    pairs = list(zip(problems, completions))
    results: list[Grade | None] = [None] * len(pairs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures: dict[int, Future[Grade]] = {
            i: pool.submit(grade, p, c, timeout)
            for i, (p, c) in enumerate(pairs)
            if p.kind == "code"
        }
        for i, (p, c) in enumerate(pairs):
            if i not in futures:
                results[i] = grade(p, c, timeout)
        for i, future in futures.items():
            results[i] = future.result()
    return [r for r in results if r is not None]


# ---------------------------------------------------------------------------- extraction


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), None if absent or unbalanced."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start, depth = matches[-1].end(), 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def extract_rg_answer(text: str) -> str | None:
    """Last \\boxed{} content, else the text after the last "answer:", else the last
    non-empty line; None when that is empty."""
    boxed = last_boxed(text)
    if boxed is not None:
        wrapped = _TEXT_WRAPPER.fullmatch(boxed.strip())
        answer = wrapped.group(1) if wrapped else boxed
    elif (at := text.lower().rfind("answer:")) != -1:
        answer = text[at + len("answer:") :]
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        answer = lines[-1] if lines else ""
    answer = answer.strip().strip("*`").strip()
    return answer or None


def extract_code(text: str) -> str:
    """The last ```python block, else the last plain ``` block, else the whole text.
    An unclosed final fence (truncated completion) runs to the end of the text."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    python = [body for lang, body in blocks if lang in _PYTHON_LANGS]
    plain = [body for lang, body in blocks if not lang]
    return (python or plain or [text])[-1]


# ---------------------------------------------------------------------------- math


def _grade_math(problem: Problem, completion: str, timeout: float) -> Grade:
    """math-verify: the reference against the last \\boxed{} or else the whole completion."""
    from math_verify import parse, verify

    limit = _signal_timeout(timeout)
    with _keep_alarm():
        # As LaTeX first, as the model's \boxed{} answer is read: a plain parse reads
        # "3\sqrt{13}" as 3 and "1,-2" as 1, so such gold answers never match.
        gold = parse(f"\\boxed{{{problem.answer}}}", parsing_timeout=limit) or parse(
            problem.answer, parsing_timeout=limit
        )
        if not gold:
            return Grade(False, None, f"could not parse the reference answer {problem.answer!r}")
        boxed = last_boxed(completion)
        text = completion if boxed is None else f"\\boxed{{{boxed}}}"
        pred = parse(text, parsing_timeout=limit)
        if not pred:
            return Grade(False, None, "no answer found")
        correct = verify(gold, pred, timeout_seconds=limit)
    extracted = pred[-1] if isinstance(pred[-1], str) else str(pred[0])
    return Grade(bool(correct), extracted)


def _signal_timeout(timeout: float) -> int | None:
    """math-verify's timeout argument: whole seconds (signal.alarm), None off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return max(1, math.ceil(timeout))


@contextmanager
def _keep_alarm() -> Iterator[None]:
    """Re-arm the caller's ITIMER_REAL timer (e.g. pytest-timeout's), which math-verify's
    signal.alarm() calls replace and then cancel."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    delay, interval = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    try:
        yield
    finally:
        if delay > 0:
            left = max(delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, interval)


# ---------------------------------------------------------------------------- rg


def _grade_rg(problem: Problem, completion: str) -> Grade:
    """reasoning-gym's scorer; correct only for exactly 1.0 (see `_rg_score`)."""
    answer = extract_rg_answer(completion)
    if answer is None:
        return Grade(False, None, "no answer found")
    try:
        score = float(_rg_score(problem.meta, answer))
    except Exception as e:
        return Grade(False, answer, f"scorer error: {type(e).__name__}: {e}")
    # No tolerance on purpose: partial-credit scorers sum 1/len per matching character, so a
    # wrong answer can score 0.9999999999999999 or 1.0000000000000002 (spell_backward).
    return Grade(score == 1.0, answer)


def _rg_score(meta: dict, answer: str) -> float:
    """Score with the dataset rebuilt from the problem's config (some scorers read it), on the
    regenerated entry when JSON changed the stored one (e.g. arc_agi's tuple grids)."""
    task, entry = meta["task"], meta["entry"]
    config = meta.get("config")
    dataset = _rg_dataset(task, json.dumps(config, sort_keys=True)) if config else None
    if dataset is None:
        return _rg_default_scorer(task)(answer, entry)
    if meta.get("entry_lossy") and isinstance(meta.get("index"), int):
        fresh = dataset[meta["index"]]
        entry = fresh if fresh["question"] == entry["question"] else entry
    return dataset.score_answer(answer, entry)


@lru_cache(maxsize=64)
def _rg_dataset(task: str, config_json: str) -> Any:
    """reasoning-gym dataset for a stored config, None if the config does not load back."""
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(task, **json.loads(config_json))
    except Exception:
        return None


@lru_cache(maxsize=64)
def _rg_default_scorer(task: str) -> Any:
    """`reasoning_gym.get_score_answer_fn(task)` (builds a dataset, hence cached)."""
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


# ---------------------------------------------------------------------------- code


def _grade_code(problem: Problem, completion: str, timeout: float) -> Grade:
    """Run the problem's tests against the completion in a separate process."""
    code = extract_code(completion)
    program, extracted = build_program(problem, code), code[:200]
    try:
        returncode, stderr = run_program(program, timeout)
    except OSError as e:
        return Grade(False, extracted, f"could not run the program: {e}")
    if returncode == 0:
        return Grade(True, extracted)
    return Grade(False, extracted, _run_error(returncode, stderr))


def build_program(problem: Problem, code: str) -> str:
    """prompt + code + tests + check(entry_point).

    The prompt always comes first: it brings the imports and helper functions the tests may
    need (e.g. HumanEval/38's encode_cyclic). A body-only completion continues the prompt's
    function; a completion that defines the function replaces the prompt's stub.
    """
    prompt, entry = problem.meta["prompt"], problem.meta["entry_point"]
    head = prompt if prompt.endswith("\n") else prompt + "\n"
    defines = re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(entry)}\s*\(", code, re.M)
    body = f"{head}\n\n{code}" if defines else head + code
    return f"{body}\n\n{problem.meta['test']}\n\ncheck({entry})\n"


def run_program(program: str, timeout: float) -> tuple[int | None, str]:
    """Run `program` in a fresh isolated interpreter, in its own session and temp dir, with a
    minimal env, no stdin and resource limits. Returns (return code or None on timeout, the
    end of stderr). The whole process group is killed afterwards."""
    limits = [
        ("RLIMIT_AS", MEMORY_LIMIT),
        ("RLIMIT_CPU", math.ceil(timeout) + 1),
        ("RLIMIT_FSIZE", FILE_LIMIT),
        ("RLIMIT_CORE", 0),
    ]
    with tempfile.TemporaryDirectory(prefix="adaras-grade-", ignore_cleanup_errors=True) as tmp:
        path, err_path = Path(tmp, "program.py"), Path(tmp, "stderr")
        path.write_text(program, encoding="utf-8")
        with err_path.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOTSTRAP.format(limits=limits), str(path)],
                cwd=tmp,
                env=CHILD_ENV,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
            try:
                returncode: int | None = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(proc)
        return returncode, _tail(err_path)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group the child leads (its own children too), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(path: Path, size: int = 4096) -> str:
    """The last `size` bytes of a file, decoded leniently."""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode("utf-8", errors="replace")


def _run_error(returncode: int | None, stderr: str) -> str:
    """A short reason for a failed run: "timeout", "syntax error: ...", the last stderr line."""
    if returncode is None:
        return "timeout"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return f"exit code {returncode}"
    last = lines[-1][:300]
    if last.startswith(_SYNTAX_ERRORS):
        return "syntax error: " + last.split(":", 1)[-1].strip()
    return last
