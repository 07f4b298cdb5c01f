"""The cache is the one writer of each request's cached-token count and of its moved bytes."""
from __future__ import annotations

import infercept_hf as ih
from infercept_hf.kv_ledger import KVRecord

from conftest import TEST_COST


def _cache(llama) -> ih.InterceptPagedCache:
    engine = ih.InterceptEngine(llama, policy="swap", num_blocks=16, block_size=4, host_pool_bytes=1 << 20,
                                cost_model=TEST_COST)
    return engine.cache


def test_moves_keep_the_record_of_cached_tokens(llama):
    cache = _cache(llama)
    record = KVRecord()
    cache.track("r", record)
    assert cache.allocate("r", 0, 10)  # 3 blocks of 4
    cache.record_computed("r", 10)
    assert (record.computed, record.high_water, cache.device_tokens("r")) == (10, 10, 10)
    assert cache.swap_out("r", 1) == 1  # tokens 8..9 on host: still cached, no longer on device
    assert (record.computed, cache.device_tokens("r")) == (10, 8)
    moved_out = record.swapped_bytes
    assert moved_out == cache.swapped_out_bytes > 0
    assert cache.swap_in("r") == moved_out  # the bytes that came back
    assert record.swapped_bytes == 2 * moved_out
    cache.discard_device("r", 2)  # drop the last two blocks: only the first 4 tokens stay
    assert (record.computed, record.high_water, cache.device_tokens("r")) == (4, 10, 4)
    assert cache.swap_out("r") == 1
    cache.discard_host("r")
    assert (record.computed, cache.device_tokens("r")) == (0, 0)
    cache.free("r")
    cache.check_integrity()
    assert cache.is_empty()


def test_swap_in_without_room_moves_nothing(llama):
    cache = _cache(llama)
    record = KVRecord()
    cache.track("r", record)
    assert cache.allocate("r", 0, 16)
    cache.record_computed("r", 16)
    assert cache.swap_out("r") == 4
    assert cache.allocate("other", 0, 64)  # the whole pool
    assert cache.swap_in("r") is None
    assert (record.computed, cache.host_blocks("r"), cache.device_blocks("r")) == (16, 4, 0)
    cache.check_integrity()
