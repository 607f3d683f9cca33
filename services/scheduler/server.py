"""Scheduler service wiring: Redis, predictor client, dispatcher, client API and worker gateway."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import uuid

from prometheus_client import start_http_server
from alise.v1 import generate_pb2, worker_pb2

from services.scheduler import metrics
from services.common.auth import ServiceTokenCheck, cert_names, read_service_token
from services.common.lenient import add_lenient_service
from services.common import thread_sampler
from services.common.loop_lag import watch_loop_lag
from services.common.file_versions import FileWatch
from services.common.redis_client import connect
from services.common.tls import health_only_server
from services.common.grpc_server import (NOT_SERVING, SERVING, build_server, configure_logging,
                                         install_stop_signals, set_health)
from services.scheduler.api import AliseServicer, add_to_server
from services.scheduler.config import SchedulerConfig
from services.scheduler.dispatcher import Dispatcher
from services.scheduler.job_events import JobEventHub
from services.scheduler.job_store import JobStore
from services.scheduler.leader_lease import LeaderLease
from services.scheduler.openai_http import OpenAIFrontDoor, reload_certificate, start_http
from services.scheduler.predictor_client import PredictorClient
from services.scheduler.tenants import TenantRegistry
from services.scheduler.tokenizer import PromptTokenizer
from services.scheduler.worker_sessions import WorkerGateway

log = logging.getLogger("alise.scheduler")
FOLLOW_FILES_S = 5.0       # how often the API keys file and the HTTP certificate are checked for changes
CLIENT_SERVICES = [generate_pb2.DESCRIPTOR.services_by_name["Alise"].full_name]
WORKER_SERVICES = [worker_pb2.DESCRIPTOR.services_by_name["WorkerGateway"].full_name]


async def serve(cfg: SchedulerConfig, stop: asyncio.Event | None = None, ready: asyncio.Future | None = None) -> None:
    if not cfg.api_keys_file:
        raise SystemExit("--api-keys-file is required: clients are authenticated by API key "
                         "(python -m services.scheduler.tenants add FILE NAME creates one)")
    tenants = TenantRegistry.load(cfg.api_keys_file)
    service_token = read_service_token(cfg.service_token_file or None)
    tokenizer = PromptTokenizer(cfg.model_dir)
    redis_client = connect(cfg.redis_url)
    await redis_client.ping()
    lease = LeaderLease(redis_client, f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}", cfg.leader_lease_s)
    await lease.acquire()            # before anything acts on the store: recovery first of all
    if stop is None:
        stop = asyncio.Event()
        install_stop_signals(stop)
    kept = asyncio.create_task(lease.keep())            # from now on: recovery and start-up may take a while
    kept.add_done_callback(lambda _: stop.set())       # lost: stop serving (and exit non-zero, below)
    store = JobStore(redis_client, cfg.finished_ttl_s, leader=lease.holder)     # fenced by the lease
    predictor = PredictorClient(cfg.predictor_address, cfg.predictor_timeout_s, service_token, cfg.tls)
    predictor.connect_in_background()
    dispatcher = Dispatcher(cfg, store, predictor, JobEventHub(), may_act=lease.valid)
    await dispatcher.recover_arrivals()       # so that every queued job becomes due in time, however deep it waits
    recovered = await dispatcher.recover_orphans()
    if recovered:
        log.info("requeued %d jobs left running by a previous scheduler", recovered)

    metrics.MODEL.name = cfg.model_name
    if cfg.metrics_port:
        start_http_server(cfg.metrics_port, addr=cfg.listen.rsplit(":", 1)[0], registry=metrics.REGISTRY)
    server, health, port = build_server(CLIENT_SERVICES, cfg.listen, cfg.max_concurrent_rpcs, tls=cfg.tls)
    api = AliseServicer(dispatcher, store, tokenizer, tokenizer.max_model_len, tenants)
    add_to_server(api, server)
    gateway, gateway_health, gateway_port = build_server(WORKER_SERVICES, cfg.worker_listen, tls=cfg.tls,
                                                         require_client_cert=cfg.worker_mtls)
    probes = health_only_server(health, cfg.health_listen)[0] if cfg.health_listen else None
    workers_only = ServiceTokenCheck(service_token, cert_names(cfg.worker_cert_names))
    add_lenient_service(gateway, WorkerGateway(dispatcher, workers_only), worker_pb2, "WorkerGateway")
    for srv in (server, gateway, probes):
        if srv is not None:
            await srv.start()
    http = None
    if cfg.http_listen:          # the OpenAI-compatible front door, in this event loop, on the same servicer
        http = await start_http(OpenAIFrontDoor(api, cfg.model_name), cfg.http_listen, cfg.tls_cert, cfg.tls_key,
                                cfg.max_concurrent_rpcs, cfg.http_header_timeout_s)
        log.info("scheduler: OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if cfg.tls_cert else "http",
                 cfg.http_listen.rsplit(":", 1)[0], http[2])
    loop_task = asyncio.create_task(dispatcher.run())
    following = asyncio.create_task(follow_files(tenants, http, cfg))
    lag_watch = asyncio.create_task(watch_loop_lag(lambda late: metrics.EVENT_LOOP_LAG.observe(late)))
    await set_health(health, CLIENT_SERVICES, SERVING)
    await set_health(gateway_health, WORKER_SERVICES, SERVING)
    log.info("scheduler: clients on port %d (%d tenants), workers on port %d, policy %s", port, len(tenants),
             gateway_port, cfg.policy)
    for flag, on in (("--learn-forced-lengths", cfg.learn_forced_lengths), ("--serve-step-sample", cfg.serve_step_sample)):
        if on:
            log.warning("scheduler: %s is on: a benchmark setting, not for serving", flag)
    if ready is not None:
        ready.set_result(port)
    await stop.wait()
    await set_health(health, CLIENT_SERVICES, NOT_SERVING)
    api.closing = True
    loop_task.cancel()
    following.cancel()
    lag_watch.cancel()
    if http is not None:
        http[0].should_exit = True
        await http[1]
    await server.stop(grace=2)
    await gateway.stop(grace=1)
    if probes is not None:
        await probes.stop(grace=0)
    await predictor.close()
    lost = kept.done() and not kept.cancelled() and kept.exception()
    kept.cancel()
    if not lost:
        await lease.release()        # the successor need not wait for the term to run out
    await redis_client.aclose()
    if lost:
        raise SystemExit(f"scheduler stopped: {lost}")


async def follow_files(tenants: TenantRegistry, http, cfg: SchedulerConfig) -> None:
    """Files rewritten while the scheduler runs take effect without a restart: the API keys file (a revoked key
    stops working, a new one starts) and, for the HTTP front door, the TLS certificate (the gRPC ports follow it
    by themselves: tls.TlsFiles.server_credentials). Checked every FOLLOW_FILES_S."""
    certificate = FileWatch((cfg.tls_cert, cfg.tls_key))
    while True:
        await asyncio.sleep(FOLLOW_FILES_S)
        await asyncio.to_thread(tenants.reload_if_changed)
        if http is None or not cfg.tls_cert or not certificate.changed():
            continue
        try:
            reload_certificate(http[0], cfg.tls_cert, cfg.tls_key)
            log.info("scheduler: HTTP front door's TLS certificate reloaded from %s", cfg.tls_cert)
        except (OSError, ssl.SSLError) as e:
            log.error("scheduler: TLS files changed but do not load; the HTTP front door keeps the last good ones: %s", e)


def main() -> None:
    configure_logging()
    thread_sampler.start_from_env("scheduler")    # benchmarks only: ALISE_PROFILE_THREADS=DIR/ (thread_sampler.py)
    asyncio.run(serve(SchedulerConfig.from_args()))


if __name__ == "__main__":
    main()
