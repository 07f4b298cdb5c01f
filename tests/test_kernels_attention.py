"""Triton paged decode / prefill attention against the float64 torch reference.

Caches are built the way transformers lays them out (layer 1 of a 2-layer block, pages at
`block * 2L`) or as padded, non-contiguous views; every page row that holds no token is NaN,
so a kernel that reads past a sequence's end fails. Outputs start NaN, so a row the kernel
forgets fails too. On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set
by conftest.py before triton is imported): shapes are tiny.
"""
from __future__ import annotations

import pytest
import torch

from infercept_hf.kernels import paged_decode_attention, paged_prefill_attention
from infercept_hf.kernels.reference import decode_attention_ref, prefill_attention_ref
from kernel_helpers import layer_page_views, seeded

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_LAYERS = 2  # the "interleaved" layout mimics a 2-layer model and reads layer 1

BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(DEVICE.type == "cpu", reason="tl.dot on bfloat16 is wrong in Triton's CPU interpreter"),
    id="bf16",
)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def page_views(num_blocks: int, page: int, heads: int, dim: int, dtype: torch.dtype, layout: str):
    """NaN-filled K/V page views and the page index of each block in them."""
    if layout == "interleaved":  # transformers' full-attention allocator: [L0 K | L0 V | L1 K | L1 V] per block
        rows = torch.full((num_blocks * 2 * NUM_LAYERS * page, heads, dim), float("nan"), dtype=dtype)
        return *layer_page_views(rows, 1, page), torch.arange(num_blocks) * 2 * NUM_LAYERS
    padded = torch.full((2, num_blocks, page, heads, dim + 16), float("nan"), dtype=dtype)
    return padded[0, ..., :dim], padded[1, ..., :dim], torch.arange(num_blocks)


def paged_cache(lens: list[int], page: int, heads: int, dim: int, dtype: torch.dtype, layout: str, g: torch.Generator):
    """Random K/V for sequences of `lens` tokens in shuffled pages; returns (k_pages, v_pages, block_table).

    Table entries past a sequence's end point at a spare page that stays NaN.
    """
    need = [-(-n // page) for n in lens]
    num_blocks = sum(need) + 3
    k_pages, v_pages, block_pages = page_views(num_blocks, page, heads, dim, dtype, layout)
    order = block_pages[torch.randperm(num_blocks, generator=g)].tolist()
    table = torch.full((len(lens), max(need, default=0) + 1), order.pop(), dtype=torch.int32)
    for b, n in enumerate(lens):
        for j in range(need[b]):
            p = order.pop()
            table[b, j] = p
            rows = min(page, n - j * page)
            k_pages[p, :rows] = torch.randn(rows, heads, dim, generator=g).to(dtype)
            v_pages[p, :rows] = torch.randn(rows, heads, dim, generator=g).to(dtype)
    return k_pages.to(DEVICE), v_pages.to(DEVICE), table.to(DEVICE)


def queries(tokens: int, heads: int, dim: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """`[tokens, heads, dim]` as the transposed view the attention function passes (non-contiguous)."""
    return torch.randn(heads, tokens, dim, generator=g).to(dtype).to(DEVICE).transpose(0, 1)


def as_f64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(torch.float64) for t in tensors]


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.to(torch.float64).cpu(), ref.cpu(), rtol=tol, atol=tol)


# (q heads, kv heads, head dim, page size, lengths, splits, layout): GQA 1, 2, 4 and MQA, head dims
# 64..256, lengths that are not multiples of P, an empty sequence, splits off, on, and more than needed.
DECODE_CASES = [
    pytest.param(2, 2, 64, 4, [5, 13, 1], 1, "interleaved", id="mha-d64"),
    pytest.param(4, 2, 80, 4, [7, 30, 2], 3, "interleaved", id="gqa2-d80-split3"),
    pytest.param(8, 2, 96, 8, [17, 9], 2, "padded", id="gqa4-d96-split2"),
    pytest.param(3, 1, 128, 4, [1, 22, 11], 1, "padded", id="mqa3-d128"),
    pytest.param(4, 1, 128, 4, [26, 3], 4, "interleaved", id="mqa4-d128-split4"),
    pytest.param(2, 1, 256, 4, [9, 0, 14], 2, "interleaved", id="gqa2-d256-empty-split2"),
    pytest.param(2, 2, 64, 16, [3, 5], 8, "padded", id="mha-more-splits-than-tokens"),
    pytest.param(4, 4, 64, 4, [150, 37], 3, "interleaved", id="mha-long-split3"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize("hq,hkv,dim,page,lens,splits,layout", DECODE_CASES)
def test_decode_matches_reference(hq, hkv, dim, page, lens, splits, layout, dtype):
    g = seeded("decode", hq, hkv, dim, page, lens, splits, layout, dtype)
    k_pages, v_pages, table = paged_cache(lens, page, hkv, dim, dtype, layout, g)
    q = queries(len(lens), hq, dim, dtype, g)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = dim**-0.5
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    paged_decode_attention(q, k_pages, v_pages, table, seq_lens, scale, num_splits=splits, out=out, backend="triton")
    ref = decode_attention_ref(*as_f64(q, k_pages, v_pages), table, seq_lens, scale)
    assert_close(out, ref, dtype)


def test_decode_split_and_unsplit_agree():
    g = seeded("split-agree")
    k_pages, v_pages, table = paged_cache([45, 19], 4, 2, 64, torch.float32, "interleaved", g)
    q = queries(2, 4, 64, torch.float32, g)
    seq_lens = torch.tensor([45, 19], dtype=torch.int32, device=DEVICE)
    whole = paged_decode_attention(q, k_pages, v_pages, table, seq_lens, 0.125, num_splits=1, backend="triton")
    split = paged_decode_attention(q, k_pages, v_pages, table, seq_lens, 0.125, num_splits=5, backend="triton")
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-6)


# (q heads, kv heads, head dim, page size, cached lengths after the write, query lengths, layout): a whole
# prompt, resumed answers and recompute chunks mid-context, decode-like single queries, an empty chunk,
# and chunks longer than one query tile.
PREFILL_CASES = [
    pytest.param(2, 2, 64, 4, [7, 13], [7, 5], "interleaved", id="mha-d64"),
    pytest.param(4, 2, 80, 4, [21, 6, 9], [3, 6, 1], "padded", id="gqa2-d80"),
    pytest.param(8, 2, 96, 8, [30, 11], [17, 11], "interleaved", id="gqa4-d96"),
    pytest.param(3, 1, 128, 4, [10, 5, 18], [4, 0, 18], "interleaved", id="mqa3-d128-empty-chunk"),
    pytest.param(2, 1, 256, 4, [43, 9], [40, 2], "padded", id="gqa2-d256-two-tiles"),
    pytest.param(2, 2, 64, 4, [83, 3], [70, 3], "interleaved", id="mha-d64-two-tiles"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize("hq,hkv,dim,page,lens,q_lens,layout", PREFILL_CASES)
def test_prefill_matches_reference(hq, hkv, dim, page, lens, q_lens, layout, dtype):
    g = seeded("prefill", hq, hkv, dim, page, lens, q_lens, layout, dtype)
    k_pages, v_pages, table = paged_cache(lens, page, hkv, dim, dtype, layout, g)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = queries(sum(q_lens), hq, dim, dtype, g)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = dim**-0.5
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    paged_prefill_attention(q, k_pages, v_pages, table, cu, seq_lens, scale, out=out, backend="triton")
    ref = prefill_attention_ref(*as_f64(q, k_pages, v_pages), table, cu, seq_lens, scale)
    assert_close(out, ref, dtype)


def test_prefill_leaves_padding_rows_alone():
    """Rows past `cu_seqlens_q[-1]` are padding tokens: the kernel must not write them."""
    g = seeded("padding")
    k_pages, v_pages, table = paged_cache([9, 4], 4, 1, 64, torch.float32, "interleaved", g)
    q = queries(8, 2, 64, torch.float32, g)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([9, 4], dtype=torch.int32, device=DEVICE)
    out = torch.full(q.shape, float("nan"), device=DEVICE)
    paged_prefill_attention(q, k_pages, v_pages, table, cu, seq_lens, 0.125, max_seqlen_q=3, out=out, backend="triton")
    ref = prefill_attention_ref(*as_f64(q[:5], k_pages, v_pages), table, cu, seq_lens, 0.125)
    assert_close(out[:5], ref, torch.float32)
    assert out[5:].isnan().all()


def test_prefill_of_single_queries_equals_decode():
    """A chunk of one query per sequence is a decode step: both kernels must agree."""
    g = seeded("prefill-is-decode")
    lens = [12, 1, 7]
    k_pages, v_pages, table = paged_cache(lens, 4, 2, 80, torch.float32, "padded", g)
    q = queries(3, 4, 80, torch.float32, g)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    cu = torch.arange(4, dtype=torch.int32, device=DEVICE)
    decode = paged_decode_attention(q, k_pages, v_pages, table, seq_lens, 0.1, num_splits=2, backend="triton")
    prefill = paged_prefill_attention(q, k_pages, v_pages, table, cu, seq_lens, 0.1, backend="triton")
    torch.testing.assert_close(prefill, decode, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_backend_matches_float64_reference(dtype):
    """The CPU engine's path: the reference in the cache dtype, accumulating in float32."""
    g = seeded("torch-backend", dtype)
    lens, q_lens = [11, 6], [4, 6]
    k_pages, v_pages, table = paged_cache(lens, 4, 1, 64, dtype, "interleaved", g)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = queries(sum(q_lens), 2, 64, dtype, g)
    out = paged_prefill_attention(q, k_pages, v_pages, table, cu, seq_lens, 0.125, backend="torch")
    ref = prefill_attention_ref(*as_f64(q, k_pages, v_pages), table, cu, seq_lens, 0.125)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
