"""The swap pipeline's two rules: a block is never read before it lands, never freed before it leaves."""
from __future__ import annotations

import pytest
import torch

import infercept_hf as ih
from infercept_hf.offload import SwapPipeline
from infercept_hf.patches import paged_pool as pp
from conftest import TEST_COST, prompts_for, reference_scripted
from test_engine import TRACE, run_checked


def _engine(model, policy, pipeline):
    engine = ih.InterceptEngine(model, policy=policy, num_blocks=14, block_size=4, host_pool_bytes=64 * 4 * 512,
                                cost_model=TEST_COST)
    engine.cache.pipeline = pipeline
    return engine


class SkipsTheWait(SwapPipeline):
    """Negative control: forgets to wait for a layer's swap-in before the forward reads it."""

    def before_layer(self, layer_idx: int) -> None:
        pass


@pytest.mark.parametrize("policy", ["swap", "min-waste"])
def test_lazy_copies_still_give_exact_tokens(llama, policy):
    engine = _engine(llama, policy, SwapPipeline("lazy"))
    prompts = prompts_for(21, [9, 14, 7, 12])
    ids = [engine.add_request(p, max_new_tokens=14, interceptions=s) for p, s in zip(prompts, TRACE)]
    results = run_checked(engine)
    assert engine.stats()["swapped_in_bytes"] > 0
    for rid, p, s in zip(ids, prompts, TRACE):
        assert results[rid].token_ids == reference_scripted(llama, p, s, 14)


def test_reading_before_landing_is_caught(llama):
    engine = _engine(llama, "swap", SkipsTheWait("lazy"))
    prompts = prompts_for(21, [9, 14, 7, 12])
    ids = [engine.add_request(p, max_new_tokens=14, interceptions=s) for p, s in zip(prompts, TRACE)]
    results = run_checked(engine)
    wrong = [rid for rid, p, s in zip(ids, prompts, TRACE) if results[rid].token_ids != reference_scripted(llama, p, s, 14)]
    assert wrong, "a pipeline that skips the wait must corrupt some request"


def test_blocks_are_freed_only_after_they_leave(llama):
    engine = _engine(llama, "swap", SwapPipeline("lazy"))
    cache = engine.cache
    assert cache.allocate("r", 0, 10)  # 3 blocks of 4
    alloc = next(iter(pp.allocators(cache).values()))
    table = list(pp.block_tables(alloc)["r"])
    view = pp.block_rows(alloc)
    view[table] = torch.randint(0, 255, (3, view.shape[1]), dtype=torch.uint8)
    before = view[table].clone()
    free_before = cache.free_device_blocks()
    assert cache.swap_out("r", 2, wait=False) == 2
    assert cache.free_device_blocks() == free_before  # still in flight: not free yet
    cache.check_integrity()
    cache.finish_transfers()
    assert cache.free_device_blocks() == free_before + 2
    host = cache.host[next(iter(cache.host))]
    assert torch.equal(host.storage[host.tables["r"]], before[1:])
    view[table[1:]] = 0  # the freed device blocks may be reused and overwritten
    assert cache.swap_in("r")
    assert len(cache.pipeline.in_flight()) == 1
    cache.pipeline.before_layer(0)
    assert cache.pipeline.in_flight()[0].layers_done == {0}  # layer 0 landed, layer 1 not yet
    cache.finish_transfers()
    new_table = pp.block_tables(alloc)["r"]
    assert torch.equal(view[new_table], before)
    cache.free("r")
    cache.check_integrity()
    assert cache.is_empty()
