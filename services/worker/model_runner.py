"""Our own forward pass for Llama-family models over the paged KV cache.

Weights and submodules (projections, norms, MLP, rotary tables) come from the transformers model, so any
Llama / Mistral / Qwen2 checkpoint loads unchanged; the attention and the KV cache are ours. Two paths:

- `forward_mixed`: any token-centric batch (prompt chunks, recomputes, decodes together). Each sequence's
  new tokens attend to its cached context plus themselves, causally, through a gather of its slots.
- `forward_decode`: one new token per sequence, attention by the paged decode kernel straight from the
  pool. Static shapes, no host syncs: this is what CUDA graphs capture (cuda_graphs.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.worker.attention import paged_decode
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
class MixedInputs:
    input_ids: torch.Tensor     # [T] new tokens of all sequences, concatenated
    positions: torch.Tensor     # [T]
    slots: torch.Tensor         # [T] cache row for each new token's K/V
    query_index: torch.Tensor   # [B, Nmax] row of each (seq, query) in the flat batch; padding -> 0
    query_valid: torch.Tensor   # [B, Nmax]
    key_slots: torch.Tensor     # [B, Lmax] cache rows of each sequence's context; padding -> 0
    attn_mask: torch.Tensor | None  # [B, 1, Nmax, Lmax] True = may attend; None = one fresh prompt (causal)
    logits_index: torch.Tensor  # [S] rows whose logits are returned


@dataclass
class DecodeInputs:
    input_ids: torch.Tensor     # [B]
    positions: torch.Tensor     # [B]
    slots: torch.Tensor         # [B]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32, including the new token


def load_hf_model(model_dir: str | None, dtype: torch.dtype, device: torch.device, random_weights: bool = False,
                  config=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config or AutoConfig.from_pretrained(model_dir)
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
        self.scale = self.head_dim ** -0.5
        self.block_size = cache.block_size
        self.vocab_size = cfg.vocab_size
        self.graphs = None          # a DecodeGraphs, set by enable_cuda_graphs()

    # -- entry point -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Run one step; returns fp32 logits [S, vocab] for the chunks with wants_logits, in order."""
        if self.device.type == "cuda" and all(len(c.token_ids) == 1 and c.wants_logits for c in chunks):
            if self.graphs is not None and self.graphs.fits(len(chunks)):
                return self.graphs.run(self.prepare_decode(chunks, on_device=False))
            return self.forward_decode(self.prepare_decode(chunks))
        return self.forward_mixed(self.prepare_mixed(chunks))

    # -- batch preparation (host side) -----------------------------------------------------------
    def _slots(self, table: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        return torch.tensor(table, dtype=torch.long)[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare_mixed(self, chunks: list[SeqChunk]) -> MixedInputs:
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
            row_slots = self._slots(c.block_table, 0, end)
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
        mask = None
        if len(chunks) > 1 or chunks[0].start > 0:
            key_pos = torch.arange(l_max)
            mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < ctx_len[:, :, None])
            mask = mask[:, None].to(self.device)
        dev = self.device
        return MixedInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            slots=torch.cat(slots).to(dev), query_index=query_index.to(dev), query_valid=query_valid.to(dev),
            key_slots=key_slots.to(dev), attn_mask=mask,
            logits_index=torch.tensor(logit_rows, dtype=torch.long, device=dev))

    def prepare_decode(self, chunks: list[SeqChunk], on_device: bool = True) -> DecodeInputs:
        width = max(len(c.block_table) for c in chunks)
        tables = torch.full((len(chunks), width), self.cache.scratch_block, dtype=torch.int32)
        for b, c in enumerate(chunks):
            tables[b, :len(c.block_table)] = torch.tensor(c.block_table, dtype=torch.int32)
        pos = [c.start for c in chunks]
        inputs = DecodeInputs(
            input_ids=torch.tensor([c.token_ids[0] for c in chunks], dtype=torch.long),
            positions=torch.tensor(pos, dtype=torch.long),
            slots=torch.tensor([c.block_table[p // self.block_size] * self.block_size + p % self.block_size
                                for c, p in zip(chunks, pos)], dtype=torch.long),
            block_tables=tables, context_lens=torch.tensor([p + 1 for p in pos], dtype=torch.int32))
        if on_device:
            inputs = DecodeInputs(*(t.to(self.device) for t in vars(inputs).values()))
        return inputs

    # -- forward passes --------------------------------------------------------------------------
    def _embed(self, input_ids, positions):
        core = self.hf.model
        h = core.embed_tokens(input_ids)
        cos, sin = core.rotary_emb(h[None], positions[None])
        return h, cos[0][:, None, :], sin[0][:, None, :]           # cos/sin: [T, 1, head_dim]

    def _qkv(self, layer, x, cos, sin):
        attn, t = layer.self_attn, x.shape[0]
        q = attn.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = attn.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def _logits(self, h):
        return self.hf.lm_head(self.hf.model.norm(h)).float()

    def forward_mixed(self, batch: MixedInputs) -> torch.Tensor:
        h, cos, sin = self._embed(batch.input_ids, batch.positions)
        for i, layer in enumerate(self.hf.model.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(h), cos, sin)
            self.cache.write(i, batch.slots, k, v)
            o = self._attend_mixed(i, q, k, v, batch)
            h = h + layer.self_attn.o_proj(o.reshape(h.shape[0], -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if batch.logits_index.numel() == 0:
            return torch.empty(0, self.vocab_size, device=self.device)
        return self._logits(h[batch.logits_index])

    def _attend_mixed(self, layer_idx, q, k, v, batch: MixedInputs) -> torch.Tensor:
        gqa = self.num_kv_heads != self.num_heads
        if batch.attn_mask is None:       # one fresh prompt: plain causal attention on its own K/V
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                 v.transpose(0, 1)[None], is_causal=True, enable_gqa=gqa)
            return out[0].transpose(0, 1)
        keys, values = self.cache.gather(layer_idx, batch.key_slots)          # [B, L, KVH, D]
        queries = q[batch.query_index]                                        # [B, N, H, D]
        out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys.transpose(1, 2),
                                             values.transpose(1, 2), attn_mask=batch.attn_mask, enable_gqa=gqa)
        return out.transpose(1, 2)[batch.query_valid]                         # [T, H, D]

    def forward_decode(self, batch: DecodeInputs) -> torch.Tensor:
        h, cos, sin = self._embed(batch.input_ids, batch.positions)
        for i, layer in enumerate(self.hf.model.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(h), cos, sin)
            self.cache.write(i, batch.slots, k, v)
            o = paged_decode(q, self.cache.k[i], self.cache.v[i], batch.block_tables, batch.context_lens,
                             self.block_size, self.scale)
            h = h + layer.self_attn.o_proj(o.reshape(h.shape[0], -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self._logits(h)
