"""The import structure CI enforces (issue 32): no import circle among the
package's modules, and layers that only import downwards:

    kernels (steering_kernels)  <  contracts and formats (adaras.steering,
    profile, predictor, confidence, zoo)  <  engine (adaras.engine.*)  <
    API (adaras.api.*, warmup) and pipeline (adaras.pipeline.*), which do not
    import each other  <  CLI (adaras.cli)

Every import counts, a function's lazy import too: a cycle hidden inside a
function still ties two modules together. Read from the source with `ast`,
so nothing is imported to check it."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"adaras": ROOT / "server" / "adaras", "steering_kernels": ROOT / "steering_kernels"}
LAYERS = [  # (layer, module prefixes), lowest first
    (0, ("steering_kernels",)),
    (1, ("adaras", "adaras.steering", "adaras.report", "adaras.profile", "adaras.predictor",
         "adaras.confidence", "adaras.tiny_models",
         "adaras.zoo")),
    (2, ("adaras.engine",)),
    (3, ("adaras.api", "adaras.warmup", "adaras.pipeline")),
    (4, ("adaras.cli",)),
]
PEERS_APART = ("adaras.api", "adaras.pipeline")  # same layer, never importing each other


def modules() -> dict[str, Path]:
    out = {}
    for top, folder in SOURCES.items():
        for f in folder.rglob("*.py"):
            parts = (top, *f.relative_to(folder).with_suffix("").parts)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = f
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            for a in node.names:  # `from pkg import module` imports the module
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer(name: str) -> int:
    best = max(((len(prefix), lay) for lay, prefixes in LAYERS for prefix in prefixes
                if name == prefix or name.startswith(prefix + ".")), default=None)
    if best is None:
        raise AssertionError(f"{name} is in no layer: add it to tests/test_layers.py")
    return best[1]


def group(name: str) -> str | None:
    return next((g for g in PEERS_APART if name == g or name.startswith(g + ".")), None)


def test_no_module_imports_itself_through_others():
    try:
        graphlib.TopologicalSorter(graph()).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import circle: {' -> '.join(e.args[1])}")


def test_every_import_points_down_or_sideways_within_a_layer():
    wrong = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
             for a, bs in graph().items() for b in sorted(bs) if layer(b) > layer(a)]
    assert not wrong, "\n".join(wrong)


def test_the_api_and_the_pipeline_do_not_import_each_other():
    wrong = [f"{a} imports {b}" for a, bs in graph().items() for b in sorted(bs)
             if group(a) and group(b) and group(a) != group(b)]
    assert not wrong, "\n".join(wrong)


def test_the_kernels_import_nothing_from_adaras():
    assert not [(a, b) for a, bs in graph().items() if a.startswith("steering_kernels")
                for b in bs if b.startswith("adaras")]


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """It can fail: a made-up package with a lazy circle and an upward import."""
    pkg = tmp_path / "adaras"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "engine" / "a.py").write_text("def f():\n    from adaras.engine import b\n")
    (pkg / "engine" / "b.py").write_text("from adaras.engine.a import f\nimport adaras.cli\n")
    (pkg / "cli.py").write_text("")
    monkeypatch.setitem(SOURCES, "adaras", pkg)
    monkeypatch.setitem(SOURCES, "steering_kernels", tmp_path / "none")
    with pytest.raises(pytest.fail.Exception, match="import circle"):
        test_no_module_imports_itself_through_others()
    with pytest.raises(AssertionError, match=r"adaras.engine.b \(layer 2\) imports adaras.cli"):
        test_every_import_points_down_or_sideways_within_a_layer()


def test_nothing_outside_tests_imports_tests():
    wrong = []
    for folder in ("server", "steering_kernels", "benchmarks", "scripts"):
        for f in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                wrong += [f"{f.relative_to(ROOT)} imports {n}" for n in names
                          if n == "tests" or n.startswith("tests.")]
    assert not wrong, "\n".join(wrong)


def test_no_module_over_500_lines_and_no_class_over_200():
    """Issue 32's goal for server/ and steering_kernels/: rooms a reader can hold."""
    wrong = []
    for folder in ("server", "steering_kernels"):
        for f in (ROOT / folder).rglob("*.py"):
            text = f.read_text()
            if (n := len(text.splitlines())) > 500:
                wrong.append(f"{f.relative_to(ROOT)}: {n} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 200:
                    wrong.append(f"{f.relative_to(ROOT)}: class {node.name} "
                                 f"{node.end_lineno - node.lineno + 1} lines")
    assert not wrong, "\n".join(wrong)
