"""Our own forward pass for Llama-family models over the paged KV cache.

Weights and submodules (projections, norms, MLP, rotary tables) come from the transformers model, so any
Llama / Mistral / Qwen2 checkpoint loads unchanged; the attention and the KV cache are ours. Two paths:

- `forward_mixed`: any token-centric batch (prompt chunks, recomputes, decodes together). Each sequence's
  new tokens attend to its cached context plus themselves, causally, straight from the pool: one paged
  prefill launch for all multi-token chunks, one paged decode launch for the single tokens.
- `forward_decode`: one new token per sequence, attention by the paged decode kernel straight from the
  pool. Static shapes, no host syncs: this is what CUDA graphs capture (cuda_graphs.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from services.worker.attention import paged_decode, paged_decode_counts, paged_decode_rope
from services.worker.device_tables import DeviceTables
from services.worker.fused_ops import fused_kernels_on, rmsnorm, rope_, rope_and_cache_, silu_mul
from services.worker.host_copy import to_device
from services.worker.kv_cache import PagedKVCache
from services.worker.length_probe import LengthProbe
from services.worker.prefill_attention import PrefillChunks, paged_prefill, plan_tiles
from services.worker import pdl, skinny_gemm
from services.worker.skinny_gemm import Epilogue, skinny_counts, skinny_gemm_fits, skinny_gemm_on, skinny_linear
from services.worker.table_rows import TableRows

log = logging.getLogger("alise.worker.runner")
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}


@dataclass
class SeqChunk:
    """One sequence's share of a step: compute tokens [start, start + len(token_ids))."""
    token_ids: list[int]
    start: int
    table_row: int              # its block table's row in the runner's TableRows (table_rows.py)
    wants_logits: bool          # the chunk reaches the end of the sequence: sample a next token
    seq_id: str = ""            # only the transformers fallback runner needs it (its caches are per sequence)
    prev_row: int = -1          # >= 0: a decode whose token is still on the device, row of the last step's ids
    probe: bool = False         # it completes a fresh prompt: take the length probe's features at its last token

    @property
    def decodes(self) -> bool:
        """A decode row: one token that samples the next (a step of only these replays a CUDA graph). A prompt chunk
        the token budget cut to one token samples nothing: it runs the mixed path, as a prefill."""
        return len(self.token_ids) == 1 and self.wants_logits


@dataclass
class MixedInputs:
    input_ids: torch.Tensor     # [T] new tokens of all sequences, concatenated
    positions: torch.Tensor     # [T]
    slots: torch.Tensor         # [T] cache row for each new token's K/V
    decode_rows: torch.Tensor   # [Bd] rows of single-token sequences: paged decode attention
    block_tables: torch.Tensor  # [Bd, max_blocks] int32
    context_lens: torch.Tensor  # [Bd] int32
    prefills: PrefillChunks     # the multi-token chunks: paged prefill attention, one launch per layer
    logits_index: torch.Tensor  # [S] rows whose logits are returned
    probe_rows: torch.Tensor | None = None   # [P] rows whose hidden state the length probe reads


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
    if random_weights:
        with device:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return model.eval()


def fuse_projections(layers) -> tuple[list, list, list]:
    """One [q; k; v] and one [gate; up] weight per layer: one matmul instead of three (two).

    The original modules' weights become views into the fused tensors, so memory is not doubled and
    the transformers model still runs on exactly the same weights (the reference in checks)."""
    qkv_w, qkv_b, gate_up_w = [], [], []
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        projs = (a.q_proj, a.k_proj, a.v_proj)
        w = torch.cat([p.weight.data for p in projs])
        b = torch.cat([p.bias.data for p in projs]) if a.q_proj.bias is not None else None
        gu = torch.cat([m.gate_proj.weight.data, m.up_proj.weight.data])
        row = 0
        for p in projs:
            n = p.weight.shape[0]
            p.weight = torch.nn.Parameter(w[row:row + n], requires_grad=False)
            if b is not None:
                p.bias = torch.nn.Parameter(b[row:row + n], requires_grad=False)
            row += n
        inter = m.gate_proj.weight.shape[0]
        m.gate_proj.weight = torch.nn.Parameter(gu[:inter], requires_grad=False)
        m.up_proj.weight = torch.nn.Parameter(gu[inter:], requires_grad=False)
        qkv_w.append(w)
        qkv_b.append(b)
        gate_up_w.append(gu)
    return qkv_w, qkv_b, gate_up_w


class ModelRunner:
    def __init__(self, hf_model, cache: PagedKVCache, tables: TableRows):
        self.hf = hf_model
        self.cache = cache
        self.tables = tables        # the BlockManager's block tables (it writes them, we read)
        cfg = hf_model.config
        self.device = next(hf_model.parameters()).device
        self.inputs_ready: torch.cuda.Event | None = None   # the last step's model work began here (GPU only)
        self.device_tables = DeviceTables(tables, self.device)   # their copy on the device, for the kernels
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.block_size = cache.block_size
        self.vocab_size = cfg.vocab_size
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.layers = hf_model.model.layers
        self.eps = self.layers[0].input_layernorm.variance_epsilon
        # norm weights in order: before attention (layer 0), after attention, before the next layer / final
        self.norm_weights = [self.layers[0].input_layernorm.weight]
        for i, layer in enumerate(self.layers):
            following = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else hf_model.model.norm
            self.norm_weights += [layer.post_attention_layernorm.weight, following.weight]
        with torch.no_grad():
            self.qkv_w, self.qkv_b, self.gate_up_w = fuse_projections(self.layers)
        self.graphs = None          # a DecodeGraphs (cuda_graphs.py) when CUDA graphs are on
        self._probed: torch.Tensor | None = None    # the last forward's length-probe features (take_probed)
        # rotary embedding and the KV write in one kernel (fused_ops.rope_and_cache_): 3 fewer kernels a layer
        self.fuse_rope_cache = fused_kernels_on(self.device)
        # decode graphs: rotary, the KV write, attention and the split merge in one kernel (paged_decode_rope)
        self.fuse_decode_attention = fused_kernels_on(self.device)
        self.split_counts = paged_decode_counts(self.device) if self.fuse_decode_attention else None
        # decode batches up to this many rows run the skinny-GEMM layers (skinny_gemm.py); 0 = never
        self.skinny_rows = self._skinny_layer_rows()
        # the arrival counters of the projections whose tuned tiles split K (skinny_gemm._skinny_kernel)
        self.skinny_counts = skinny_counts(self.device) if self.skinny_rows else None
        # the skinny layers' kernels launch with programmatic dependent launch (pdl.py: 1-3% faster there)
        self.skinny_pdl = True

    def _skinny_layer_rows(self) -> int:
        """The most decode rows the skinny layers take here: as far as this device has tuned tiles for every
        projection of this model (skinny_gemm.tuned_rows), 0 if the model cannot use them."""
        if not self._skinny_eligible():
            return 0
        hidden, inter = self.hf.config.hidden_size, self.gate_up_w[0].shape[0] // 2
        shapes = [(self.q_size + 2 * self.kv_size, hidden), (hidden, self.q_size), (inter, hidden), (hidden, inter),
                  (self.vocab_size, hidden)]       # qkv, o, gate_up (its activation's width), down, lm_head: (N, K)
        return skinny_gemm.tuned_rows(torch.cuda.get_device_name(self.device), shapes)

    def _skinny_eligible(self) -> bool:
        """CUDA, bf16 / fp16 (the fp32 model that is checked against transformers keeps cuBLAS's exact fp32; tl.dot
        would use TF32), no biases (the kernels add none), inner sizes in whole tensor-core chunks."""
        if not skinny_gemm_on(self.device) or self.qkv_w[0].element_size() != 2:
            return False
        biases = [*self.qkv_b, getattr(self.hf.lm_head, "bias", None)]
        biases += [m.bias for layer in self.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
        return all(b is None for b in biases) and skinny_gemm_fits(
            self.hf.config.hidden_size, self.gate_up_w[0].shape[0] // 2, self.q_size)

    def release(self, seq_id: str) -> None:
        """A sequence left: nothing to do, its KV lives in pool blocks the BlockManager frees."""

    def take_probed(self) -> torch.Tensor | None:
        """[P, dims] length-probe features (on the device) of the last forward's chunks marked `probe`, in order."""
        out, self._probed = self._probed, None
        return out

    # -- entry point -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk], prev_sampled: torch.Tensor | None = None,
                probe: LengthProbe | None = None) -> torch.Tensor:
        """Run one step; returns fp32 logits [S, vocab] for the chunks with wants_logits, in order.

        Nothing here waits for the device: inputs go over in one pinned, non-blocking copy, and a decode
        whose token was sampled by the previous (maybe still running) step reads it from `prev_sampled`.
        With `probe` (given when some chunk is marked `probe`), that chunk's features wait in `take_probed`;
        such a step runs the mixed path even when every chunk is one token (the graph captures no probe)."""
        if probe is None and all(c.decodes for c in chunks):
            batch = self.prepare_decode(chunks, prev_sampled)
            self._inputs_are_ready()
            if self.graphs is not None and self.graphs.fits(len(chunks)):
                return self.graphs.run(batch)
            return self.forward_decode(batch)
        batch = self.prepare_mixed(chunks, prev_sampled, probe is not None)
        self._inputs_are_ready()
        return self.forward_mixed(batch, probe)

    def _inputs_are_ready(self) -> None:
        """On a GPU, a timing event where the step's inputs are queued on the device and its model work begins
        (`inputs_ready`): the host's preparation of the step lies before it, so the device's time for the step is
        measured from here (engine.Engine._time_on_device)."""
        if self.device.type == "cuda":
            self.inputs_ready = torch.cuda.Event(enable_timing=True)
            self.inputs_ready.record()

    # -- batch preparation (host side, numpy; one transfer per step) -------------------------------
    def _rows(self, chunks: list[SeqChunk]) -> np.ndarray:
        return np.fromiter((c.table_row for c in chunks), np.int64, len(chunks))

    def _width(self, rows: np.ndarray) -> int:
        """The step's block-table width. On a GPU it is rounded up to 16 (one Triton variant for every width);
        on CPU the attention gathers the whole width, so it stays exact."""
        return self.tables.width(rows, 16 if self.device.type == "cuda" else 1)

    def _input_ids(self, host_ids: torch.Tensor, prev_rows: torch.Tensor, prev_sampled: torch.Tensor | None):
        if prev_sampled is None or prev_sampled.numel() == 0:     # no decode can refer to it
            return host_ids
        return torch.where(prev_rows >= 0, prev_sampled[prev_rows.clamp(min=0)], host_ids)

    def prepare_decode(self, chunks: list[SeqChunk], prev_sampled: torch.Tensor | None = None) -> DecodeInputs:
        n, bs = len(chunks), self.block_size
        rows = self._rows(chunks)
        pos = np.fromiter((c.start for c in chunks), np.int64, n)
        ids = np.fromiter((c.token_ids[0] for c in chunks), np.int64, n)
        prev = np.fromiter((c.prev_row for c in chunks), np.int64, n)
        slots = self.tables.blocks[rows, pos // bs] * bs + pos % bs
        ids_t, prev_t, pos_t, slots_t, lens_t, rows_t, *changes = to_device(
            self.device, ids, prev, pos, slots, pos + 1, rows, *self.device_tables.changes())
        self.device_tables.apply(*changes)
        return DecodeInputs(input_ids=self._input_ids(ids_t, prev_t, prev_sampled), positions=pos_t, slots=slots_t,
                            block_tables=self.device_tables.gather(rows_t, self._width(rows)),
                            context_lens=lens_t.to(torch.int32))

    def prepare_mixed(self, chunks: list[SeqChunk], prev_sampled: torch.Tensor | None = None,
                      probe: bool = False) -> MixedInputs:
        bs = self.block_size
        sizes = np.fromiter((len(c.token_ids) for c in chunks), np.int64, len(chunks))
        starts = np.fromiter((c.start for c in chunks), np.int64, len(chunks))
        rows_end = np.cumsum(sizes)
        rows_start = rows_end - sizes
        total = int(rows_end[-1])
        # per token: its sequence, position and (through the sequence's block table) cache slot
        owner = np.repeat(np.arange(len(chunks)), sizes)
        pos = starts[owner] + np.arange(total) - rows_start[owner]
        table_rows = self._rows(chunks)
        slots = self.tables.blocks[table_rows[owner], pos // bs] * bs + pos % bs
        ids = np.fromiter(chain.from_iterable(c.token_ids for c in chunks), np.int64, total)
        prev = np.full(total, -1, np.int64)
        decode = np.flatnonzero(sizes == 1)
        prev[rows_start[decode]] = np.fromiter((chunks[i].prev_row for i in decode), np.int64, len(decode))
        logit_rows = rows_end[np.fromiter((c.wants_logits for c in chunks), bool, len(chunks))] - 1
        probe_rows = rows_end[np.fromiter((c.probe for c in chunks), bool, len(chunks))] - 1 if probe else ()
        multi = np.flatnonzero(sizes > 1)
        tile_chunk, tile_q = plan_tiles(sizes[multi])
        (ids_t, prev_t, pos_t, slots_t, dec_rows, dec_lens, logit_t, probe_t, q_start, q_len, ctx_start, tile_chunk_t,
         tile_q_t, dec_table_rows, multi_table_rows, *changes) = to_device(
            self.device, ids, prev, pos, slots, rows_start[decode], starts[decode] + 1, logit_rows,
            np.asarray(probe_rows, np.int64), rows_start[multi], sizes[multi], starts[multi], tile_chunk, tile_q,
            table_rows[decode], table_rows[multi], *self.device_tables.changes())
        self.device_tables.apply(*changes)
        width = self._width(table_rows)
        prefills = PrefillChunks(q_start, q_len, ctx_start, self.device_tables.gather(multi_table_rows, width),
                                 tile_chunk_t, tile_q_t)
        return MixedInputs(
            input_ids=self._input_ids(ids_t, prev_t, prev_sampled), positions=pos_t, slots=slots_t,
            decode_rows=dec_rows, block_tables=self.device_tables.gather(dec_table_rows, width),
            context_lens=dec_lens.to(torch.int32), prefills=prefills, logits_index=logit_t,
            probe_rows=probe_t if len(probe_rows) else None)

    # -- forward passes --------------------------------------------------------------------------
    def _embed(self, input_ids, positions):
        core = self.hf.model
        h = core.embed_tokens(input_ids)
        cos, sin = core.rotary_emb(h[None], positions[None])
        return h, cos[0], sin[0]                                    # cos / sin: [T, head_dim]

    def _rotate_and_cache(self, i: int, qkv, cos, sin, slots):
        """Layer i's q, k, v from its qkv projection, q and k rotated; k and v also written to the cache at `slots`."""
        t = qkv.shape[0]
        q = qkv[:, :self.q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        if self.fuse_rope_cache:
            rope_and_cache_(qkv, self.num_heads, self.num_kv_heads, self.head_dim, cos, sin, self.cache.k[i],
                            self.cache.v[i], slots)
            return q, k, v
        q, k = rope_(q, cos, sin), rope_(k, cos, sin)
        self.cache.write(i, slots, k, v)
        return q, k, v

    def _logits(self, x):
        return self.hf.lm_head(x).float()

    def _layers(self, h, attend, probe_rows: torch.Tensor | None = None,
                probe: LengthProbe | None = None) -> torch.Tensor:
        """All decoder layers; returns the final-normed hidden states. attend(i, qkv): layer i's attention
        output from its qkv projection (rotary and the KV write are its business). The residual add is fused into
        the next norm: x = norm(residual + sublayer output). With probe_rows, the length probe's features of
        those rows are taken from the normalised state after its layer."""
        w = self.norm_weights
        x, residual = rmsnorm(h, w[0], self.eps)
        residual = h
        for i, layer in enumerate(self.layers):
            qkv = F.linear(x, self.qkv_w[i], self.qkv_b[i])
            attn_out = layer.self_attn.o_proj(attend(i, qkv).reshape(h.shape[0], -1))
            x, residual = rmsnorm(attn_out, w[2 * i + 1], self.eps, residual)
            mlp_out = layer.mlp.down_proj(silu_mul(F.linear(x, self.gate_up_w[i])))
            x, residual = rmsnorm(mlp_out, w[2 * i + 2], self.eps, residual)
            if probe_rows is not None and i == probe.layer:
                self._probed = probe.project(x[probe_rows])
        return x

    def _layers_skinny(self, h, attend) -> torch.Tensor:
        """_layers then the logits, for a few rows: one kernel per projection, the residual adds and SiLU fused into
        them (skinny_gemm.py), and, up to skinny_gemm.MAX_ROWS rows, the norms too (each projection normalises its
        input from the rows' sums of squares that the previous projection's epilogue accumulated); past it, the
        norms are kernels of their own. sumsq[0] / [1]: rows' sums of squares of the residual stream after
        attention / after the MLP; each is zeroed by the projection before the one that accumulates into it."""
        w, eps, counts = self.norm_weights, self.eps, self.skinny_counts
        sumsq = torch.empty(2, h.shape[0], dtype=torch.float32, device=h.device)
        prologue = h.shape[0] <= skinny_gemm.MAX_ROWS

        def normed(x, j: int, sums: torch.Tensor):
            """A projection's input and prologue arguments for norm j of stream x (whose sums of squares are sums)."""
            if prologue:
                return x, dict(sumsq_in=sums, norm_w=w[j], eps=eps)
            return rmsnorm(x, w[j], eps)[0], {}

        residual = h
        for i, layer in enumerate(self.layers):
            x, norm = (rmsnorm(h, w[0], eps)[0], {}) if i == 0 else normed(residual, 2 * i, sumsq[1])
            qkv = skinny_linear(x, self.qkv_w[i], **norm, zero=sumsq[0], counts=counts)
            residual = skinny_linear(attend(i, qkv).reshape(h.shape[0], -1), layer.self_attn.o_proj.weight,
                                     epilogue=Epilogue.RESIDUAL, residual=residual, sumsq_out=sumsq[0], counts=counts)
            x, norm = normed(residual, 2 * i + 1, sumsq[0])
            act = skinny_linear(x, self.gate_up_w[i], epilogue=Epilogue.SILU_MUL, **norm, zero=sumsq[1], counts=counts)
            residual = skinny_linear(act, layer.mlp.down_proj.weight, epilogue=Epilogue.RESIDUAL, residual=residual,
                                     sumsq_out=sumsq[1], counts=counts)
        x, norm = normed(residual, -1, sumsq[1])
        return skinny_linear(x, self.hf.lm_head.weight, **norm, out_dtype=torch.float32)

    def forward_mixed(self, batch: MixedInputs, probe: LengthProbe | None = None) -> torch.Tensor:
        h, cos, sin = self._embed(batch.input_ids, batch.positions)
        # cuDNN's attention builds a plan for every new sequence length it meets (tens of ms each): the first
        # pass over a real mix of prompt lengths ran half as fast as later ones. Flash / memory-efficient
        # kernels need no plan.
        def attend(i, qkv):
            return self._attend_mixed(i, *self._rotate_and_cache(i, qkv, cos, sin, batch.slots), batch)

        with sdpa_kernel(PREFILL_BACKENDS):
            h = self._layers(h, attend, batch.probe_rows, probe)
        if batch.logits_index.numel() == 0:
            return torch.empty(0, self.vocab_size, device=self.device)
        return self._logits(h[batch.logits_index])

    def _attend_mixed(self, layer_idx, q, k, v, batch: MixedInputs) -> torch.Tensor:
        out = torch.empty_like(q)
        if batch.decode_rows.numel():
            out[batch.decode_rows] = paged_decode(q[batch.decode_rows], self.cache.k[layer_idx], self.cache.v[layer_idx],
                                                  batch.block_tables, batch.context_lens, self.block_size, self.scale)
        return paged_prefill(q, self.cache.k[layer_idx], self.cache.v[layer_idx], batch.prefills, self.block_size,
                             self.scale, out)

    def forward_decode(self, batch: DecodeInputs) -> torch.Tensor:
        """One token per sequence, no host syncs: the function CUDA graphs capture."""
        h, cos, sin = self._embed(batch.input_ids, batch.positions)

        def attend(i, qkv):
            if self.fuse_decode_attention:
                return paged_decode_rope(qkv, self.num_heads, cos, sin, batch.slots, self.cache.k[i], self.cache.v[i],
                                         batch.block_tables, batch.context_lens, self.block_size, self.scale,
                                         self.split_counts)
            q, _, _ = self._rotate_and_cache(i, qkv, cos, sin, batch.slots)
            return paged_decode(q, self.cache.k[i], self.cache.v[i], batch.block_tables, batch.context_lens,
                                self.block_size, self.scale)

        if h.shape[0] <= self.skinny_rows:
            with pdl.forced(self.skinny_pdl):
                return self._layers_skinny(h, attend)
        return self._logits(self._layers(h, attend))
