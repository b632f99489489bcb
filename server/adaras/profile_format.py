"""The steering profile's file format (a public contract, described in
`adaras.profile`): writing a profile's parts to a ``*.safetensors`` file
atomically, and reading one back into the fields of a `SteeringProfile`,
every problem a ProfileError naming the file. Validation of the values
(indices, shapes, ranges) is `SteeringProfile`'s; this module knows the
file."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from torch import Tensor

from adaras.model_shape import _SHAPE_INTS, ModelShape, ProfileError, _shape_problem
from adaras.predictor import FailurePredictor

FORMAT = "adaras-profile"
FORMAT_VERSION = "2"
READS_VERSIONS = ("1", "2")
PREDICTOR_PREFIX = "predictor."
ANSWER_PREFIX = "answer_predictor."


def file_version(path) -> str:
    """Short sha256 of a profile file: the same bytes give the same version in
    every process."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def bytes_version(data: bytes) -> str:
    """`file_version` of a profile file's bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


def write(path, profile) -> None:
    """Write a (validated) profile's parts to `path` atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        "layers": profile.layers.detach().cpu().contiguous().clone(),  # int32 [K]
        "neurons": profile.neurons.detach().cpu().contiguous().clone(),  # int32 [K]
        "delta": profile.delta.detach().cpu().contiguous().clone(),  # float32 [K]
    }
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": profile.name,
        "default_alpha": repr(float(profile.default_alpha)),
        "model": json.dumps(asdict(profile.model)),
        "provenance": json.dumps(profile.provenance),
    }
    if profile.threshold is not None:
        metadata["threshold"] = repr(float(profile.threshold))
    if profile.sigma is not None:
        tensors["sigma"] = profile.sigma.detach().cpu().contiguous().clone()  # float32 [K]
    for prefix, p in ((PREDICTOR_PREFIX, profile.predictor),
                      (ANSWER_PREFIX, profile.answer_predictor)):
        if p is not None:
            for key, t in p.to_tensors().items():
                tensors[prefix + key] = t
            metadata[prefix.rstrip(".")] = json.dumps(p.config())
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except Exception as e:  # OSError, SafetensorError
        raise ProfileError(f"steering profile {str(path)!r}: cannot write the file ({e})") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def read(path, data: bytes | None = None) -> tuple[dict, str]:
    """The fields of the profile in the file at `path` (or its bytes `data`)
    and the `where` its errors name; the file's structure checked, its values
    not (SteeringProfile does that)."""
    from safetensors import safe_open
    from safetensors.torch import load as load_bytes

    path = Path(path)
    where = f"steering profile {str(path)!r}"

    def fail(msg: str):
        raise ProfileError(f"{where}: {msg}")

    if data is None and not path.exists():
        fail("file does not exist; check the path (profiles are *.safetensors files)")
    if data is None and not path.is_file():
        fail("is not a regular file")
    try:
        if data is None:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        else:
            size = int.from_bytes(data[:8], "little")
            metadata = dict(json.loads(data[8:8 + size]).get("__metadata__") or {})
            tensors = load_bytes(data)
    except Exception as e:  # SafetensorError, OSError, ...
        fail(f"is not a readable safetensors file ({e}); was it written with SteeringProfile.save?")

    fmt = metadata.get("format")
    if fmt is None:
        fail("missing metadata key 'format'; this is not an AdaRAS steering profile")
    if fmt != FORMAT:
        fail(f"unknown format {fmt!r}, expected {FORMAT!r}")
    version = metadata.get("format_version")
    if version is None:
        fail("missing metadata key 'format_version'")
    if version not in READS_VERSIONS:
        fail(
            f"unsupported format_version {version!r}; this server reads versions "
            f"{', '.join(map(repr, READS_VERSIONS))} (upgrade the server or re-export the profile)"
        )
    for key in ("name", "default_alpha", "model", "provenance"):
        if key not in metadata:
            fail(f"missing metadata key '{key}'")
    for key in ("layers", "neurons", "delta"):
        if key not in tensors:
            fail(f"missing tensor '{key}'")
    known, prefixes = ("layers", "neurons", "delta"), (PREDICTOR_PREFIX,)
    if version != "1":  # what v2 added
        known, prefixes = (*known, "sigma"), (*prefixes, ANSWER_PREFIX)
    extra = [k for k in tensors if k not in known and not k.startswith(prefixes)]
    if extra:
        fail(f"unexpected tensor '{extra[0]}'" + (" (a format_version 1 profile has no such "
                                                   "tensor)" if version == "1" else ""))

    def parse_json(key: str):
        try:
            value = json.loads(metadata[key])
        except json.JSONDecodeError as e:
            fail(f"metadata '{key}' is malformed JSON ({e})")
        if not isinstance(value, dict):
            fail(f"metadata '{key}' must be a JSON object, got {type(value).__name__}")
        return value

    model_json = parse_json("model")
    for key in ("architecture", *_SHAPE_INTS):
        if key not in model_json:
            fail(f"metadata 'model' is missing the field '{key}'")
    model = ModelShape(**{k: model_json[k] for k in ("architecture", *_SHAPE_INTS)})
    problem = _shape_problem(model)
    if problem:
        fail(f"metadata {problem}")
    provenance = parse_json("provenance")

    def parse_float(key: str) -> float:
        try:
            return float(metadata[key])
        except ValueError:
            fail(f"metadata '{key}' is not a number: {metadata[key]!r}")

    default_alpha = parse_float("default_alpha")
    threshold = parse_float("threshold") if "threshold" in metadata else None

    def parse_head(prefix: str) -> FailurePredictor | None:
        head = prefix.rstrip(".")
        found = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        if head not in metadata:
            if found:
                fail(f"has '{prefix}*' tensors but no '{head}' metadata (the {head} config)")
            return None
        if not found:
            fail(f"metadata '{head}' is present but there are no '{prefix}*' tensors")
        try:
            return FailurePredictor.from_tensors(found, parse_json(head), key_prefix=prefix)
        except ValueError as e:
            fail(f"invalid {head}: {e}")

    predictor = parse_head(PREDICTOR_PREFIX)
    answer_predictor = parse_head(ANSWER_PREFIX) if version != "1" else None

    return {"name": metadata["name"], "layers": tensors["layers"],
            "neurons": tensors["neurons"], "delta": tensors["delta"], "model": model,
            "default_alpha": default_alpha, "threshold": threshold,
            "provenance": provenance, "predictor": predictor,
            "sigma": tensors.get("sigma"), "answer_predictor": answer_predictor}, where


__all__ = ["ANSWER_PREFIX", "FORMAT", "FORMAT_VERSION", "PREDICTOR_PREFIX", "READS_VERSIONS",
           "Tensor", "bytes_version", "file_version", "read", "write"]
