import random

import pytest

from services.worker.block_manager import BlockManager, blocks_for


def test_blocks_for_rounds_up():
    assert [blocks_for(n, 16) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_grow_returns_the_blocks_it_added_and_the_table_keeps_them_in_order():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = bm.grow("a", 5)
    added = bm.grow("a", 13)
    assert len(first) == 2 and len(added) == 2 and bm.table("a") == first + added
    assert bm.num_blocks_of("a") == 4 and bm.num_blocks_of("nobody") == 0 and bm.table("nobody") == []
    bm.free("a")
    assert bm.num_blocks_of("a") == 0 and bm.num_free == 8


def test_grow_and_free_keep_accounting():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.can_grow("a", 10)
    assert len(bm.grow("a", 10)) == 3
    assert bm.grow("a", 12) == [] and len(bm.table("a")) == 3               # still fits in 3 blocks
    assert not bm.can_grow("b", 4 * 6)                                      # 6 blocks > 5 free
    bm.grow("b", 20)
    assert bm.num_free == 0 and bm.num_used == 8
    assert set(bm.table("a")).isdisjoint(bm.table("b"))
    bm.free("a")
    assert bm.num_free == 3
    bm.free("b")
    assert bm.num_free == 8


def test_swap_out_and_in_moves_blocks_between_pools():
    bm = BlockManager(num_blocks=4, block_size=4, num_host_blocks=4)
    bm.grow("a", 12)
    out = bm.swap_out("a")
    assert len(out) == 3 and bm.num_free == 4 and bm.num_swapped == 3 and bm.is_swapped("a")
    bm.grow("b", 8)
    assert not bm.can_swap_in("a")           # only 2 device blocks left
    bm.free("b")
    back = bm.swap_in("a")
    assert [h for h, _ in back] == [h for _, h in out]
    assert bm.num_swapped == 0 and len(bm.table("a")) == 3


def test_shared_prefix_blocks_are_refcounted():
    bm = BlockManager(num_blocks=8, block_size=4, num_host_blocks=8)
    bm.grow("a", 10)                                   # 3 blocks, 2 of them full
    assert bm.share("a", "b", 10) == bm.table("a")[:2]
    bm.grow("b", 12)                                   # b's own third block
    assert bm.num_used == 4
    bm.free("a")
    assert bm.num_used == 3                            # the shared two stay for b
    bm.swap_out("b")
    assert bm.num_used == 0 and bm.num_swapped == 3
    bm.free("b")
    assert bm.num_free == 8 and bm.num_swapped == 0


def swap_or_free(bm: BlockManager, u: float, sid: str, live: dict) -> None:
    """u in [0, 1): swap out (first 30%), swap in (next 30%) when possible, else free the sequence."""
    if u < 0.3 and sid in live and not bm.is_swapped(sid) and bm.can_swap_out(sid):
        bm.swap_out(sid)
    elif u < 0.6 and bm.is_swapped(sid) and bm.can_swap_in(sid):
        bm.swap_in(sid)
    else:
        bm.free(sid)
        live.pop(sid, None)


def assert_refcounts(bm: BlockManager, live) -> list[int]:
    """Every device block held by the live sequences is counted once as used, with one ref per holder."""
    held = [b for s in live if not bm.is_swapped(s) for b in bm.table(s)]
    assert len(set(held)) == bm.num_used                          # shared blocks counted once
    assert all(bm._refs[b] == held.count(b) for b in set(held))
    free = bm.device._free                                        # never handed out twice, never both held and free
    assert len(set(free)) == len(free) and set(free).isdisjoint(held) and set(free).isdisjoint(bm._evictable)
    assert_rows_mirror_tables(bm, live)
    return held


def assert_rows_mirror_tables(bm: BlockManager, live) -> None:
    """The numpy rows the runner reads hold exactly each sequence's table, and only holders have a row."""
    for s in live:
        assert (s in bm.rows) == (not bm.is_swapped(s))
        if s in bm.rows:
            assert bm.rows.table(s) == bm.table(s)
    rows = [bm.rows.row(s) for s in live if s in bm.rows]
    assert len(set(rows)) == len(rows)


@pytest.mark.parametrize("seed", range(5))
def test_random_operations_never_leak_or_share_blocks(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=32, block_size=4, num_host_blocks=16)
    sizes: dict[str, int] = {}
    for _ in range(500):
        sid = f"s{rng.randrange(8)}"
        op = rng.random()
        if op < 0.1 and sid not in sizes and not bm.is_swapped(sid) and sizes:
            src = rng.choice([s for s in sizes if not bm.is_swapped(s)] or [None])
            if src is not None:
                bm.share(src, sid, sizes[src])
                sizes[sid] = (sizes[src] // 4) * 4
        elif op < 0.5:
            n = sizes.get(sid, 0) + rng.randrange(1, 9)
            if not bm.is_swapped(sid) and bm.can_grow(sid, n):
                bm.grow(sid, n)
                sizes[sid] = n
        else:
            swap_or_free(bm, (op - 0.5) / 0.5, sid, sizes)
        assert_refcounts(bm, sizes)


def computed(bm: BlockManager, seq_id: str, tokens: list[int]) -> None:
    """What the engine does: blocks for the tokens, then their KV is written and full blocks registered."""
    bm.grow(seq_id, len(tokens))
    bm.register_computed(seq_id, len(tokens), lambda a, b: tokens[a:b])


def test_prefix_cache_shares_the_longest_registered_prefix():
    bm = BlockManager(num_blocks=16, block_size=4, prefix_caching=True)
    a = list(range(100, 110))                           # 2 full blocks + 2 tokens
    computed(bm, "a", a)
    assert bm.num_cached == 2
    b = a[:9] + [7, 7, 7]                               # same first 2 blocks, then its own
    assert bm.match_prefix("b", b) == 8
    assert bm.table("b") == bm.table("a")[:2] and bm._refs[bm.table("a")[0]] == 2
    assert bm.match_prefix("c", a[:5] + [1, 2, 3, 4]) == 4          # one block in common
    assert bm.match_prefix("d", [9] + a[1:]) == 0                   # differs in the first token: no hit
    assert bm.match_prefix("e", a[:8]) == 4             # fully cached: the last block is computed again


def test_cached_blocks_outlive_their_sequence_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=4, prefix_caching=True)
    old, new = [1] * 8, [2] * 8
    computed(bm, "old", old + [0])                      # 3 blocks, 2 registered
    bm.free("old")
    assert bm.num_used == 0 and bm.num_free == 4 and bm.num_cached == 2     # kept, yet free to take
    computed(bm, "new", new + [0])                      # takes the never-used block and evicts old's first
    bm.free("new")
    assert bm.match_prefix("again", old + [5]) == 0     # its first block is gone, so no prefix hit
    bm.free("again")
    assert bm.match_prefix("n2", new + [5]) == 8        # the newer prefix is still there


def test_prefix_caching_off_never_matches():
    bm = BlockManager(num_blocks=8, block_size=4)
    computed(bm, "a", list(range(9)))
    assert bm.num_cached == 0 and bm.match_prefix("b", list(range(9))) == 0


@pytest.mark.parametrize("seed", range(5))
def test_random_operations_with_prefix_cache_keep_accounting(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=24, block_size=4, num_host_blocks=8, prefix_caching=True)
    tokens: dict[str, list[int]] = {}
    for _ in range(600):
        sid = f"s{rng.randrange(6)}"
        op = rng.random()
        if op < 0.3 and sid not in tokens and not bm.is_swapped(sid):
            toks = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]   # few symbols: many shared prefixes
            hit = bm.match_prefix(sid, toks)
            assert hit % 4 == 0 and hit < len(toks)
            if bm.can_grow(sid, len(toks)):
                computed(bm, sid, toks)
                tokens[sid] = toks
            else:
                bm.free(sid)
        elif op < 0.6 and sid in tokens and not bm.is_swapped(sid):
            toks = tokens[sid] + [rng.randrange(3) for _ in range(rng.randrange(1, 6))]
            if bm.can_grow(sid, len(toks)):
                computed(bm, sid, toks)
                tokens[sid] = toks
        else:
            swap_or_free(bm, (op - 0.6) / 0.4, sid, tokens)
        held = assert_refcounts(bm, tokens)
        assert set(bm._evictable).isdisjoint(held) and set(bm._evictable) <= set(bm._key_of)
        # a registered block's key names its holder's tokens up to it
        for s in tokens:
            if not bm.is_swapped(s):
                parent = None
                for i, key in enumerate(bm._seq_keys.get(s, [])):
                    parent = BlockManager.prefix_key(parent, tokens[s][4 * i:4 * i + 4])
                    assert key == parent


def test_forget_cached_frees_unheld_blocks_and_stops_hits():
    bm = BlockManager(num_blocks=8, block_size=4, prefix_caching=True)
    computed(bm, "a", list(range(9)))
    computed(bm, "b", [5] * 9)
    bm.free("a")
    bm.forget_cached()
    assert bm.num_cached == 0 and bm.num_used == 3 and bm.device.num_free == 5
    assert bm.match_prefix("c", list(range(9))) == 0


def test_prefix_cache_is_not_shared_across_salts():
    """Tenants (the engine's salt) never hit each other's blocks: a hit would show in time to first token."""
    bm = BlockManager(num_blocks=16, block_size=4, prefix_caching=True)
    toks = list(range(13))
    bm.grow("a", 13)
    bm.register_computed("a", 13, lambda x, y: toks[x:y], salt=b"tenant-a")
    assert bm.match_prefix("b", toks, salt=b"tenant-b") == 0
    assert bm.match_prefix("a2", toks, salt=b"tenant-a") == 12
