"""Shared fixtures: the real SmolLM2 model (converted once, cached), a real Redis server on a free
loopback port, and whole stacks of real service processes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The internal service token for services the tests start one by one (a LocalStack makes its own).
os.environ.setdefault("ALISE_SERVICE_TOKEN", "test-suite-service-token-" + os.urandom(8).hex())

from services.common.local_stack import LocalStack, RedisServer  # noqa: E402
from services.worker.prepare_model import ensure_model  # noqa: E402


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_model()


@pytest.fixture(scope="session")
def hf_model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack_factory(tmp_path_factory, model_dir):
    """Start stacks of real processes; every one is stopped at the end of the test module."""
    stacks: list[LocalStack] = []

    def start(**kwargs) -> LocalStack:
        stack = LocalStack(log_dir=tmp_path_factory.mktemp("stack"), **kwargs)
        stacks.append(stack)
        return stack.start()

    yield start
    for s in stacks:
        s.stop()


@pytest.fixture
async def dispatcher_factory(redis_server, model_dir):
    """Dispatchers over an emptied real Redis, with config overrides; no predictor is reachable (prior)."""
    import redis.asyncio as aioredis

    from services.common.local_stack import free_port
    from services.scheduler.config import SchedulerConfig
    from services.scheduler.dispatcher import Dispatcher
    from services.scheduler.job_events import JobEventHub
    from services.scheduler.job_store import JobStore
    from services.scheduler.predictor_client import PredictorClient

    client = aioredis.from_url(redis_server.url)
    await client.flushdb()
    predictors = []

    async def make(**overrides) -> Dispatcher:
        cfg = SchedulerConfig(model_dir=str(model_dir), **overrides)
        predictors.append(PredictorClient(f"127.0.0.1:{free_port()}", 0.2, "unused-service-token"))
        return Dispatcher(cfg, JobStore(client), predictors[-1], JobEventHub())

    yield make
    for p in predictors:
        await p.close()
    await client.aclose()
