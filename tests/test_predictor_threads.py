"""The predictor's math pools are held to --math-threads (default 1): torch's, faiss's and numpy's pools otherwise
take every core of the machine and spin between paced predictions (15.5 of 16 cores on the GPU machine). An OpenMP
runtime keeps its count per thread, so the threads that predict and learn (the event loop's executor) must set it
themselves: a thread started plainly takes the process's start value."""
from __future__ import annotations

import argparse
import asyncio

import faiss
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from services.predictor.math_threads import limit_math_threads, math_executor
from services.predictor.server import main, serve


def pool_threads() -> list[tuple[str, int]]:
    return [(p["filepath"], p["num_threads"]) for p in threadpool_info()]


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
    pools = pool_threads()
    # numpy's and faiss's OpenBLAS and the OpenMP runtimes of torch and faiss, each held to n
    assert {p["user_api"] for p in threadpool_info()} == {"blas", "openmp"} and len(pools) >= 3
    assert pools == [(path, n) for path, _ in pools]
    assert torch.get_num_threads() == n and faiss.omp_get_max_threads() == n


@pytest.mark.parametrize("n", [1, 3])
async def test_the_threads_that_predict_and_learn_hold_the_count_too(restored_pools, n):
    limit_math_threads(n)
    with math_executor(n) as executor:
        pools = await asyncio.get_running_loop().run_in_executor(executor, pool_threads)
    assert pools and pools == [(path, n) for path, _ in pools]


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
