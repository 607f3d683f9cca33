"""A bounded vector index of past prompts with their true output lengths.

Exact inner product (faiss IndexFlatIP over unit vectors = cosine similarity) up to `exact_limit` entries;
beyond that an inverted-file index over 8-bit scalar-quantized vectors (IVF + SQ8: a quarter of the bytes,
and a query scans only `nprobe` of `nlist` cells). The vectors themselves are kept in float16 (to rebuild
and persist the index). Entries are de-duplicated by prompt hash (a repeated prompt updates its length to the
running mean) and the oldest are evicted in batches when the index is full.

The predictor learns about once a second under load, and searches hold the same lock, so learning must not cost
a rebuild: new entries go into grown-by-doubling buffers and into the built faiss index as they come. The index is
rebuilt only when rows move (an eviction), when the exact index outgrows `exact_limit`, or when the IVF index has
doubled since its cells were trained (so the cells still fit the data).

Where faiss is not installed (the GPU benchmark machines: its wheel alone is ~19 MB of the 64 MiB a device call
carries), the search is exact, in numpy, over the stored vectors: the same neighbours as IndexFlatIP, fine for the
few thousand prompts a benchmark's index holds, slow for a production one past `exact_limit`.
"""
from __future__ import annotations

import importlib.util

import numpy as np

HAVE_FAISS = importlib.util.find_spec("faiss") is not None


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) of each query's k largest inner products, best first, as faiss.IndexFlatIP returns them."""
    sims = np.asarray(queries, np.float32) @ np.asarray(vectors, np.float32).T
    ids = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(sims, ids, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(ids, order, axis=1)


class KnnIndex:
    def __init__(self, dim: int, max_entries: int = 1_000_000, exact_limit: int = 100_000,
                 nlist: int = 1024, nprobe: int = 16):
        self.dim = dim
        self.max_entries = max_entries
        self.exact_limit = exact_limit
        self.nlist, self.nprobe = nlist, nprobe
        # buffers whose first len(self) rows are the entries
        self._vectors = np.zeros((0, dim), dtype=np.float16)
        self._log_lengths = np.zeros(0, dtype=np.float32)
        self._counts = np.zeros(0, dtype=np.float32)
        self.keys: list[str] = []
        self._pos: dict[str, int] = {}
        self._faiss = None
        self._trained_at = 0                      # entries when the IVF cells were trained

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def vectors(self) -> np.ndarray:
        return self._vectors[:len(self)]

    @property
    def log_lengths(self) -> np.ndarray:
        return self._log_lengths[:len(self)]

    @property
    def counts(self) -> np.ndarray:
        return self._counts[:len(self)]

    def _reserve(self, n: int) -> None:
        if n <= len(self._log_lengths):
            return
        cap = max(n, 2 * len(self._log_lengths), 1024)
        used = len(self)
        for name in ("_vectors", "_log_lengths", "_counts"):
            old = getattr(self, name)
            grown = np.zeros((cap, *old.shape[1:]), dtype=old.dtype)
            grown[:used] = old[:used]
            setattr(self, name, grown)

    def add(self, vecs: np.ndarray, lengths, keys: list[str]) -> None:
        fresh: dict[str, int] = {}                 # key -> row in this batch
        for row, (n, k) in enumerate(zip(lengths, keys)):
            if k in self._pos:                    # seen before: running mean of its log length
                i = self._pos[k]
                self.counts[i] += 1
                self.log_lengths[i] += (np.log(n) - self.log_lengths[i]) / self.counts[i]
            else:
                fresh.setdefault(k, row)
        if not fresh:
            return                                # lengths changed, vectors did not: the index stands
        rows = list(fresh.values())
        start, end = len(self), len(self) + len(rows)
        self._reserve(end)
        self._vectors[start:end] = np.asarray(vecs, dtype=np.float16)[rows]
        self._log_lengths[start:end] = np.log(np.asarray(lengths, np.float32)[rows])
        self._counts[start:end] = 1.0
        self.keys += list(fresh)
        self._pos.update({k: start + j for j, k in enumerate(fresh)})
        if self._evict() or self._outgrown():
            self._faiss = None                    # rebuilt on the next search
        elif self._faiss is not None:
            self._faiss.add(self._vectors[start:end].astype(np.float32))

    def _evict(self) -> bool:
        if len(self.keys) <= self.max_entries:
            return False
        drop = len(self.keys) - int(self.max_entries * 0.9)   # evict in batches, oldest first
        used = len(self)
        self._vectors, self._log_lengths, self._counts = (
            self._vectors[drop:used], self._log_lengths[drop:used], self._counts[drop:used])
        self.keys = self.keys[drop:]
        self._pos = {k: i for i, k in enumerate(self.keys)}
        return True

    def _outgrown(self) -> bool:
        """The built index no longer suits the entries: exact past exact_limit, or IVF cells trained on half as many."""
        if self._faiss is None:
            return False
        if self._trained_at == 0:
            return len(self) > self.exact_limit
        return len(self) > 2 * self._trained_at

    def _index(self):
        if self._faiss is None:
            self._faiss = self._build()
        return self._faiss

    def _build(self):
        import faiss

        if len(self) <= self.exact_limit:
            index = faiss.IndexFlatIP(self.dim)
            self._trained_at = 0
        else:
            index = faiss.index_factory(self.dim, f"IVF{self.nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            sample = self.vectors[rng.choice(len(self), min(len(self), 64 * self.nlist), replace=False)]
            index.train(sample.astype(np.float32))
            index.nprobe = self.nprobe
            self._trained_at = len(self)
        for start in range(0, len(self), 100_000):          # fp16 -> fp32 a chunk at a time
            index.add(self.vectors[start:start + 100_000].astype(np.float32))
        return index

    def search(self, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities [n, k], log lengths [n, k]); missing neighbours have similarity -inf."""
        sims, ids = self.neighbours(vecs, k)
        if len(self) == 0:
            return sims, np.zeros(ids.shape, np.float32)
        return sims, self.log_lengths[np.maximum(ids, 0)]

    def neighbours(self, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities [n, k], entry ids [n, k]); a missing neighbour has similarity -inf and id -1."""
        if len(self) == 0:
            return np.full((len(vecs), k), -np.inf, np.float32), np.full((len(vecs), k), -1)
        if HAVE_FAISS:
            sims, ids = self._index().search(vecs, min(k, len(self)))
        else:
            sims, ids = exact_search(self.vectors, vecs, min(k, len(self)))
        if sims.shape[1] < k:
            pad = k - sims.shape[1]
            sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        sims = np.where(ids >= 0, sims, -np.inf)
        return sims.astype(np.float32), ids

    def state(self) -> dict:
        return {"vectors": self.vectors, "log_lengths": self.log_lengths,
                "counts": self.counts, "keys": np.asarray(self.keys)}

    def load_state(self, s: dict) -> None:
        vectors = s["vectors"].astype(np.float16)
        log_lengths, counts = s["log_lengths"].astype(np.float32), s["counts"].astype(np.float32)
        keys = [str(k) for k in s["keys"]]
        if not (len(vectors) == len(log_lengths) == len(counts) == len(keys)):
            raise ValueError("index arrays disagree in length")
        self._vectors, self._log_lengths, self._counts, self.keys = vectors, log_lengths, counts, keys
        self._pos = {k: i for i, k in enumerate(self.keys)}
        self._faiss = None
