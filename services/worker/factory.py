"""Build an Engine from a WorkerConfig: model, tokenizer, KV pools, block manager."""
from __future__ import annotations

import logging
import os

import torch

from services.worker.block_manager import BlockManager
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.kv_cache import PagedKVCache
from services.worker.model_runner import ModelRunner, load_hf_model

log = logging.getLogger("alise.worker")


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        if source is not None:
            ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids


def build_engine(cfg: WorkerConfig) -> Engine:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    model = load_hf_model(cfg.model_dir, dtype, device, random_weights=cfg.random_weights)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
    mc = model.config
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    cache = PagedKVCache(num_layers=mc.num_hidden_layers, num_blocks=cfg.num_blocks,
                         num_host_blocks=cfg.num_host_blocks, block_size=cfg.block_size,
                         num_kv_heads=mc.num_key_value_heads, head_dim=head_dim, dtype=dtype, device=device)
    pool_tokens = cfg.num_blocks * cfg.block_size
    max_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings, pool_tokens)
    log.info("engine: %s on %s/%s, KV pool %d blocks x %d tokens, max_model_len %d",
             mc.model_type, cfg.device, cfg.dtype, cfg.num_blocks, cfg.block_size, max_len)
    return Engine(ModelRunner(model, cache), BlockManager(cfg.num_blocks, cfg.block_size, cfg.num_host_blocks),
                  tokenizer, eos_ids=eos_token_ids(model, tokenizer), max_batch=cfg.max_batch,
                  token_budget=cfg.token_budget, max_model_len=max_len)
