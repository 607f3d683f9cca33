"""The scheduler's view of the predictor: a prediction or None, never an exception.

When the predictor is down or slow the scheduler keeps serving (those jobs fall back to arrival order),
and says so once in the log and continuously in a metric. True lengths of finished jobs do not go through
here: the job store appends them to a Redis stream the predictor reads (services/common/observations.py).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc
from alise.v1 import predictor_pb2 as pb
from alise.v1 import predictor_pb2_grpc as pb_grpc

from services.common.auth import bearer_metadata
from services.common.file_versions import FileWatch
from services.common.tls import TlsFiles, aio_channel
from services.scheduler import metrics
from services.scheduler.validation import PredictorInputs

log = logging.getLogger("alise.scheduler.predictor")
FOLLOW_FILES_S = 5.0      # how often a prediction first checks whether the TLS files were renewed


class PredictorClient:
    def __init__(self, address: str, timeout_s: float, service_token: str, tls: TlsFiles | None = None):
        self.address, self.tls = address, tls
        self.channel = aio_channel(address, tls)
        self.stub = pb_grpc.PredictorStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = bearer_metadata(service_token)
        self.available = True
        self.connecting: asyncio.Task | None = None     # connect_in_background: done once the channel is ready
        self._files = FileWatch(tls.paths if tls is not None and tls.dials_tls else ())
        self._files_checked = time.monotonic()
        self._closing: set[asyncio.Task] = set()        # channels replaced by _follow_files, closing gracefully

    def _follow_files(self) -> None:
        """A renewed certificate or CA (cert-manager rewrites the mounted Secret) is used from the next prediction on:
        gRPC keeps a channel's credentials for its life and reconnects with them, so the predictor's next restart
        with a certificate of a new CA, or this scheduler's own certificate expiring, would cut predictions off.
        Files that do not load keep the channel there is. Never raises (a prediction's contract)."""
        if not self._files_renewed():
            return
        try:
            channel = aio_channel(self.address, self.tls)
        except Exception as e:  # noqa: BLE001 - files that do not load (yet): no prediction fails for them
            log.error("TLS files changed but do not load; the predictor channel keeps the last good ones: %s", e)
            return
        self._reopen(channel)
        log.info("predictor channel reopened with the renewed TLS files")

    def _files_renewed(self) -> bool:
        """Whether the TLS files changed; looked at no more often than every FOLLOW_FILES_S (a stat per file)."""
        if not self._files.paths or time.monotonic() - self._files_checked < FOLLOW_FILES_S:
            return False
        self._files_checked = time.monotonic()
        return self._files.changed()

    def _reopen(self, channel: grpc.aio.Channel) -> None:
        """Predict on `channel` from now on; calls on the old one finish (closed with the predictions' timeout as grace)."""
        old, self.channel, self.stub = self.channel, channel, pb_grpc.PredictorStub(channel)
        closing = asyncio.get_running_loop().create_task(old.close(grace=self.timeout_s))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        if self.connecting is not None:
            self.connecting.cancel()
        self.connect_in_background()     # the handshake now, not inside the next prediction's timeout

    def connect_in_background(self) -> None:
        """Open the channel now, not at the first job: its connection (a TLS handshake with mTLS) would otherwise
        count against that job's predictor timeout and, on a busy host, make it miss its prediction."""
        self.connecting = asyncio.get_running_loop().create_task(self.channel.channel_ready())

    async def predict(self, asked: PredictorInputs, max_tokens: int) -> pb.LengthPrediction | None:
        """The predicted length, bounded to [1, max_tokens] (a job cannot run longer), or None."""
        req = pb.PredictRequest(prompts=[asked.text], previous_reply_tokens=[asked.previous_reply_tokens],
                                newest_message_chars=[asked.newest_message_chars])
        self._follow_files()
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
        await asyncio.gather(*self._closing, return_exceptions=True)


def bounded(p: pb.LengthPrediction, max_tokens: int) -> pb.LengthPrediction | None:
    """Never trust a number blindly: a non-finite prediction is no prediction, and none exceeds max_tokens."""
    values = [p.mean, p.p10, p.p50, p.p90, *p.deciles]
    if not all(math.isfinite(v) for v in values):
        return None

    def bound(v: float) -> float:
        return min(max(v, 1.0), float(max_tokens))

    return pb.LengthPrediction(mean=bound(p.mean), p10=bound(p.p10), p50=bound(p.p50), p90=bound(p.p90),
                               neighbours=p.neighbours, deciles=[bound(d) for d in p.deciles], basis=p.basis,
                               message_votes=p.message_votes)
