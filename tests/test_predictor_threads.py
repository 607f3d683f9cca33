"""The predictor's math pools are held to --math-threads (default 1): torch's and faiss's OpenMP pools otherwise take
every core of the machine and spin between paced predictions (7-10 of 16 cores on the GPU machine)."""
from __future__ import annotations

import argparse

import faiss
import pytest
import torch

from services.predictor.server import limit_math_threads, main, serve


@pytest.fixture
def restored_pools():
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


@pytest.mark.parametrize("n", [1, 3])
def test_math_pools_take_the_set_thread_count(restored_pools, n):
    limit_math_threads(n)
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
