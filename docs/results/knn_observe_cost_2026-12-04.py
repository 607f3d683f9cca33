"""What one observation costs the predictor's index: observe one entry, then search (the next Predict), at N entries.

Session 21: before, every observation dropped the faiss index and the next search rebuilt it (past exact_limit, an
IVF k-means training); now new entries join the built index. Run from the repository root:
    .venv/bin/python docs/results/knn_observe_cost_2026-12-04.py 150000 20
"""
import sys
import time

import numpy as np

sys.path.insert(0, ".")
from services.predictor.knn_index import KnnIndex  # noqa: E402

rng = np.random.default_rng(0)


def unit(n):
    v = rng.normal(size=(n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


idx = KnnIndex(384)
n = int(sys.argv[1])
idx.add(unit(n), [10] * n, [f"k{i}" for i in range(n)])
t = time.perf_counter()
idx.search(unit(1), 32)
print(f"{n} entries: first search (build) {time.perf_counter() - t:.2f} s")
ts = []
for i in range(int(sys.argv[2])):
    v = unit(1)
    t = time.perf_counter()
    idx.add(v, [5], [f"n{i}"])
    idx.search(v, 32)
    ts.append(time.perf_counter() - t)
print(f"observe one + search: median {1000 * np.median(ts):.1f} ms over {len(ts)}")
