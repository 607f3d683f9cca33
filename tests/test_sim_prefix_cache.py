"""The simulator's model of a worker's prefix cache (bench/simulator/prefix_cache.py): what a table holds stays,
what nobody holds waits to be evicted in the order the worker's block manager frees it."""
from __future__ import annotations

from bench.simulator.prefix_cache import PrefixCache


def test_a_released_prefix_stays_cached_until_evicted_head_first():
    cache = PrefixCache()
    cache.hold((1, 2, 3), 0, 3)
    assert cache.hits((1, 2, 3, 4)) == 3 and cache.evictable == 0
    cache.release((1, 2, 3), other_blocks=2)      # the prompt's three blocks and two of generated tokens
    assert cache.hits((1, 2, 3, 4)) == 3 and cache.evictable == 5
    cache.evict(1)                                # the table's first block goes first: the whole prefix is lost
    assert cache.hits((1, 2, 3)) == 0 and cache.hits((2, 3)) == 2 and cache.evictable == 4


def test_a_block_two_tables_hold_is_evictable_only_when_both_let_go():
    cache = PrefixCache()
    cache.hold((1, 2), 0, 2)
    cache.hold((1, 2, 5), 0, 3)                   # a second turn found 1, 2 cached and computed 5
    cache.release((1, 2), 0)
    assert cache.evictable == 0
    cache.evict(10)                               # nothing nobody holds: nothing to hand out
    assert cache.hits((1, 2, 5)) == 3
    cache.release((1, 2, 5), 0)
    assert cache.evictable == 3


def test_a_hit_on_an_evictable_block_takes_it_out_of_the_line():
    cache = PrefixCache()
    cache.hold((1, 2), 0, 2)
    cache.release((1, 2), 0)
    cache.hold((1, 2, 3), 0, 1)                   # a new turn holds block 1 again (2 and 3 not yet looked up)
    assert cache.evictable == 1
    cache.evict(1)                                # block 2 goes: 1 is held
    assert cache.hits((1, 2)) == 1


def test_a_block_several_tables_hold_is_one_block_of_the_pool():
    # as the worker's block manager counts references: the simulated worker's pool_used subtracts `shared`
    cache = PrefixCache()
    cache.hold((1, 2), 0, 2)
    cache.hold((1, 2, 3), 0, 3)
    cache.hold((1,), 0, 1)
    assert cache.shared == 3                      # 1 held three times, 2 twice
    cache.release((1, 2), 0)
    assert cache.shared == 1
    cache.release((1,), 0)
    cache.release((1, 2, 3), 0)
    assert cache.shared == 0 and cache.evictable == 3
