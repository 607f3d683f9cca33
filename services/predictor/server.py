"""Predictor service: gRPC wiring over LengthPredictor (batched Predict, online Observe)."""
from __future__ import annotations

import argparse
import asyncio
import logging

import grpc
from alise.v1 import predictor_pb2 as pb
from alise.v1 import predictor_pb2_grpc as pb_grpc

from services.common.grpc_server import (SERVING, build_server, configure_logging, install_stop_signals,
                                         set_health)
from services.predictor.length_predictor import Encoder, LengthPredictor

log = logging.getLogger("alise.predictor")
SERVICE = pb.DESCRIPTOR.services_by_name["Predictor"].full_name
MAX_BATCH = 1024
MAX_PROMPT_CHARS = 200_000


class PredictorServicer(pb_grpc.PredictorServicer):
    def __init__(self, predictor: LengthPredictor):
        self.p = predictor

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        prompts = list(request.prompts)
        if not prompts:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompts: must not be empty")
        if len(prompts) > MAX_BATCH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompts: at most {MAX_BATCH} per call")
        for i, p in enumerate(prompts):
            if len(p) > MAX_PROMPT_CHARS:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompts[{i}]: over {MAX_PROMPT_CHARS} chars")
        preds = await asyncio.to_thread(self.p.predict, prompts)
        return pb.PredictResponse(predictions=[
            pb.LengthPrediction(mean=x.mean, p10=x.p10, p50=x.p50, p90=x.p90, neighbours=x.neighbours)
            for x in preds])

    async def Observe(self, request: pb.ObserveRequest, context: grpc.aio.ServicerContext) -> pb.ObserveResponse:
        obs = list(request.observations)
        for i, o in enumerate(obs):
            if o.output_tokens <= 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"observations[{i}].output_tokens: must be > 0")
            if not o.prompt:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"observations[{i}].prompt: must not be empty")
        if not obs:
            return pb.ObserveResponse(index_size=self.p.size)
        size = await asyncio.to_thread(self.p.observe, [o.prompt for o in obs], [o.output_tokens for o in obs])
        return pb.ObserveResponse(index_size=size)


async def serve(listen: str, k: int, min_similarity: float, prior: float) -> None:
    server, health, port = build_server([SERVICE], listen)
    predictor = LengthPredictor(Encoder(), k=k, min_similarity=min_similarity, prior_mean=prior)
    pb_grpc.add_PredictorServicer_to_server(PredictorServicer(predictor), server)
    await server.start()
    await set_health(health, [SERVICE], SERVING)
    log.info("predictor listening on port %d", port)
    stop = asyncio.Event()
    install_stop_signals(stop)
    await stop.wait()
    await health.enter_graceful_shutdown()
    await server.stop(grace=5)


def main() -> None:
    configure_logging()
    p = argparse.ArgumentParser(description="ALISE output-length predictor")
    p.add_argument("--listen", default="127.0.0.1:50052")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--min-similarity", type=float, default=0.5)
    p.add_argument("--prior", type=float, default=128.0)
    a = p.parse_args()
    asyncio.run(serve(a.listen, a.k, a.min_similarity, a.prior))


if __name__ == "__main__":
    main()
