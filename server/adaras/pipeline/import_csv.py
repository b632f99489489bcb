"""`adaras import-profile`: a neuron list in the reference implementation's CSV
format (cat-sk/AdaRAS, `top_200_neurons_by_rel_abs_diff.csv`) as a validated
steering profile for a given model, so the paper's own neurons can be served.

CSV columns (a header row; any others are ignored):
    overall_neuron_index  layer * intermediate_size + neuron_index_in_layer
    layer                 decoder layer
    neuron_index_in_layer index within that layer's MLP intermediate dimension
    weight                S, the raw mean gap (correct minus incorrect)
    abs_weight            |weight|
    useless               optional; recorded, never used to skip a row

The first K rows in file order become the profile, as the reference's config
takes them (`num_neurons_to_intervene`), with its dose (`strength` 0.3) and
its positions: the last prompt position and every decode step.
"""

from __future__ import annotations

import csv
import hashlib
import math
import time
from pathlib import Path

import torch

from adaras.profile import ModelShape, ProfileError, SteeringProfile

COLUMNS = ("overall_neuron_index", "layer", "neuron_index_in_layer", "weight", "abs_weight")
MAX_CSV_BYTES = 64 << 20  # a 200-row list is ~10 KB


def import_reference_csv(path, shape: ModelShape, *, k: int = 50, alpha: float = 0.3,
                         name: str | None = None, model: str = "") -> SteeringProfile:
    """The first `k` rows of the CSV at `path` as a profile for `shape`;
    ValueError naming the file, row and column for anything malformed."""
    path = Path(path)
    where = f"{path}"
    if not path.is_file():
        raise ValueError(f"{where}: no such file")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise ValueError(f"{where}: {path.stat().st_size} bytes; a neuron list is far smaller "
                         f"(limit {MAX_CSV_BYTES})")
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e})") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; expected a header with "
                         f"{', '.join(COLUMNS)} (and optionally useless)")
    rows = []
    for lineno, row in enumerate(reader, start=2):
        if len(rows) == k:
            break
        rows.append(_row(where, lineno, row, shape))
    if len(rows) < k:
        raise ValueError(f"{where}: {len(rows)} neuron rows, fewer than --k {k}")
    stem = name or path.stem
    profile = SteeringProfile(
        name=stem, model=shape,
        layers=torch.tensor([r["layer"] for r in rows], dtype=torch.int32),
        neurons=torch.tensor([r["neuron"] for r in rows], dtype=torch.int32),
        delta=torch.tensor([r["weight"] for r in rows], dtype=torch.float32),
        default_alpha=alpha,
        provenance={"recipe": "reference", "imported_from": path.name,
                    "csv_sha256": hashlib.sha256(data).hexdigest(), "k": k, "model": model,
                    "rows_marked_useless": sum(r["useless"] for r in rows),
                    "steer_prompt": "last", "selection": "reference CSV, first K rows",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "method": "AdaRAS (arXiv 2601.19847), reference implementation's list"})
    try:
        profile.validate(shape)
    except ProfileError as e:
        raise ValueError(f"{where}: {e}") from None
    return profile


def _row(where: str, lineno: int, row: dict, shape: ModelShape) -> dict:
    def number(column: str, kind):
        raw = (row.get(column) or "").strip()
        try:
            value = kind(float(raw)) if kind is int and raw.endswith(".0") else kind(raw)
        except ValueError:
            raise ValueError(f"{where}:{lineno}: column {column!r} is not "
                             f"{'an integer' if kind is int else 'a number'}: {raw!r}") from None
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{where}:{lineno}: column {column!r} is not finite: {raw!r}")
        return value

    layer, neuron = number("layer", int), number("neuron_index_in_layer", int)
    overall, weight = number("overall_neuron_index", int), number("weight", float)
    if not 0 <= layer < shape.num_layers or not 0 <= neuron < shape.intermediate_size:
        raise ValueError(f"{where}:{lineno}: neuron (layer {layer}, index {neuron}) is outside "
                         f"{shape.describe()}; is this list for another model?")
    if overall != layer * shape.intermediate_size + neuron:
        raise ValueError(f"{where}:{lineno}: overall_neuron_index {overall} is not layer * "
                         f"{shape.intermediate_size} + neuron_index_in_layer "
                         f"({layer * shape.intermediate_size + neuron}); the list was made for a "
                         "model with another intermediate size")
    if not math.isclose(abs(weight), number("abs_weight", float), rel_tol=1e-5, abs_tol=1e-7):
        raise ValueError(f"{where}:{lineno}: abs_weight is not |weight|")
    useless = (row.get("useless") or "").strip().lower() in ("1", "true", "yes")
    return {"layer": layer, "neuron": neuron, "weight": weight, "useless": useless}
