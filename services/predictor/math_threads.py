"""The predictor's math threads: every pool held to `--math-threads` (default 1), in every thread that does math.

torch's, faiss's and numpy's pools (two OpenMP runtimes and two OpenBLAS builds load here) default to every core
of the machine, and their idle threads spin between paced predictions: 16 of them used 7-15 cores on the GPU
machine to predict 48 prompts a second, where one thread used a quarter of a core and answered 5x sooner
(bench/predictor_threads.py, docs/BENCHMARKS.md, session 33). An OpenMP runtime keeps its thread count per
thread, and a thread it did not start takes the process's start value, not the count another thread set: the
threads that predict and learn (the event loop's executor, asyncio.to_thread) set it themselves as they start.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor


def limit_math_threads(n: int) -> None:
    """Holds every math pool loaded to `n` threads, for the calling thread (OpenMP) and the process (the rest)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)      # torch keeps its own count besides its OpenMP runtime's
    try:
        import faiss              # loaded now, so that its OpenMP runtime and OpenBLAS are among the limited
        faiss.omp_set_num_threads(n)
    except ImportError:           # the kNN index then runs on numpy (knn_index.py)
        pass
    threadpool_limits(limits=n)   # the rest: numpy's OpenBLAS, faiss's, the OpenMP runtimes


def math_executor(n: int) -> ThreadPoolExecutor:
    """An executor whose threads each hold the math pools to `n` threads (the event loop's default, for
    asyncio.to_thread)."""
    return ThreadPoolExecutor(thread_name_prefix="math", initializer=limit_math_threads, initargs=(n,))
