"""The scheduler's view of the predictor: a prediction or None, never an exception.

When the predictor is down or slow the scheduler keeps serving (those jobs fall back to arrival order),
and says so once in the log and continuously in a metric. True lengths of finished jobs do not go through
here: the job store appends them to a Redis stream the predictor reads (services/common/observations.py).
"""
from __future__ import annotations

import asyncio
import logging
import math

import grpc
from alise.v1 import predictor_pb2 as pb
from alise.v1 import predictor_pb2_grpc as pb_grpc

from services.common.auth import bearer_metadata
from services.common.tls import TlsFiles, aio_channel
from services.scheduler import metrics

log = logging.getLogger("alise.scheduler.predictor")


class PredictorClient:
    def __init__(self, address: str, timeout_s: float, service_token: str, tls: TlsFiles | None = None):
        self.channel = aio_channel(address, tls)
        self.stub = pb_grpc.PredictorStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = bearer_metadata(service_token)
        self.available = True
        self.connecting: asyncio.Task | None = None     # connect_in_background: done once the channel is ready

    def connect_in_background(self) -> None:
        """Open the channel now, not at the first job: its connection (a TLS handshake with mTLS) would otherwise
        count against that job's predictor timeout and, on a busy host, make it miss its prediction."""
        self.connecting = asyncio.get_running_loop().create_task(self.channel.channel_ready())

    async def predict(self, prompt: str, previous_reply_tokens: int, max_tokens: int) -> pb.LengthPrediction | None:
        """The predicted length, bounded to [1, max_tokens] (a job cannot run longer), or None."""
        req = pb.PredictRequest(prompts=[prompt], previous_reply_tokens=[previous_reply_tokens])
        try:
            resp = await self.stub.Predict(req, timeout=self.timeout_s, metadata=self.metadata)
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
        return bounded(resp.predictions[0], max_tokens)

    async def close(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()      # the predictor may never have come up
        await self.channel.close()


def bounded(p: pb.LengthPrediction, max_tokens: int) -> pb.LengthPrediction | None:
    """Never trust a number blindly: a non-finite prediction is no prediction, and none exceeds max_tokens."""
    values = [p.mean, p.p10, p.p50, p.p90, *p.deciles]
    if not all(math.isfinite(v) for v in values):
        return None

    def bound(v: float) -> float:
        return min(max(v, 1.0), float(max_tokens))

    return pb.LengthPrediction(mean=bound(p.mean), p10=bound(p.p10), p50=bound(p.p50), p90=bound(p.p90),
                               neighbours=p.neighbours, deciles=[bound(d) for d in p.deciles], source=p.source)
