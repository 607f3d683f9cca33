"""Any causal LM that our Llama-family runner does not cover, through transformers' own forward.

Slow but correct: each sequence keeps a transformers KV cache and chunks run one sequence at a time.
The BlockManager still accounts for KV blocks (so admission and preemption behave the same), but the
bytes live in those per-sequence caches: "swapping" a sequence keeps its cache where it is, and a
recompute (a chunk starting at position 0) starts a fresh one.
"""
from __future__ import annotations

import logging

import torch

from services.worker.model_runner import SeqChunk

log = logging.getLogger("alise.worker.fallback")


class NoPoolCache:
    """Stands in for PagedKVCache: block copies are no-ops because the fallback keeps KV per sequence."""

    def __init__(self, block_size: int, num_blocks: int):
        self.block_size = block_size
        self.scratch_block = num_blocks

    def copy_out(self, mapping) -> None:
        pass

    def copy_in(self, mapping) -> None:
        pass


class FallbackRunner:
    def __init__(self, hf_model, block_size: int, num_blocks: int):
        self.hf = hf_model
        self.device = next(hf_model.parameters()).device
        self.inputs_ready = None        # its steps are not timed on the device (ModelRunner.inputs_ready)
        self.cache = NoPoolCache(block_size, num_blocks)
        self.graphs = None
        self._caches: dict[str, object] = {}
        log.warning("model_type %r runs on the transformers fallback: correct, but slow (no paged KV, no batching)",
                    hf_model.config.model_type)

    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk], prev_sampled: torch.Tensor | None = None, probe=None) -> torch.Tensor:
        """`prev_sampled` is never needed: this runner's engine does not overlap steps; `probe` never comes: the
        factory gives a fallback engine no length probe."""
        from transformers import DynamicCache

        logits = []
        for c in chunks:
            if c.start == 0 or c.seq_id not in self._caches:
                self._caches[c.seq_id] = DynamicCache()
            out = self.hf(input_ids=torch.tensor([c.token_ids], device=self.device),
                          past_key_values=self._caches[c.seq_id], use_cache=True)
            if c.wants_logits:
                logits.append(out.logits[0, -1].float())
        if not logits:
            return torch.empty(0, self.hf.config.vocab_size, device=self.device)
        return torch.stack(logits)

    def release(self, seq_id: str) -> None:
        self._caches.pop(seq_id, None)
