"""The scheduler's view of the predictor: a prediction or None, never an exception.

When the predictor is down or slow the scheduler keeps serving (those jobs fall back to arrival order),
and says so once in the log and continuously in a metric. True lengths of finished jobs do not go through
here: the job store appends them to a Redis stream the predictor reads (services/common/observations.py).
"""
from __future__ import annotations

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

    async def close(self) -> None:
        await self.channel.close()
