"""Copy a pipeline run's small artifacts (profile, manifest, summaries,
reports, plots) into docs/results/<name>/ for committing. The bulky files
(traces, generations, activation caches) stay in the run directory.

    python scripts/export_run.py /work/runs/smollm2-chain-sum docs/results/smollm2-chain-sum
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

KEEP = ("manifest.json", "*/summary.json", "*/metrics.json", "*/results.json", "*/report.md",
        "*/*.png", "collect/pairs.json")


def export(run: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for pattern in KEEP:
        for src in run.glob(pattern):
            out = dest / src.relative_to(run)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
    final = run / "train-predictor" / "profile.safetensors"
    if not final.exists():
        final = run / "identify" / "profile.safetensors"
    shutil.copy2(final, dest / "profile.safetensors")
    for ablation in run.glob("identify-*/profile.safetensors"):
        shutil.copy2(ablation, dest / ablation.parent.name / "profile.safetensors")


if __name__ == "__main__":
    export(Path(sys.argv[1]), Path(sys.argv[2]))
