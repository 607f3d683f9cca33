"""Worker service: loads the model, then holds a session with the scheduler (reconnecting with backoff).

On SIGTERM it turns NOT_SERVING, tells the scheduler it is draining, lets running jobs finish until the
drain deadline, then closes the session; the scheduler requeues whatever was left. A device taken for broken
(EngineLoop.fatal) stops it the same way, with a short drain, and it exits non-zero to be restarted.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
from prometheus_client import start_http_server
from alise.v1 import worker_pb2 as wpb
from alise.v1 import worker_pb2_grpc as wpb_grpc

from services.common.auth import bearer_metadata, read_service_token
from services.common.tls import aio_channel
from services.common import thread_sampler
from services.worker import metrics
from services.common.grpc_server import (NOT_SERVING, SERVING, build_server, configure_logging,
                                         install_stop_signals, set_health)
from services.worker.config import WorkerConfig
from services.worker.engine_loop import EngineLoop, outgoing_message
from services.worker.factory import build_engine
from services.worker.kernel_watch import late_variants

log = logging.getLogger("alise.worker")
_END = object()


async def _outgoing(register: wpb.WorkerMessage, outbox: asyncio.Queue):
    yield register
    while (msg := await outbox.get()) is not _END:
        yield outgoing_message(msg)


async def hold_session(cfg: WorkerConfig, loop_thread: EngineLoop, register: wpb.WorkerMessage,
                       stop: asyncio.Event, service_token: str) -> None:
    backoff = 0.2
    while not stop.is_set():
        outbox: asyncio.Queue = asyncio.Queue()
        loop_thread.attach(asyncio.get_running_loop(), outbox)
        try:
            async with aio_channel(cfg.scheduler, cfg.tls) as channel:
                call = wpb_grpc.WorkerGatewayStub(channel).Connect(_outgoing(register, outbox),
                                                                   metadata=bearer_metadata(service_token))
                log.info("connected to scheduler %s as %s", cfg.scheduler, register.register.worker_id)
                async for command in call:
                    loop_thread.submit(command)
                    backoff = 0.2
        except grpc.aio.AioRpcError as e:
            log.warning("scheduler session ended: %s %s", e.code().name, e.details())
        except Exception:  # noqa: BLE001 - anything else (a TLS file mid-rotation...) must not end the retries
            log.exception("scheduler session failed; retrying")
        finally:
            outbox.put_nowait(_END)
            loop_thread.detach()          # drop our jobs: the scheduler requeues them
        try:
            await asyncio.wait_for(stop.wait(), timeout=backoff)
        except asyncio.TimeoutError:
            backoff = min(backoff * 2, 5.0)


FATAL_DRAIN_S = 2.0       # a worker whose device is broken: long enough for its draining report and last messages


async def drain(loop_thread: EngineLoop, deadline_s: float) -> None:
    loop_thread.submit(wpb.SchedulerCommand(drain=wpb.Drain(deadline_seconds=deadline_s)))
    end = time.monotonic() + deadline_s
    await asyncio.sleep(0.3)              # let the draining report reach the scheduler
    # finished means reported: wait for the engine to go idle *and* its last messages to leave the outbox
    while (loop_thread.engine.has_work or loop_thread.unsent()) and time.monotonic() < end:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)              # the last write on the stream


async def serve(cfg: WorkerConfig, stop: asyncio.Event | None = None) -> None:
    service_token = read_service_token(cfg.service_token_file or None)
    metrics.MODEL.name = cfg.model_name
    if cfg.metrics_port:
        start_http_server(cfg.metrics_port, addr=cfg.listen.rsplit(":", 1)[0], registry=metrics.REGISTRY)
    server, health, port = build_server([], cfg.listen)
    await server.start()                  # health answers NOT_SERVING while the model loads
    engine = await asyncio.to_thread(build_engine, cfg)
    if stop is None:
        stop = asyncio.Event()
        install_stop_signals(stop)
    loop = asyncio.get_running_loop()
    # a broken device (EngineLoop.fatal, said from the engine thread) stops the worker, which exits non-zero
    loop_thread = EngineLoop(engine, cfg.load_report_s, cfg.stream_updates_per_step, cfg.heartbeat_s,
                             on_fatal=lambda _: loop.call_soon_threadsafe(stop.set))
    loop_thread.start()
    register = wpb.WorkerMessage(register=wpb.WorkerRegister(
        worker_id=cfg.resolved_worker_id, model=cfg.model_name, block_size=engine.blocks.block_size,
        num_blocks=engine.blocks.num_total, max_batch=engine.sched.max_batch, max_model_len=engine.max_model_len,
        acks_aborts=True, early_rows=engine.sched.early_rows))
    session_stop = asyncio.Event()
    session = asyncio.create_task(hold_session(cfg, loop_thread, register, session_stop, service_token))
    await set_health(health, [], SERVING)
    log.info("worker %s ready (health on port %d)", cfg.resolved_worker_id, port)
    await stop.wait()
    await set_health(health, [], NOT_SERVING)
    # A broken device runs nothing more: its drain only stops the scheduler placing jobs here and lets the last
    # failure's report out; the session's end requeues whatever it holds.
    await drain(loop_thread, FATAL_DRAIN_S if loop_thread.fatal else cfg.drain_timeout_s)
    sched = engine.sched               # what the prefix cache saved over this worker's life (benchmarks read it here)
    log.info("prefix cache: %d of %d prompt tokens admitted from scratch were found cached",
             sched.cached_tokens, sched.admitted_tokens)
    if (late := late_variants()) is not None:
        log.info("kernel variants first used after warm-up: %d%s", sum(late.values()),
                 f" ({', '.join(f'{k} x{n}' for k, n in sorted(late.items()))})" if late else "")
    session_stop.set()
    session.cancel()
    await asyncio.gather(session, return_exceptions=True)
    loop_thread.stop()
    # join the engine thread: exiting while it is inside torch aborts the process (std::terminate)
    await asyncio.to_thread(loop_thread.join, 10)
    await server.stop(grace=1)
    if loop_thread.fatal:
        raise SystemExit(f"worker stopped: {loop_thread.fatal}")   # non-zero: Kubernetes restarts it on a fresh context


def main() -> None:
    configure_logging()
    thread_sampler.start_from_env("worker", takes_file=True)    # benchmarks only (thread_sampler.py)
    asyncio.run(serve(WorkerConfig.from_args()))


if __name__ == "__main__":
    main()
