"""A bounded vector index of past prompts with their true output lengths.

Exact inner product (faiss IndexFlatIP over unit vectors = cosine similarity) up to `exact_limit` entries;
beyond that an inverted-file index over 8-bit scalar-quantized vectors (IVF + SQ8: a quarter of the bytes,
and a query scans only `nprobe` of `nlist` cells). The vectors themselves are kept in float16 (to rebuild
and persist the index). Entries are de-duplicated by prompt hash (a repeated prompt updates its length to the
running mean) and the oldest are evicted in batches when the index is full.
"""
from __future__ import annotations

import numpy as np


class KnnIndex:
    def __init__(self, dim: int, max_entries: int = 1_000_000, exact_limit: int = 100_000,
                 nlist: int = 1024, nprobe: int = 16):
        self.dim = dim
        self.max_entries = max_entries
        self.exact_limit = exact_limit
        self.nlist, self.nprobe = nlist, nprobe
        self.vectors = np.zeros((0, dim), dtype=np.float16)
        self.log_lengths = np.zeros(0, dtype=np.float32)
        self.counts = np.zeros(0, dtype=np.float32)
        self.keys: list[str] = []
        self._pos: dict[str, int] = {}
        self._faiss = None

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, vecs: np.ndarray, lengths, keys: list[str]) -> None:
        fresh: dict[str, int] = {}                 # key -> row in this batch
        for row, (n, k) in enumerate(zip(lengths, keys)):
            if k in self._pos:                    # seen before: running mean of its log length
                i = self._pos[k]
                self.counts[i] += 1
                self.log_lengths[i] += (np.log(n) - self.log_lengths[i]) / self.counts[i]
            else:
                fresh.setdefault(k, row)
        if fresh:
            rows = list(fresh.values())
            start = len(self.keys)
            self.vectors = np.concatenate([self.vectors, np.asarray(vecs, dtype=np.float16)[rows]])
            self.log_lengths = np.concatenate([self.log_lengths, np.log(np.asarray(lengths, np.float32)[rows])])
            self.counts = np.concatenate([self.counts, np.ones(len(rows), dtype=np.float32)])
            self.keys += list(fresh)
            self._pos.update({k: start + j for j, k in enumerate(fresh)})
            self._evict()
        self._faiss = None                        # rebuilt lazily on the next search

    def _evict(self) -> None:
        if len(self.keys) <= self.max_entries:
            return
        drop = len(self.keys) - int(self.max_entries * 0.9)   # evict in batches, oldest first
        self.vectors, self.log_lengths, self.counts = self.vectors[drop:], self.log_lengths[drop:], self.counts[drop:]
        self.keys = self.keys[drop:]
        self._pos = {k: i for i, k in enumerate(self.keys)}

    def _index(self):
        import faiss

        if self._faiss is None:
            if len(self) <= self.exact_limit:
                index = faiss.IndexFlatIP(self.dim)
            else:
                index = faiss.index_factory(self.dim, f"IVF{self.nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
                rng = np.random.default_rng(0)
                sample = self.vectors[rng.choice(len(self), min(len(self), 64 * self.nlist), replace=False)]
                index.train(sample.astype(np.float32))
                index.nprobe = self.nprobe
            for start in range(0, len(self), 100_000):          # fp16 -> fp32 a chunk at a time
                index.add(self.vectors[start:start + 100_000].astype(np.float32))
            self._faiss = index
        return self._faiss

    def search(self, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities [n, k], log lengths [n, k]); missing neighbours have similarity -inf."""
        if len(self) == 0:
            return np.full((len(vecs), k), -np.inf, np.float32), np.zeros((len(vecs), k), np.float32)
        sims, ids = self._index().search(vecs, min(k, len(self)))
        if sims.shape[1] < k:
            pad = k - sims.shape[1]
            sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        sims = np.where(ids >= 0, sims, -np.inf)
        return sims.astype(np.float32), self.log_lengths[np.maximum(ids, 0)]

    def state(self) -> dict:
        return {"vectors": self.vectors, "log_lengths": self.log_lengths,
                "counts": self.counts, "keys": np.asarray(self.keys)}

    def load_state(self, s: dict) -> None:
        self.vectors = s["vectors"].astype(np.float16)
        self.log_lengths, self.counts = s["log_lengths"].astype(np.float32), s["counts"].astype(np.float32)
        self.keys = [str(k) for k in s["keys"]]
        if not (len(self.vectors) == len(self.log_lengths) == len(self.counts) == len(self.keys)):
            raise ValueError("index arrays disagree in length")
        self._pos = {k: i for i, k in enumerate(self.keys)}
        self._faiss = None
