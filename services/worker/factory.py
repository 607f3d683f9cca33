"""Build an Engine from a WorkerConfig: model, tokenizer, KV pools sized to the device, CUDA graphs."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

# Set before CUDA starts: growing segments instead of fixed ones, so step shapes that vary every step are less
# likely to fragment the little activation memory left beside the KV pool into an out-of-memory error (a
# guard, not a measured speed-up: the issue-9 runs had it on throughout).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from services.worker.block_manager import BlockManager
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.kernel_watch import watch_after_warm_up
from services.worker.kv_cache import PagedKVCache
from services.worker.length_probe import LengthProbe
from services.worker.model_runner import SUPPORTED_MODEL_TYPES, ModelRunner, SeqChunk, load_hf_model
from services.worker.sampler import sample
from services.worker.sequence import Sampling

log = logging.getLogger("alise.worker")
# A CPU step's throughput rises up to 32-48 sequences and falls past them (bench/cpu_engine_speed.py --batches,
# docs/BENCHMARKS.md): 48 is the worker's ceiling, and the scheduler's knee admission (worker_speed.knee) places
# fewer where its fit of this worker's steps says they would buy nothing. The pool holds 48 chats of ~330 tokens.
CPU_DEFAULT_BLOCKS = 1024
CPU_BATCH, CPU_TOKEN_BUDGET, GPU_TOKEN_BUDGET = 48, 512, 4096
GPU_MAX_BATCH = 512                   # more buys little: past it a step is bound by reading the KV, not weights
TOKENS_PER_SEQUENCE = 1024            # KV room reckoned per running sequence when sizing the batch
GPU_ACTIVATION_RESERVE = 2 << 30      # bytes kept free for activations, logits and graph pools


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    sources = [model.generation_config.eos_token_id, model.config.eos_token_id]
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    for source in sources:
        if source is not None:
            ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids


def kv_block_count(cfg: WorkerConfig, device: torch.device, bytes_per_block: int) -> int:
    if cfg.num_blocks:
        return cfg.num_blocks
    if device.type != "cuda":
        return CPU_DEFAULT_BLOCKS
    free, total = torch.cuda.mem_get_info(device)
    budget = total * cfg.gpu_memory_utilization - (total - free) - GPU_ACTIVATION_RESERVE
    if budget < bytes_per_block * 16:
        raise RuntimeError(f"not enough GPU memory for a KV pool: {budget / 2**30:.1f} GiB left after weights")
    return int(budget // bytes_per_block)


def batch_limits(cfg: WorkerConfig, device: torch.device, kv_tokens: int) -> tuple[int, int]:
    """(max sequences, max tokens) per step. On a GPU the batch grows with the KV room: the decode step's cost
    is mostly reading the weights once, so throughput rises with the batch until the KV reads dominate
    (docs/BENCHMARKS.md, the max-batch curve), as long as the running sequences' KV fits."""
    if device.type != "cuda":
        return cfg.max_batch or CPU_BATCH, cfg.token_budget or CPU_TOKEN_BUDGET
    auto = max(16, min(GPU_MAX_BATCH, kv_tokens // TOKENS_PER_SEQUENCE // 16 * 16))
    return cfg.max_batch or auto, cfg.token_budget or GPU_TOKEN_BUDGET


def build_engine(cfg: WorkerConfig, model=None, tokenizer=None) -> Engine:
    """`model` / `tokenizer` may be given (benchmarks build random-weight models from a config)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    if model is None:
        from transformers import AutoTokenizer

        model = load_hf_model(cfg.model_dir, dtype, device, random_weights=cfg.random_weights)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
    mc = model.config
    if mc.model_type not in SUPPORTED_MODEL_TYPES:
        return _fallback_engine(cfg, model, tokenizer)
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    shape = dict(num_layers=mc.num_hidden_layers, block_size=cfg.block_size, num_kv_heads=mc.num_key_value_heads,
                 head_dim=head_dim)
    num_blocks = kv_block_count(cfg, device, PagedKVCache.bytes_per_block(**shape, dtype=dtype))
    cache = PagedKVCache(**shape, num_blocks=num_blocks, num_host_blocks=cfg.num_host_blocks, dtype=dtype,
                         device=device)
    max_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings,
                  num_blocks * cfg.block_size)
    blocks = BlockManager(num_blocks, cfg.block_size, cfg.num_host_blocks, cfg.prefix_caching)
    runner = ModelRunner(model, cache, blocks.rows)
    max_batch, token_budget = batch_limits(cfg, device, num_blocks * cfg.block_size)
    if device.type == "cuda" and not cfg.enforce_eager:
        from services.worker.cuda_graphs import DecodeGraphs

        # early jobs ride beside the batch
        runner.graphs = DecodeGraphs(runner, max_batch + cfg.early_rows, max_len, timed_buckets=cfg.timed_graph_buckets)
        runner.graphs.capture()
    log.info("engine: %s on %s/%s, KV pool %d blocks x %d tokens, max_model_len %d, batch %d seqs / %d tokens",
             mc.model_type, cfg.device, cfg.dtype, num_blocks, cfg.block_size, max_len, max_batch, token_budget)
    engine = Engine(runner, blocks, tokenizer,
                    eos_ids=eos_token_ids(model, tokenizer), max_batch=max_batch,
                    token_budget=token_budget, max_model_len=max_len,
                    overlap=cfg.overlap_steps and device.type == "cuda", probe=length_probe(cfg, mc, device, dtype),
                    early_rows=cfg.early_rows, group_prefix_rows=cfg.group_prefix_rows)
    if device.type == "cuda":
        warm_up(engine)
    return engine


def length_probe(cfg: WorkerConfig, mc, device: torch.device, dtype: torch.dtype) -> LengthProbe | None:
    if cfg.length_probe_layer == -2:
        return None
    layer = mc.num_hidden_layers // 2 if cfg.length_probe_layer == -1 else cfg.length_probe_layer
    if layer >= mc.num_hidden_layers:
        raise ValueError(f"length_probe_layer {layer}: the model has {mc.num_hidden_layers} layers")
    return LengthProbe(mc.hidden_size, layer, device, dtype, read_only=cfg.length_probe_read_only,
                       path=Path(cfg.length_probe_path) if cfg.length_probe_path else None, model=probe_model_key(cfg, mc))


def probe_model_key(cfg: WorkerConfig, mc) -> str:
    """What a saved length probe must have been learned on: the checkpoint (its directory's name), its shape and
    vocabulary; random weights are another model each time."""
    weights = "random" if cfg.random_weights else Path(cfg.model_dir).name
    return f"{weights}/{mc.model_type}/{mc.num_hidden_layers}x{mc.hidden_size}/{mc.vocab_size}"


def warm_up(engine: Engine) -> None:
    """Run the kinds of mixed step a worker meets before it takes jobs, so Triton's kernel variants compile,
    cuBLAS picks its algorithms and the caching allocator reserves the peak activation memory now. Before
    this, the first requests after a start ran about half as fast per token as later ones."""
    started = time.perf_counter()
    runner, blocks = engine.runner, engine.blocks
    budget = min(engine.sched.token_budget, engine.max_model_len)
    decodes = min(engine.sched.max_batch, max(1, budget // 4))
    shapes = [[(0, budget)],                                       # one long prompt chunk
              [(0, 48)] * max(1, (budget - decodes) // 48) + [(32, 1)] * decodes,   # short prompts + decodes
              [(min(128, budget // 2), budget // 2)] + [(32, 1)] * min(decodes, budget // 2)]  # a later chunk
    for shape in shapes:
        ids = [f"warm-up-{i}" for i in range(len(shape))]
        needed = sum(blocks.extra_blocks("", start + n) for start, n in shape)
        if needed > blocks.num_free:
            continue
        for i, (start, n) in zip(ids, shape):
            blocks.grow(i, start + n)
        chunks = [SeqChunk([1] * n, start, blocks.rows.row(i), True, i) for i, (start, n) in zip(ids, shape)]
        with torch.inference_mode():
            logits = runner.forward(chunks)
            sample(logits, [Sampling(), Sampling(temperature=0.8, top_p=0.9, top_k=20)] * (len(chunks) // 2)
                   + [Sampling()] * (len(chunks) % 2), list(range(len(chunks))))
        for i in ids:
            blocks.free(i)
    torch.cuda.synchronize()
    log.info("warm-up steps ran in %.1f s", time.perf_counter() - started)
    if not watch_after_warm_up():
        log.info("this Triton has no post-compile hook: kernel variants met while serving are not logged")


def _fallback_engine(cfg: WorkerConfig, model, tokenizer) -> Engine:
    """Other architectures: transformers' forward, slowly but correctly (fallback_runner.py)."""
    from services.worker.fallback_runner import FallbackRunner

    num_blocks = cfg.num_blocks or CPU_DEFAULT_BLOCKS
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
    max_len = min(cfg.max_model_len or max_positions, max_positions, num_blocks * cfg.block_size)
    return Engine(FallbackRunner(model, cfg.block_size, num_blocks),
                  BlockManager(num_blocks, cfg.block_size, cfg.num_host_blocks), tokenizer,
                  eos_ids=eos_token_ids(model, tokenizer), max_batch=cfg.max_batch or CPU_BATCH,
                  token_budget=cfg.token_budget or CPU_TOKEN_BUDGET, max_model_len=max_len, early_rows=cfg.early_rows,
                  group_prefix_rows=cfg.group_prefix_rows)
