import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.worker.device_tables import DeviceTables
from services.worker.table_rows import TableRows


def test_rows_grow_reuse_and_bump_the_version_of_each_row_written():
    rows = TableRows(rows=2, width=2)
    rows.assign("a", [5, 6, 7])                       # wider than the array: columns double
    rows.assign("b", [1])
    rows.assign("c", [])                              # more sequences than rows: rows double
    rows.append("c", [9, 8])
    assert rows.table("a") == [5, 6, 7] and rows.table("b") == [1] and rows.table("c") == [9, 8]
    assert [int(rows.version[rows.row(s)]) for s in "abc"] == [1, 1, 2]
    assert rows.width(np.array([rows.row("b"), rows.row("c")])) == 2
    assert rows.width(np.array([rows.row("a")]), round_to=16) == 16
    freed, before = rows.row("a"), rows.version.copy()
    rows.release("a")
    rows.assign("d", [3])                             # a released row is handed out again, cleared
    assert rows.row("d") == freed and rows.table("d") == [3]
    assert np.flatnonzero(rows.version != before).tolist() == [freed]


def test_the_prefix_order_pulls_tables_that_share_blocks_to_their_first_and_keeps_the_rest_in_order():
    rows = TableRows(rows=2, width=2)
    # b2 hit b1's blocks after a1's copy of the first one (a1 and b1 were prefilled in one step, each with a copy)
    for seq, table in [("a1", [0, 5, 6, 7]), ("b1", [4, 9, 1, 2]), ("a2", [0, 5, 6, 7, 3]), ("x", []),
                       ("b2", [0, 9, 1, 2, 8]), ("a3", [0, 5, 6, 7]), ("short", [0, 5])]:
        rows.assign(seq, table)
    order = ["a1", "b1", "a2", "x", "b2", "a3", "short"]
    assert [order[i] for i in rows.prefix_order(order)] == ["a1", "a2", "a3", "b1", "b2", "x", "short"]
    assert rows.prefix_order(["a1", "a3"], depth=99) == [0, 1]      # deeper than any table: nothing to group
    assert [order[i] for i in rows.prefix_order(order, depth=1)] == ["a1", "a2", "b2", "a3", "short", "b1", "x"]


def test_changes_that_never_reached_the_device_are_sent_again():
    host = TableRows(rows=4, width=16)
    dev = DeviceTables(host, torch.device("cpu"))
    dev.apply(*(torch.from_numpy(x) for x in dev.changes()))
    host.assign("a", [7, 8])
    changed, _ = dev.changes()                        # handed out, then the step raised before apply()
    assert changed.tolist() == [host.row("a")]
    changed, rows = dev.changes()
    assert changed.tolist() == [host.row("a")]          # not synced yet: sent again, not lost
    dev.apply(torch.from_numpy(changed), torch.from_numpy(rows))
    assert dev.gather(torch.tensor([host.row("a")]), 2).tolist() == [[7, 8]]


def test_the_device_copy_follows_every_change_through_growth_and_reuse():
    """The tables a step gathers on the device equal the host tables in every column below each length,
    after any mix of assigns, appends, releases and growth (rows and columns), with only changed rows sent."""
    rng = np.random.default_rng(0)
    host = TableRows(rows=2, width=2)
    dev = DeviceTables(host, torch.device("cpu"))
    live: dict[str, int] = {}
    for step in range(300):
        op = rng.integers(0, 3)
        if op == 0 or not live:
            sid = f"s{step}"
            host.assign(sid, rng.integers(0, 1000, rng.integers(0, 4)).tolist())
            live[sid] = 1
        elif op == 1:
            host.append(rng.choice(sorted(live)), rng.integers(0, 1000, rng.integers(1, 3)).tolist())
        else:
            sid = rng.choice(sorted(live))
            host.release(sid)
            del live[sid]
        changed, rows = dev.changes()
        assert len(changed) <= 1 or len(changed) == host.blocks.shape[0]     # one row, or all after growth
        dev.apply(torch.from_numpy(changed), torch.from_numpy(rows))
        if live:
            ids = sorted(live)
            row_ids = np.array([host.row(s) for s in ids])
            width = host.width(row_ids)
            got = dev.gather(torch.from_numpy(row_ids), width)
            assert got.dtype == torch.int32 and got.shape == (len(ids), width)
            for sid, line in zip(ids, got.tolist()):
                table = host.table(sid)
                assert line[:len(table)] == table


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), max_size=6), min_size=1, max_size=12), st.integers(1, 4))
def test_the_prefix_order_is_a_permutation_with_each_group_together_in_the_given_order(tables, depth):
    rows = TableRows(rows=2, width=2)
    ids = [f"s{i}" for i in range(len(tables))]
    for seq, table in zip(ids, tables):
        rows.assign(seq, table)
    order = rows.prefix_order(ids, depth)
    assert sorted(order) == list(range(len(ids)))
    # a group: the tables that hold the same `depth`-th block; a shorter table is one of its own
    group = [t[depth - 1] if len(t) >= depth else ("own", i) for i, t in enumerate(tables)]
    runs = [group[i] for k, i in enumerate(order) if k == 0 or group[order[k - 1]] != group[i]]
    assert len(runs) == len(set(runs))                         # each group's members are next to each other
    assert all(a < b for a, b in zip(order, order[1:]) if group[a] == group[b])     # in the given order
    firsts = [min(i for i in range(len(ids)) if group[i] == g) for g in runs]
    assert firsts == sorted(firsts)                            # groups where their first member is
