"""A static prompt encoder distilled from MiniLM: one learned vector and one weight per token, no transformer.

MiniLM costs about 5 GFLOP per 256-token prompt: on 2 CPU cores that is 40-400 prompts/s, far from the
1,000/s a busy scheduler needs. Here a prompt's embedding is the weighted mean of per-token vectors, so
encoding is tokenization plus a table lookup (thousands of long prompts/s), and a prompt can be read far
further (512 tokens) than a transformer can afford.

The table starts as a distillation of MiniLM (`distill`: each vocabulary token's MiniLM embedding, as
model2vec does) and is then fine-tuned to rank prompts by output length (finetune.py `finetune_static`).
Files in a directory: `static_encoder.npz` (vectors, weights, max_tokens) and the WordPiece tokenizer.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from services.predictor.encoder import EmbeddingCache, minilm_path, weights_fingerprint

log = logging.getLogger("alise.predictor.static")
FILE = "static_encoder.npz"
CHARS_PER_TOKEN_CAP = 8       # texts are cut to max_tokens * this many chars before tokenizing (speed)


class StaticModel(torch.nn.Module):
    """Weighted bag of token vectors; the trainable form of the encoder."""

    def __init__(self, vectors: torch.Tensor, weights: torch.Tensor):
        super().__init__()
        self.vectors = torch.nn.Parameter(vectors.clone())
        self.raw_weights = torch.nn.Parameter(weights.clone())     # softplus -> positive token weights

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """ids: all prompts' token ids concatenated; offsets: where each prompt starts. Unit vectors [n, d]."""
        w = F.softplus(self.raw_weights[ids])
        summed = F.embedding_bag(ids, self.vectors, offsets, mode="sum", per_sample_weights=w)
        return F.normalize(summed, dim=-1)


class StaticEncoder:
    def __init__(self, model_dir: str | Path, max_tokens: int | None = None, cache_size: int = 10_000):
        from transformers import AutoTokenizer

        with np.load(Path(model_dir) / FILE) as z:
            # computed in float32 from the stored table, half precision (save_static) or float32 (saved by an older
            # version): kept exact, and saved again in the same precision (save), so the fingerprint a trained
            # predictor's index was built with stays the same
            self.stored_dtype = z["vectors"].dtype
            vectors = torch.from_numpy(z["vectors"].astype(np.float32))
            weights = torch.from_numpy(z["weights"].astype(np.float32))
            self.max_tokens = int(max_tokens or z["max_tokens"])
        self.model = StaticModel(vectors, weights).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.dim = vectors.shape[1]
        self._cache = EmbeddingCache(cache_size)

    def bag(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        cap = self.max_tokens * CHARS_PER_TOKEN_CAP
        enc = self.tokenizer([t[:cap] for t in texts], add_special_tokens=False, truncation=True,
                             max_length=self.max_tokens)["input_ids"]
        enc = [x or [self.tokenizer.unk_token_id] for x in enc]
        offsets = torch.tensor(np.cumsum([0] + [len(x) for x in enc[:-1]]), dtype=torch.long)
        return torch.tensor([t for x in enc for t in x], dtype=torch.long), offsets

    @property
    def fingerprint(self) -> str:
        return weights_fingerprint("static", self.model.vectors.detach()[:1000].numpy())

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> np.ndarray:
        return self.model(*self.bag(texts)).numpy()

    def encode(self, texts: list[str], batch_size: int = 1024) -> np.ndarray:
        return self._cache.encode(texts, lambda missing: np.concatenate(
            [self._embed(missing[i:i + batch_size]) for i in range(0, len(missing), batch_size)]), self.dim)

    def save(self, model_dir: str | Path) -> None:
        save_static(model_dir, self.model, self.tokenizer, self.max_tokens, self.stored_dtype)


def save_static(model_dir: str | Path, model: StaticModel, tokenizer, max_tokens: int,
                vectors_dtype=np.float16) -> None:
    """A new table (distilled, fine-tuned) is stored in half precision: half the size on disk and in the
    predictor's image (23 MB, not 47, for MiniLM's 30k-token vocabulary); the rounding (< 1e-3 relative) is far
    below what ranking can notice. Whoever embeds with it afterwards must load it from here (train.py does)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    np.savez(model_dir / FILE, vectors=model.vectors.detach().numpy().astype(vectors_dtype),
             weights=model.raw_weights.detach().numpy().astype(np.float32), max_tokens=np.int64(max_tokens))
    tokenizer.save_pretrained(str(model_dir))


def is_static(model_dir: str | Path) -> bool:
    return (Path(model_dir) / FILE).exists()


# -- distillation from MiniLM ---------------------------------------------------------------------------
@torch.no_grad()
def token_vectors(teacher, tokenizer, batch: int = 1024) -> torch.Tensor:
    """MiniLM's embedding of every vocabulary token on its own ([CLS] token [SEP], mean-pooled)."""
    vocab = tokenizer.vocab_size
    out = torch.empty(vocab, teacher.get_embedding_dimension())
    for start in range(0, vocab, batch):
        ids = torch.arange(start, min(start + batch, vocab))[:, None]
        cls = torch.full_like(ids, tokenizer.cls_token_id)
        sep = torch.full_like(ids, tokenizer.sep_token_id)
        feats = {"input_ids": torch.cat([cls, ids, sep], 1), "attention_mask": torch.ones(len(ids), 3, dtype=torch.long)}
        out[start:start + len(ids)] = teacher(feats)["sentence_embedding"]
    return out


def distill() -> tuple[StaticModel, object]:
    """The untrained static model: MiniLM's vector for every vocabulary token, equal token weights.
    (Also fitting the table to MiniLM's sentence embeddings of training prompts was tried: it lowered
    Kendall's tau on alpaca_5000 from 0.480 to 0.456, so the ranking fine-tune starts from here.)"""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    teacher = SentenceTransformer(minilm_path(), device="cpu")
    vectors = token_vectors(teacher, teacher.tokenizer)
    return StaticModel(vectors, torch.zeros(teacher.tokenizer.vocab_size)), teacher.tokenizer


def base_static_dir(max_tokens: int = 512) -> Path:
    """The distilled, not yet fine-tuned static encoder, built once (about 15 s on 2 cores) and cached.
    Built in a private directory and renamed into place, so concurrent starters never read half a file."""
    from services.common.model_paths import cache_root

    out = cache_root() / "static-minilm"
    if not is_static(out):
        log.info("distilling MiniLM into a static encoder at %s", out)
        model, tokenizer = distill()
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        save_static(tmp, model, tokenizer, max_tokens)
        if not is_static(out):
            shutil.rmtree(out, ignore_errors=True)      # a stale, incomplete one
        try:
            tmp.rename(out)
        except OSError:                                 # another process got there first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return out


class StaticEncoderView(StaticEncoder):
    """A StaticEncoder over an in-memory model (while fine-tuning it)."""

    def __init__(self, model: StaticModel, tokenizer, max_tokens: int):
        self.model, self.tokenizer, self.max_tokens = model, tokenizer, max_tokens
        self.dim = model.vectors.shape[1]
        self._cache = EmbeddingCache(0)
