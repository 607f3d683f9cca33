"""Our own forward pass for Llama-family models over the paged KV cache.

Weights and submodules (projections, norms, MLP, rotary tables) come from the transformers model, so any
Llama / Mistral / Qwen2 checkpoint loads unchanged; the attention and the KV cache are ours. One forward
runs a token-centric batch: each sequence contributes a chunk of new tokens (a prompt chunk, a recompute,
or one decode token) that attends to its cached context plus itself, causally.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.worker.kv_cache import PagedKVCache

log = logging.getLogger("alise.worker.runner")
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}


@dataclass
class SeqChunk:
    """One sequence's share of a step: compute tokens [start, start + len(token_ids))."""
    token_ids: list[int]
    start: int
    block_table: list[int]
    wants_logits: bool          # the chunk reaches the end of the sequence: sample a next token


@dataclass
class BatchInputs:
    input_ids: torch.Tensor     # [T] new tokens of all sequences, concatenated
    positions: torch.Tensor     # [T]
    slots: torch.Tensor         # [T] cache row for each new token's K/V
    query_index: torch.Tensor   # [B, Nmax] row of each (seq, query) in the flat batch; padding -> 0
    query_valid: torch.Tensor   # [B, Nmax]
    key_slots: torch.Tensor     # [B, Lmax] cache rows of each sequence's context; padding -> 0
    attn_mask: torch.Tensor     # [B, 1, Nmax, Lmax] True = may attend
    logits_index: torch.Tensor  # [S] rows whose logits are returned


def load_hf_model(model_dir: str, dtype: torch.dtype, device: torch.device, random_weights: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {config.model_type!r} is not supported (have {sorted(SUPPORTED_MODEL_TYPES)})")
    if random_weights:
        with device:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return model.eval()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    def __init__(self, hf_model, cache: PagedKVCache):
        self.hf = hf_model
        self.cache = cache
        cfg = hf_model.config
        self.device = next(hf_model.parameters()).device
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.block_size = cache.block_size

    # -- batch preparation (host side) -----------------------------------------------------------
    def prepare(self, chunks: list[SeqChunk]) -> BatchInputs:
        bs = self.block_size
        ids, pos, slots, logit_rows = [], [], [], []
        n_max = max(len(c.token_ids) for c in chunks)
        l_max = max(c.start + len(c.token_ids) for c in chunks)
        query_index = torch.zeros(len(chunks), n_max, dtype=torch.long)
        query_valid = torch.zeros(len(chunks), n_max, dtype=torch.bool)
        query_pos = torch.zeros(len(chunks), n_max, dtype=torch.long)
        key_slots = torch.zeros(len(chunks), l_max, dtype=torch.long)
        ctx_len = torch.zeros(len(chunks), 1, dtype=torch.long)
        for b, c in enumerate(chunks):
            n, end = len(c.token_ids), c.start + len(c.token_ids)
            table = torch.tensor(c.block_table, dtype=torch.long)
            ctx = torch.arange(end)
            row_slots = table[ctx // bs] * bs + ctx % bs
            key_slots[b, :end] = row_slots
            ctx_len[b, 0] = end
            query_index[b, :n] = torch.arange(len(ids), len(ids) + n)
            query_valid[b, :n] = True
            query_pos[b, :n] = torch.arange(c.start, end)
            ids.extend(c.token_ids)
            pos.extend(range(c.start, end))
            slots.append(row_slots[c.start:])
            if c.wants_logits:
                logit_rows.append(len(ids) - 1)
        key_pos = torch.arange(l_max)
        mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < ctx_len[:, :, None])
        dev = self.device
        return BatchInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            slots=torch.cat(slots).to(dev),
            query_index=query_index.to(dev),
            query_valid=query_valid.to(dev),
            key_slots=key_slots.to(dev),
            attn_mask=mask[:, None].to(dev),
            logits_index=torch.tensor(logit_rows, dtype=torch.long, device=dev),
        )

    # -- forward -------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Run one step; returns fp32 logits [S, vocab] for the chunks with wants_logits, in order."""
        batch = self.prepare(chunks)
        core = self.hf.model
        h = core.embed_tokens(batch.input_ids)
        cos, sin = core.rotary_emb(h[None], batch.positions[None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]          # [T, 1, head_dim]
        for layer_idx, layer in enumerate(core.layers):
            h = h + self._attention(layer_idx, layer, layer.input_layernorm(h), cos, sin, batch)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if batch.logits_index.numel() == 0:
            return torch.empty(0, self.hf.config.vocab_size)
        last = core.norm(h[batch.logits_index])
        return self.hf.lm_head(last).float()

    def _attention(self, layer_idx, layer, x, cos, sin, batch: BatchInputs) -> torch.Tensor:
        attn = layer.self_attn
        t = x.shape[0]
        q = attn.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = attn.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.cache.write(layer_idx, batch.slots, k, v)
        keys, values = self.cache.gather(layer_idx, batch.key_slots)          # [B, L, KVH, D]
        queries = q[batch.query_index]                                        # [B, N, H, D]
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=batch.attn_mask, enable_gqa=self.num_kv_heads != self.num_heads,
        )
        out = out.transpose(1, 2)[batch.query_valid]                          # [T, H, D]
        return attn.o_proj(out.reshape(t, self.num_heads * self.head_dim))
