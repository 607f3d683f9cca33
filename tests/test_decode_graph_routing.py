"""Which decode graph serves each bucket once the graphs are timed (cuda_graphs.fastest_at_least): a bucket whose own
graph is slower than a larger one's replays the fastest larger one (session 33: on an H100 the 448-row graph took
~4 ms a step more than the 480-row one), and a difference within the noise margin changes nothing."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.worker.cuda_graphs import DEFAULT_BUCKETS, SPARE_ROWS, TIME_MARGIN, fastest_at_least, spare_sizes

MS = 1e-3


def test_a_slow_bucket_replays_the_faster_larger_graph():
    seconds = {384: 8.6 * MS, 416: 9.0 * MS, 448: 15.1 * MS, 480: 10.7 * MS}
    assert fastest_at_least(seconds) == {384: 384, 416: 416, 448: 480, 480: 480}


def test_the_fastest_of_the_larger_graphs_is_taken():
    seconds = {400: 11.4 * MS, 416: 11.1 * MS, 432: 10.0 * MS, 448: 15.1 * MS, 480: 10.7 * MS}
    route = fastest_at_least(seconds)
    assert route[400] == route[416] == 432 and route[448] == 480


def test_a_difference_within_the_margin_keeps_the_own_graph():
    own = 10.0 * MS
    seconds = {416: own, 448: own * (1 - TIME_MARGIN / 2)}
    assert fastest_at_least(seconds) == {416: 416, 448: 448}
    seconds[448] = own * (1 - 2 * TIME_MARGIN)
    assert fastest_at_least(seconds)[416] == 448


@given(st.dictionaries(st.integers(1, 4096), st.floats(1e-4, 1e-1), min_size=1, max_size=40),
       st.floats(0, 0.2))
def test_each_bucket_replays_the_fastest_graph_at_least_its_size_when_it_is_clearly_faster(seconds, margin):
    route = fastest_at_least(seconds, margin)
    assert set(route) == set(seconds)
    for size, graph in route.items():
        larger = [c for c in seconds if c > size]
        fastest = min(larger, key=lambda c: (seconds[c], c)) if larger else None
        if fastest is not None and seconds[fastest] < (1 - margin) * seconds[size]:
            assert graph > size and seconds[graph] == seconds[fastest]
        else:
            assert graph == size


def test_spare_graphs_past_the_largest_bucket_within_the_static_rows():
    buckets = [b for b in DEFAULT_BUCKETS if b < 448] + [448]
    assert spare_sizes(buckets, 2 * 448) == [480]
    assert spare_sizes(buckets, 460) == []                       # no graph larger than the buffers hold
    assert spare_sizes([1, 8, 16, 32, 64], 2 * 448) == []        # the next default bucket, 80, is more than 1/8 past


@given(st.integers(1, 4096), st.integers(1, 8192))
def test_spares_are_larger_than_every_bucket_and_fit(max_rows, rows):
    buckets = [b for b in DEFAULT_BUCKETS if b < max_rows] + [max_rows]
    spares = spare_sizes(buckets, rows)
    assert all(max_rows < s <= min(rows, max_rows * (1 + SPARE_ROWS)) for s in spares)
    assert spares == sorted(spares) and set(spares) <= set(DEFAULT_BUCKETS)
