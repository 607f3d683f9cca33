import random

import pytest

from services.worker.block_manager import BlockManager, blocks_for


def test_blocks_for_rounds_up():
    assert [blocks_for(n, 16) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_grow_and_free_keep_accounting():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.can_grow("a", 10)
    assert len(bm.grow("a", 10)) == 3
    assert bm.grow("a", 12) == bm.table("a") and len(bm.table("a")) == 3   # still fits in 3 blocks
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
        elif op < 0.65 and sid in sizes and not bm.is_swapped(sid) and bm.can_swap_out(sid):
            bm.swap_out(sid)
        elif op < 0.8 and bm.is_swapped(sid) and bm.can_swap_in(sid):
            bm.swap_in(sid)
        else:
            bm.free(sid)
            sizes.pop(sid, None)
        tables = [bm.table(s) for s in sizes if not bm.is_swapped(s)]
        used = [b for t in tables for b in t]
        assert len(set(used)) == bm.num_used                          # shared blocks counted once
        assert all(bm._refs[b] == used.count(b) for b in set(used))
        assert bm.num_free + bm.num_used == bm.num_total
