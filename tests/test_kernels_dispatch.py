"""Backend choice and the benchmark's behaviour on a machine without CUDA."""
from __future__ import annotations

import os

import pytest
import torch

from infercept_hf.kernels import paged_decode_attention, reference, triton_available, write_kv
from infercept_hf.kernels.bench import main as bench_main


def test_triton_on_cpu_follows_the_interpreter_flag(monkeypatch):
    assert triton_available("cpu") == (os.environ.get("TRITON_INTERPRET") == "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_available("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        write_kv(*torch.zeros(4, 1, 1, 8), torch.zeros(1, dtype=torch.long), backend="triton")


def test_default_backend_on_cpu_is_torch(monkeypatch):
    """`backend=None` never picks the (slow) interpreter, even where it could run."""
    calls = []
    monkeypatch.setattr(reference, "decode_attention_ref", lambda *args: calls.append(args))
    pages = torch.ones(2, 4, 1, 8)
    paged_decode_attention(torch.ones(1, 2, 8), pages, pages, torch.tensor([[1]], dtype=torch.int32),
                           torch.tensor([3], dtype=torch.int32), 0.5)
    assert len(calls) == 1


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        write_kv(*torch.zeros(4, 1, 1, 8), torch.zeros(1, dtype=torch.long), backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_bench_says_why_it_does_nothing_without_cuda(capsys):
    assert bench_main() == 0
    out = capsys.readouterr().out
    assert "no CUDA" in out and len(out.strip().splitlines()) == 1
