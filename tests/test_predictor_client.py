"""The scheduler's predictor client opens its channel at start, so the first job's Predict does not pay for the
connection (a TLS handshake with mTLS) out of its short timeout."""
from __future__ import annotations

import asyncio
import math

import grpc
from alise.v1 import predictor_pb2 as pb

from services.common.local_stack import free_port
from services.scheduler.predictor_client import PredictorClient, bounded


async def test_the_channel_is_ready_before_the_first_prediction():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = PredictorClient(f"127.0.0.1:{port}", 0.5, "token")
    try:
        assert client.channel.get_state() is grpc.ChannelConnectivity.IDLE     # gRPC connects lazily
        client.connect_in_background()
        await asyncio.wait_for(client.connecting, timeout=30)
        assert client.channel.get_state() is grpc.ChannelConnectivity.READY
    finally:
        await client.close()
        await server.stop(None)


async def test_closing_while_the_predictor_is_still_down_is_clean():
    client = PredictorClient(f"127.0.0.1:{free_port()}", 0.5, "token")      # nothing listens there
    client.connect_in_background()
    await asyncio.sleep(0.1)
    await client.close()
    await asyncio.sleep(0)
    assert client.connecting.cancelled()              # not left waiting for a predictor that never came


def test_a_bounded_prediction_keeps_what_it_says_about_itself():
    """Bounds clamp the numbers only: what the median comes from and whether the votes moved it reach the
    scheduler as the predictor said (typed on the wire since session 39, where it was one free string)."""
    said = pb.LengthPrediction(mean=5000.0, p10=0.2, p50=900.0, p90=math.inf, deciles=[1.0] * 10,
                               basis=pb.PREDICTION_BASIS_BLEND, message_votes=True)
    assert bounded(said, 2048) is None                                 # an infinite p90 is no prediction
    said.p90 = 3000.0
    got = bounded(said, 2048)
    assert (got.mean, got.p10, got.p50, got.p90) == (2048.0, 1.0, 900.0, 2048.0)
    assert got.basis == pb.PREDICTION_BASIS_BLEND and got.message_votes
