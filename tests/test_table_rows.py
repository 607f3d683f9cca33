import numpy as np

from services.worker.table_rows import TableRows


def test_rows_grow_reuse_and_pad():
    rows = TableRows(rows=2, width=2)
    rows.assign("a", [5, 6, 7])                       # wider than the array: columns double
    rows.assign("b", [1])
    rows.assign("c", [])                              # more sequences than rows: rows double
    rows.append("c", [9, 8])
    assert rows.table("a") == [5, 6, 7] and rows.table("b") == [1] and rows.table("c") == [9, 8]
    got = rows.gather(np.array([rows.row("b"), rows.row("a"), rows.row("c")]), pad=-1, round_to=4)
    assert got.tolist() == [[1, -1, -1, -1], [5, 6, 7, -1], [9, 8, -1, -1]]
    freed = rows.row("a")
    rows.release("a")
    rows.assign("d", [3])                             # a released row is handed out again, cleared
    assert rows.row("d") == freed and rows.table("d") == [3]
    assert rows.gather(np.array([rows.row("d")]), pad=0).tolist() == [[3]]


def test_gather_past_the_array_width_pads():
    rows = TableRows(rows=1, width=2)
    rows.assign("a", [4])
    assert rows.gather(np.array([0]), pad=-1, round_to=16).tolist() == [[4] + [-1] * 15]
