"""The predictor's math pools are held to --math-threads (default 1): torch's and faiss's OpenMP pools otherwise take
every core of the machine and spin between paced predictions (7-10 of 16 cores on the GPU machine)."""
from __future__ import annotations

import argparse

import faiss
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from services.predictor.server import limit_math_threads, main, serve


@pytest.fixture
def restored_pools():
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    with threadpool_limits(limits=None):       # puts every pool back as it was on leaving
        yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


@pytest.mark.parametrize("n", [1, 3])
def test_every_math_pool_takes_the_set_thread_count(restored_pools, n):
    limit_math_threads(n)
    pools = threadpool_info()
    # numpy's and faiss's OpenBLAS and the OpenMP runtimes of torch and faiss, each held to n
    assert {p["user_api"] for p in pools} == {"blas", "openmp"} and len(pools) >= 3
    assert [(p["filepath"], p["num_threads"]) for p in pools] == [(p["filepath"], n) for p in pools]
    assert torch.get_num_threads() == n and faiss.omp_get_max_threads() == n


def test_default_is_one_thread(monkeypatch):
    seen = {}

    async def recorded(a):
        seen["threads"] = a.math_threads

    monkeypatch.setattr("services.predictor.server.serve", recorded)
    monkeypatch.setattr("sys.argv", ["predictor"])
    main()
    assert seen["threads"] == 1


async def test_zero_threads_is_refused_before_anything_starts():
    with pytest.raises(SystemExit, match="--math-threads must be >= 1"):
        await serve(argparse.Namespace(math_threads=0))
