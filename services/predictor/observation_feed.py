"""Learn from the scheduler's stream of finished jobs (services/common/observations.py).

Reads the stream from the position saved with the predictor's state, in batches, and hands each batch to
LengthPredictor.observe together with the position it ends at, so what was learned and where to resume
are saved together: a restart re-reads at most what was learned after the last save (the index
de-duplicates by prompt), and loses nothing. Redis being away is logged once and retried.
"""
from __future__ import annotations

import asyncio
import logging

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.observations import STREAM, parse
from services.common.redis_client import connect
from services.predictor import metrics
from services.predictor.length_predictor import LengthPredictor

log = logging.getLogger("alise.predictor.feed")


class ObservationFeed:
    def __init__(self, predictor: LengthPredictor, redis_url: str, batch: int = 256, block_ms: int = 1000):
        self.predictor = predictor
        self.redis = connect(redis_url)
        self.batch, self.block_ms = batch, block_ms

    async def run(self) -> None:
        connected = True
        while True:
            try:
                resp = await self.redis.xread({STREAM: self.predictor.stream_position}, count=self.batch,
                                              block=self.block_ms)
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                if connected:
                    log.warning("observation stream unreachable (%r); retrying", e)
                connected = False
                await asyncio.sleep(1.0)
                continue
            if not connected:
                log.info("observation stream reachable again")
            connected = True
            for _, entries in resp or []:
                await asyncio.to_thread(self._learn, entries)

    def _learn(self, entries) -> None:
        obs = [o for o in (parse(fields) for _, fields in entries) if o is not None]
        if len(obs) < len(entries):
            log.warning("skipped %d malformed observation entries", len(entries) - len(obs))
        last = entries[-1][0]
        position = last.decode() if isinstance(last, bytes) else last
        try:
            self.predictor.observe([o.prompt for o in obs], [o.output_tokens for o in obs],
                                   [o.previous_reply_tokens for o in obs], [o.newest_message_chars for o in obs],
                                   stream_position=position)
        except Exception:  # noqa: BLE001 - a batch that cannot be learned must not end learning for good
            log.exception("could not learn from %d observations; skipped", len(obs))
            self.predictor.observe([], [], stream_position=position)
            return
        metrics.LEARNED.labels("stream").inc(len(obs))

    async def close(self) -> None:
        await self.redis.aclose()
