"""KV movement kernels: writes into the page views and block gather/scatter, checked bit for bit.

Every check compares the whole backing tensor with what the torch reference makes of a
copy of it, so a byte written where it should not be (another layer, another block, a
neighbouring row) fails as surely as a missing one. Triton runs in its interpreter on CPU
(TRITON_INTERPRET=1, set by conftest.py).
"""
from __future__ import annotations

import pytest
import torch

from infercept_hf.kernels import gather_blocks, scatter_blocks, write_kv
from infercept_hf.kernels.reference import gather_blocks_ref, scatter_blocks_ref, write_kv_ref
from infercept_hf.kernels.kv_copy import WORDS_PER_PROGRAM
from infercept_hf.patches import paged_pool as pp
from kernel_helpers import layer_page_views, paged_attention_cache, seeded

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_bytes(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def kv_storage(num_blocks: int, layers: int, page: int, heads: int, dim: int, dtype: torch.dtype,
               g: torch.Generator) -> torch.Tensor:
    """Random rows laid out like transformers' full-attention cache: `[blocks * 2 * layers * page, H, D]`."""
    return torch.randn(num_blocks * 2 * layers * page, heads, dim, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize(
    "layers,layer,page,heads,dim,dtype,tokens",
    [
        pytest.param(2, 1, 4, 2, 64, torch.float32, 9, id="layer1-of-2-fp32"),
        pytest.param(3, 0, 8, 1, 80, torch.float16, 13, id="layer0-of-3-fp16-d80"),
        pytest.param(1, 0, 4, 3, 96, torch.bfloat16, 6, id="one-layer-bf16-3heads"),
        pytest.param(2, 1, 16, 4, 128, torch.float16, 1, id="single-token"),
    ],
)
def test_write_kv_touches_only_its_slots(layers, layer, page, heads, dim, dtype, tokens):
    g = seeded("write", layers, layer, page, heads, dim, dtype, tokens)
    num_blocks = 5
    rows = kv_storage(num_blocks, layers, page, heads, dim, dtype, g)
    expected = rows.clone()
    # Slots of the layer's real pages (block b is page b * 2L), in random order, never reused.
    all_slots = (torch.arange(num_blocks)[:, None] * 2 * layers * page + torch.arange(page)).flatten()
    slots = all_slots[torch.randperm(len(all_slots), generator=g)[:tokens]].to(DEVICE)
    # The new states come in as the transposed views the attention function passes.
    k_new = torch.randn(heads, tokens, dim, generator=g).to(dtype).to(DEVICE).transpose(0, 1)
    v_new = torch.randn(heads, tokens, dim, generator=g).to(dtype).to(DEVICE).transpose(0, 1)

    write_kv(k_new, v_new, *layer_page_views(rows, layer, page), slots, backend="triton")
    write_kv_ref(k_new, v_new, *layer_page_views(expected, layer, page), slots)
    assert torch.equal(rows, expected)
    k_pages, v_pages = layer_page_views(rows, layer, page)
    assert torch.equal(k_pages[slots // page, slots % page], k_new)
    assert torch.equal(v_pages[slots // page, slots % page], v_new)


def test_write_kv_into_strided_views():
    """Page views need not be contiguous: here each token row is padded."""
    g = seeded("write-strided")
    padded = torch.randn(2, 6, 4, 2, 80, generator=g).to(DEVICE)
    expected = padded.clone()
    slots = torch.tensor([5, 0, 23, 17], device=DEVICE)
    k_new, v_new = torch.randn(2, 4, 2, 64, generator=g).to(DEVICE)
    write_kv(k_new, v_new, padded[0, ..., :64], padded[1, ..., :64], slots, backend="triton")
    write_kv_ref(k_new, v_new, expected[0, ..., :64], expected[1, ..., :64], slots)
    assert torch.equal(padded, expected)


# Bytes per layer pick the word the copy moves: 8 -> int64, 12 -> int32, 6 -> int16, 3 -> bytes; the
# largest one spans several programs per row.
@pytest.mark.parametrize("layer_bytes", [8 * 40, 12, 6, 3, 8 * (WORDS_PER_PROGRAM + 7)])
@pytest.mark.parametrize("layer", [None, 0, 2], ids=["whole-block", "layer0", "layer2"])
def test_gather_then_scatter_match_reference(layer_bytes, layer):
    num_layers, num_blocks = 3, 9
    g = seeded("blocks", layer_bytes, layer)
    copy_view = random_bytes((num_blocks, num_layers * layer_bytes), g).to(DEVICE)
    block_ids = torch.randperm(num_blocks, generator=g)[:5].to(DEVICE)  # out of order, some blocks left alone
    span = num_layers * layer_bytes if layer is None else layer_bytes

    out = random_bytes((5, span), g).to(DEVICE)
    gather_blocks(copy_view, block_ids, out, layer=layer, num_layers=num_layers, backend="triton")
    assert torch.equal(out, gather_blocks_ref(copy_view, block_ids, torch.empty_like(out), layer, num_layers))

    staging = random_bytes((5, span), g).to(DEVICE)
    expected = copy_view.clone()
    scatter_blocks_ref(staging, expected, block_ids, layer, num_layers)
    scatter_blocks(staging, copy_view, block_ids, layer=layer, num_layers=num_layers, backend="triton")
    assert torch.equal(copy_view, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_by_layer_swap_round_trip_on_transformers_cache(backend):
    """Swap every block of a real PagedAttentionCache out layer by layer, wipe it, swap it back."""
    layers = 3
    cache = paged_attention_cache(layers, heads=2, kv_heads=1, head_dim=24, num_blocks=8, device=DEVICE)
    copy_view = pp.block_rows(pp.allocators(cache)["full_attention"])
    copy_view.copy_(random_bytes(tuple(copy_view.shape), seeded("swap")).to(DEVICE))
    before = copy_view.clone()
    block_ids = torch.tensor([7, 2, 5], device=DEVICE)
    staged = [torch.empty(3, copy_view.shape[1] // layers, dtype=torch.uint8, device=DEVICE) for _ in range(layers)]

    for layer in range(layers):
        gather_blocks(copy_view, block_ids, staged[layer], layer=layer, num_layers=layers, backend=backend)
    copy_view[block_ids] = 0
    for layer in range(layers):
        scatter_blocks(staged[layer], copy_view, block_ids, layer=layer, num_layers=layers, backend=backend)
    assert torch.equal(copy_view, before)


def test_copies_reject_misshapen_buffers():
    copy_view = torch.zeros(4, 24, dtype=torch.uint8, device=DEVICE)
    ids = torch.tensor([1, 3], device=DEVICE)
    with pytest.raises(ValueError):
        gather_blocks(copy_view, ids, torch.empty(2, 24, dtype=torch.uint8, device=DEVICE), layer=0, num_layers=2,
                      backend="triton")
    with pytest.raises(ValueError):
        scatter_blocks(torch.empty(2, 24, device=DEVICE), copy_view, ids, backend="triton")
    with pytest.raises(ValueError):
        gather_blocks(copy_view, ids, torch.empty(2, 12, dtype=torch.uint8, device=DEVICE), layer=2, num_layers=2,
                      backend="triton")
