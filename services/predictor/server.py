"""Predictor service: gRPC wiring over LengthPredictor (batched Predict, online Observe, persistence).

`--model-dir` holds a predictor trained by `python -m services.predictor.train`; online learning is saved
back to it every `--save-every-s` and on shutdown. A missing directory is a clean empty start; unreadable
state (or state built with another encoder) is logged as an error, renamed `*.unreadable` and the service
starts empty: never a crash loop, never an overwrite of what might be recovered. With `--redis-url` it
learns from the scheduler's stream of finished jobs (observation_feed.py).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
from pathlib import Path

import grpc
from prometheus_client import start_http_server
from alise.v1 import predictor_pb2 as pb

from services.common.auth import ServiceTokenCheck, cert_names, read_service_token
from services.common.tls import TlsFiles, health_only_server
from services.common.grpc_server import (SERVING, build_server, configure_logging, install_stop_signals,
                                         set_health)
from services.common.lenient import add_lenient_service, reject_bad
from services.common.observations import MAX_NEWEST_MESSAGE_CHARS, MAX_OUTPUT_TOKENS, MAX_PROMPT_CHARS
from services.predictor import metrics
from services.predictor.batcher import PredictBatcher
from services.predictor.encoder import ENCODER_KINDS, load_encoder
from services.predictor.kind_reliability import RequestKind
from services.predictor.length_predictor import Basis, LengthPredictor, PredictorParams, set_aside
from services.predictor.math_threads import limit_math_threads, math_executor
from services.predictor.observation_feed import ObservationFeed

log = logging.getLogger("alise.predictor")
SERVICE = pb.DESCRIPTOR.services_by_name["Predictor"].full_name
MAX_BATCH = 1024
WIRE_BASIS = {b: pb.PredictionBasis.Value(f"PREDICTION_BASIS_{b.name}") for b in Basis}   # a missing one fails here
# a prompt's conversation counts (PredictRequest, Observation): the bounds of a real one
PER_PROMPT_BOUNDS = {"previous_reply_tokens": MAX_OUTPUT_TOKENS, "newest_message_chars": MAX_NEWEST_MESSAGE_CHARS}


class PredictorServicer:
    """Predict and Observe are for ALISE's own services only: both need the internal service token, so
    no outsider can read predictions or teach (poison) the predictor."""

    def __init__(self, predictor: LengthPredictor, auth: ServiceTokenCheck):
        self.p = predictor
        self.auth = auth
        self.batcher = PredictBatcher(predictor, MAX_BATCH)

    async def Predict(self, request, context):
        await self.auth.require(context)
        await reject_bad(request, context)
        prompts = list(request.prompts)
        if not prompts:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompts: must not be empty")
        if len(prompts) > MAX_BATCH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompts: at most {MAX_BATCH} per call")
        for i, p in enumerate(prompts):
            if len(p) > MAX_PROMPT_CHARS:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompts[{i}]: over {MAX_PROMPT_CHARS} chars")
        previous = await per_prompt(request.previous_reply_tokens, "previous_reply_tokens", len(prompts), context)
        newest = await per_prompt(request.newest_message_chars, "newest_message_chars", len(prompts), context)
        preds = await self.batcher.predict(prompts, previous, newest)
        return pb.PredictResponse(predictions=[
            pb.LengthPrediction(mean=x.mean, p10=x.p10, p50=x.p50, p90=x.p90, neighbours=x.neighbours,
                                deciles=x.deciles, basis=WIRE_BASIS[x.basis], message_votes=x.message_votes)
            for x in preds])

    async def Observe(self, request, context):
        await self.auth.require(context)
        await reject_bad(request, context)
        obs = list(request.observations)
        if len(obs) > MAX_BATCH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"observations: at most {MAX_BATCH} per call")
        for i, o in enumerate(obs):
            if not 0 < o.output_tokens <= MAX_OUTPUT_TOKENS:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"observations[{i}].output_tokens: must be in [1, {MAX_OUTPUT_TOKENS}]")
            if len(o.prompt) > MAX_PROMPT_CHARS:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"observations[{i}].prompt: over {MAX_PROMPT_CHARS} chars")
            if not o.prompt:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"observations[{i}].prompt: must not be empty")
            for name, most in PER_PROMPT_BOUNDS.items():
                if not 0 <= getattr(o, name) <= most:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"observations[{i}].{name}: must be in [0, {most}]")
        if not obs:
            return pb.ObserveResponse(index_size=self.p.size)
        size = await asyncio.to_thread(self.p.observe, [o.prompt for o in obs], [o.output_tokens for o in obs],
                                       [o.previous_reply_tokens for o in obs], [o.newest_message_chars for o in obs])
        metrics.LEARNED.labels("observe").inc(len(obs))
        return pb.ObserveResponse(index_size=size)


async def per_prompt(values, name: str, prompts: int, context) -> list[int]:
    """A per-prompt count of a PredictRequest: one within its bounds for each prompt, or none (0 for all: none or
    unknown)."""
    values, most = list(values) or [0] * prompts, PER_PROMPT_BOUNDS[name]
    if len(values) != prompts:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{name}: {len(values)} values for {prompts} prompts (one each, or none)")
    for i, n in enumerate(values):
        if not 0 <= n <= most:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}[{i}]: must be in [0, {most}]")
    return values


def load_or_empty(predictor: LengthPredictor, model_dir: Path | None) -> None:
    if model_dir is None or not model_dir.exists():
        log.info("no trained predictor at %s: starting empty (prior until jobs are observed)", model_dir)
        return
    try:
        predictor.load(model_dir)
        log.info("loaded predictor from %s: %d prompts, params %s", model_dir, predictor.size, predictor.params)
    except Exception as e:  # noqa: BLE001 - a corrupt file must not become a crash loop
        kept = set_aside(model_dir, LengthPredictor.STATE_FILES)
        log.error("cannot read predictor at %s (%r): starting empty; the unreadable files are kept as %s",
                  model_dir, e, kept)              # load() changes nothing until everything has been read


async def save_periodically(predictor: LengthPredictor, model_dir: Path, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        if predictor.dirty:
            await asyncio.to_thread(predictor.save, model_dir)


async def serve(a: argparse.Namespace) -> None:
    if a.math_threads < 1:
        raise SystemExit(f"--math-threads must be >= 1, got {a.math_threads}")
    limit_math_threads(a.math_threads)                  # this thread's
    asyncio.get_running_loop().set_default_executor(math_executor(a.math_threads))     # those that predict and learn
    service_token = read_service_token(a.service_token_file)
    try:
        callers = ServiceTokenCheck(service_token, cert_names(a.client_cert_names))
    except ValueError as e:
        raise SystemExit(f"--client-cert-names: {e}") from None
    if a.client_cert_names and not a.mtls:
        raise SystemExit("--client-cert-names needs --mtls (without it, callers present no certificate)")
    tls = TlsFiles(cert=a.tls_cert, key=a.tls_key, ca=a.tls_ca)
    server, health, port = build_server([SERVICE], a.listen, tls=tls, require_client_cert=a.mtls)
    probes = health_only_server(health, a.health_listen)[0] if a.health_listen else None
    trained = a.model_dir / "encoder" if a.model_dir else None
    try:
        encoder = load_encoder(a.encoder, trained, a.max_prompt_tokens, a.quantize)
    except Exception as e:  # noqa: BLE001 - a corrupt encoder must not become a crash loop
        log.error("cannot load the encoder in %s (%r): using stock MiniLM", trained, e)
        encoder = load_encoder("minilm", None, a.max_prompt_tokens, a.quantize)
    log.info("encoder: %s (%d dims)", type(encoder).__name__, encoder.dim)
    predictor = LengthPredictor(encoder, PredictorParams(prior_log_mean=math.log(a.prior)))
    if a.message_weight is not None:          # kept apart from the state loaded next, which does not replace it
        try:
            predictor.set_message_weight(a.message_weight)
        except ValueError as e:
            raise SystemExit(f"--message-weight: {e}") from None
        log.info("--message-weight: the short messages' votes weigh at most %g", a.message_weight)
    if a.no_kind_pull:
        predictor.set_pull_by_kind(False)
        log.info("--no-kind-pull: predictions served as the model gives them, whatever their kind's reliability")
    load_or_empty(predictor, a.model_dir)
    metrics.INDEX_ENTRIES.set_function(lambda: predictor.size)
    for kind in RequestKind:
        metrics.KIND_SLOPE.labels(kind.value).set_function(lambda kind=kind: predictor.kind_slope(kind))
    if a.metrics_port:
        start_http_server(a.metrics_port, addr=a.listen.rsplit(":", 1)[0])
    add_lenient_service(server, PredictorServicer(predictor, callers), pb, "Predictor")
    await server.start()
    if probes is not None:
        await probes.start()
    saves = a.model_dir is not None and not a.read_only
    saver = asyncio.create_task(save_periodically(predictor, a.model_dir, a.save_every_s)) if saves else None
    feed = ObservationFeed(predictor, a.redis_url) if a.redis_url else None
    feeder = asyncio.create_task(feed.run()) if feed else None
    await set_health(health, [SERVICE], SERVING)
    log.info("predictor listening on port %d", port)
    stop = asyncio.Event()
    install_stop_signals(stop)
    await stop.wait()
    await health.enter_graceful_shutdown()
    await server.stop(grace=5)
    if feeder is not None:
        feeder.cancel()
        await feed.close()
    if saver is not None:
        saver.cancel()
        if predictor.dirty:
            predictor.save(a.model_dir)
    elif predictor.dirty:
        log.info("read-only: what was learned online is not saved")


def arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="ALISE output-length predictor")
    p.add_argument("--listen", default="127.0.0.1:50052")
    p.add_argument("--model-dir", type=Path, default=None, help="trained predictor; online learning is saved here")
    p.add_argument("--redis-url", default=os.environ.get("ALISE_PREDICTOR_REDIS_URL"),
                   help="learn from the scheduler's stream of finished jobs in this Redis (else only via Observe); "
                        "default $ALISE_PREDICTOR_REDIS_URL (an environment variable keeps a password out of `ps`)")
    p.add_argument("--service-token-file", default=None,
                   help="the internal token callers must present (else $ALISE_SERVICE_TOKEN)")
    p.add_argument("--tls-cert", default="", help="serve TLS with this certificate (PEM) and --tls-key")
    p.add_argument("--tls-key", default="")
    p.add_argument("--tls-ca", default="", help="CA of client certificates (with --mtls)")
    p.add_argument("--mtls", action="store_true", help="accept only callers with a certificate signed by --tls-ca")
    p.add_argument("--client-cert-names", default="",
                   help="with --mtls: the names (Common Name) a caller's certificate may have, comma-separated "
                        "(the scheduler's); empty: any certificate the CA signed")
    p.add_argument("--health-listen", default="", help="plaintext health-only port for probes when serving TLS")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics on this port; 0 = off")
    p.add_argument("--save-every-s", type=float, default=30.0)
    p.add_argument("--read-only", action="store_true",
                   help="never write --model-dir: learn online in memory only (benchmark runs must not teach the "
                        "next run the lengths of the same prompts)")
    p.add_argument("--prior", type=float, default=128.0, help="output tokens assumed before anything is learned")
    p.add_argument("--message-weight", type=float, default=None,
                   help="the most a short newest message's votes weigh in its estimate, 0-1 (0: off; default: the "
                        "trained state's, 0.5 when none); for this run only: the state saves its own weight")
    p.add_argument("--no-kind-pull", action="store_true",
                   help="serve predictions as the model gives them: not pulled toward their kind's centre where the "
                        "model ranks that kind poorly (services/predictor/kind_reliability.py)")
    p.add_argument("--encoder", choices=ENCODER_KINDS, default="auto",
                   help="auto: what train.py saved in --model-dir/encoder, else stock MiniLM; static: the fast "
                        "static encoder (thousands of prompts/s on 2 cores)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="encoder truncation (default: 256 MiniLM, 128 fine-tuned MiniLM, 512 static)")
    p.add_argument("--quantize", action="store_true", help="int8 dynamic quantization of a MiniLM encoder")
    p.add_argument("--math-threads", type=int, default=1,
                   help="threads of the math pools (torch, faiss, numpy; default 1: more only spin between requests)")
    return p


def main() -> None:
    configure_logging()
    asyncio.run(serve(arg_parser().parse_args()))


if __name__ == "__main__":
    main()
