"""Scheduler service wiring: Redis, predictor client, dispatcher, client API and worker gateway."""
from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from prometheus_client import start_http_server
from alise.v1 import generate_pb2, worker_pb2
from alise.v1 import worker_pb2_grpc

from services.common.grpc_server import (NOT_SERVING, SERVING, build_server, configure_logging,
                                         install_stop_signals, set_health)
from services.scheduler.api import AliseServicer, add_to_server
from services.scheduler.config import SchedulerConfig
from services.scheduler.dispatcher import Dispatcher
from services.scheduler.job_events import JobEventHub
from services.scheduler.job_store import JobStore
from services.scheduler.predictor_client import PredictorClient
from services.scheduler.tokenizer import PromptTokenizer
from services.scheduler.worker_sessions import WorkerGateway

log = logging.getLogger("alise.scheduler")
SERVICES = [generate_pb2.DESCRIPTOR.services_by_name["Alise"].full_name,
            worker_pb2.DESCRIPTOR.services_by_name["WorkerGateway"].full_name]


async def serve(cfg: SchedulerConfig, stop: asyncio.Event | None = None, ready: asyncio.Future | None = None) -> None:
    tokenizer = PromptTokenizer(cfg.model_dir)
    redis_client = aioredis.from_url(cfg.redis_url)
    await redis_client.ping()
    store = JobStore(redis_client)
    predictor = PredictorClient(cfg.predictor_address, cfg.predictor_timeout_s)
    dispatcher = Dispatcher(cfg, store, predictor, JobEventHub())
    recovered = await dispatcher.recover_orphans()
    if recovered:
        log.info("requeued %d jobs left running by a previous scheduler", recovered)

    if cfg.metrics_port:
        start_http_server(cfg.metrics_port, addr=cfg.listen.rsplit(":", 1)[0])
    server, health, port = build_server(SERVICES, cfg.listen)
    add_to_server(AliseServicer(dispatcher, store, tokenizer, tokenizer.max_model_len), server)
    worker_pb2_grpc.add_WorkerGatewayServicer_to_server(WorkerGateway(dispatcher), server)
    await server.start()
    loop_task = asyncio.create_task(dispatcher.run())
    await set_health(health, SERVICES, SERVING)
    log.info("scheduler listening on port %d (policy %s, redis %s)", port, cfg.policy, cfg.redis_url)
    if ready is not None:
        ready.set_result(port)
    if stop is None:
        stop = asyncio.Event()
        install_stop_signals(stop)
    await stop.wait()
    await set_health(health, SERVICES, NOT_SERVING)
    loop_task.cancel()
    await server.stop(grace=2)
    await predictor.close()
    await redis_client.aclose()


def main() -> None:
    configure_logging()
    asyncio.run(serve(SchedulerConfig.from_args()))


if __name__ == "__main__":
    main()
