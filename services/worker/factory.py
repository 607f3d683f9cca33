"""Build an Engine from a WorkerConfig: model, tokenizer, KV pools sized to the device, CUDA graphs."""
from __future__ import annotations

import logging
import os

import torch

from services.worker.block_manager import BlockManager
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.kv_cache import PagedKVCache
from services.worker.model_runner import SUPPORTED_MODEL_TYPES, ModelRunner, load_hf_model

log = logging.getLogger("alise.worker")
CPU_DEFAULT_BLOCKS = 512
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
    runner = ModelRunner(model, cache)
    if device.type == "cuda" and not cfg.enforce_eager:
        from services.worker.cuda_graphs import DecodeGraphs

        runner.graphs = DecodeGraphs(runner, cfg.max_batch, max_len)
        runner.graphs.capture()
    log.info("engine: %s on %s/%s, KV pool %d blocks x %d tokens, max_model_len %d",
             mc.model_type, cfg.device, cfg.dtype, num_blocks, cfg.block_size, max_len)
    return Engine(runner, BlockManager(num_blocks, cfg.block_size, cfg.num_host_blocks), tokenizer,
                  eos_ids=eos_token_ids(model, tokenizer), max_batch=cfg.max_batch,
                  token_budget=cfg.token_budget, max_model_len=max_len,
                  overlap=cfg.overlap_steps and device.type == "cuda")


def _fallback_engine(cfg: WorkerConfig, model, tokenizer) -> Engine:
    """Other architectures: transformers' forward, slowly but correctly (fallback_runner.py)."""
    from services.worker.fallback_runner import FallbackRunner

    num_blocks = cfg.num_blocks or CPU_DEFAULT_BLOCKS
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
    max_len = min(cfg.max_model_len or max_positions, max_positions, num_blocks * cfg.block_size)
    return Engine(FallbackRunner(model, cfg.block_size, num_blocks),
                  BlockManager(num_blocks, cfg.block_size, cfg.num_host_blocks), tokenizer,
                  eos_ids=eos_token_ids(model, tokenizer), max_batch=cfg.max_batch,
                  token_budget=cfg.token_budget, max_model_len=max_len)
