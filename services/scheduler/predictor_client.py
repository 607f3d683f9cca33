"""The scheduler's view of the predictor: a prediction or None, never an exception.

When the predictor is down or slow the scheduler keeps serving (those jobs fall back to arrival order),
and says so once in the log and continuously in a metric.
"""
from __future__ import annotations

import asyncio
import logging

import grpc
from alise.v1 import predictor_pb2 as pb
from alise.v1 import predictor_pb2_grpc as pb_grpc

from services.scheduler import metrics

log = logging.getLogger("alise.scheduler.predictor")


class PredictorClient:
    def __init__(self, address: str, timeout_s: float):
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.PredictorStub(self.channel)
        self.timeout_s = timeout_s
        self.available = True
        self._tasks: set[asyncio.Task] = set()

    async def predict(self, prompt: str, previous_reply_tokens: int = 0) -> pb.LengthPrediction | None:
        req = pb.PredictRequest(prompts=[prompt], previous_reply_tokens=[previous_reply_tokens])
        try:
            resp = await self.stub.Predict(req, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            metrics.PREDICTOR_FAILURES.inc()
            metrics.PREDICTOR_UP.set(0)
            if self.available:
                log.warning("predictor unavailable (%s); new jobs are served in arrival order", e.code().name)
            self.available = False
            return None
        if not self.available:
            log.info("predictor is back")
        self.available = True
        metrics.PREDICTOR_UP.set(1)
        return resp.predictions[0]

    def observe(self, prompt: str, output_tokens: int, previous_reply_tokens: int = 0) -> None:
        """Teach the predictor a finished job's true length, in the background."""
        task = asyncio.create_task(self._observe(prompt, output_tokens, previous_reply_tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _observe(self, prompt: str, output_tokens: int, previous_reply_tokens: int) -> None:
        req = pb.ObserveRequest(observations=[pb.Observation(prompt=prompt, output_tokens=output_tokens,
                                                             previous_reply_tokens=previous_reply_tokens)])
        try:
            await self.stub.Observe(req, timeout=10 * self.timeout_s)
        except grpc.aio.AioRpcError as e:
            log.debug("observe failed: %s", e.code().name)

    async def close(self) -> None:
        await self.channel.close()
