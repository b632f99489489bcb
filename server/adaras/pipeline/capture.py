"""Activation captures cached in <run>/capture/: one .npz per finished chunk,
so an interrupted capture resumes where it stopped, and captures that several
stages need (identify and its ablations) are made once."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adaras.pipeline.llm import EngineOptions, Job, open_engine, run_captures
from adaras.pipeline.run import Run


def capture_cached(run: Run, name: str, jobs: list[Job], field: str,
                   engine: EngineOptions) -> dict[str, np.ndarray]:
    """{job key: the capture's `field` ("mean" or "tokens")}, capturing
    through the engine only the jobs that <run>/capture/<name>-*.npz lacks."""
    cache = run.stage_dir("capture")
    have = load_parts(cache, name)
    todo = [j for j in jobs if j.key not in have]
    if todo:
        count = [len(have)]

        def on_done(results):
            save_part(cache / f"{name}-{count[0]:06d}.npz", {j.key: c[field] for j, c in results})
            count[0] += len(results)

        record = run.throughput_recorder(f"capture {name}")
        record(run_captures(open_engine(engine, run), todo, on_done, f"capture {name}",
                            on_progress=record))
        have = load_parts(cache, name)
    return {j.key: have[j.key] for j in jobs}


def save_part(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Arrays of any shapes under arbitrary string keys, in one .npz."""
    keys = list(arrays)
    shapes = np.array([list(arrays[k].shape) for k in keys], dtype=np.int64)
    data = np.concatenate([arrays[k].astype(np.float32).ravel() for k in keys])
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, keys=np.array(keys), shapes=shapes, data=data)
    tmp.replace(path)


def load_parts(folder: Path, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob(f"{prefix}-*.npz")):
        if f.name.endswith(".tmp.npz"):
            continue
        with np.load(f) as z:
            keys, shapes, data = z["keys"], z["shapes"], z["data"]
        offset = 0
        for key, shape in zip(keys.tolist(), shapes):
            n = int(np.prod(shape))
            out[key] = data[offset:offset + n].reshape(shape)
            offset += n
    return out
