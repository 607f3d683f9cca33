"""A worker's message carries when its engine produced it and when its stream took it from the outbox; the scheduler
turns those, with when it received and handled the message, into alise:worker_message_lag_seconds by stage and
alise:worker_message_handling_seconds by kind."""
from __future__ import annotations

import math
import time
from functools import partial

from alise.v1 import worker_pb2 as wpb

from services.scheduler import metrics
from services.worker.engine_loop import outgoing_message, token_events
from services.worker.engine import TokenDelta


def sample(name: str, **labels) -> float:
    return metrics.REGISTRY.get_sample_value(name, {"model_name": metrics.MODEL.name, **labels}) or 0.0


def test_an_outbox_item_leaves_stamped_with_when_it_was_produced_and_taken():
    produced = time.time() - 0.5
    built = outgoing_message((partial(token_events, [TokenDelta("t/a", [1, 2], "hi")]), produced))
    assert built.tokens.deltas[0].token_ids == [1, 2]
    assert built.produced_unix_s == produced and produced + 0.5 <= built.left_outbox_unix_s <= time.time()
    done = outgoing_message((wpb.WorkerMessage(finished=wpb.JobFinished(job_id="t/a")), produced))
    assert done.finished.job_id == "t/a" and done.produced_unix_s == produced


def test_the_scheduler_observes_each_stage_from_when_the_engine_produced_the_message():
    count = "alise:worker_message_lag_seconds_count"
    total = "alise:worker_message_lag_seconds_sum"
    before = {stage: (sample(count, stage=stage), sample(total, stage=stage)) for stage in ("outbox", "received", "handled")}
    handled_before = sample("alise:worker_message_handling_seconds_count", kind="finished")
    msg = wpb.WorkerMessage(finished=wpb.JobFinished(job_id="t/a"), produced_unix_s=100.0, left_outbox_unix_s=100.25)
    metrics.observe_worker_message(msg, received_unix_s=101.0, handled_unix_s=101.5)
    lags = {stage: sample(total, stage=stage) - before[stage][1] for stage in before}
    assert lags == {"outbox": 0.25, "received": 1.0, "handled": 1.5}
    assert all(sample(count, stage=stage) == before[stage][0] + 1 for stage in before)
    assert sample("alise:worker_message_handling_seconds_count", kind="finished") == handled_before + 1
    # a worker that does not stamp (an older one): no lag, its handling still counted; a clock ahead: 0, not < 0
    metrics.observe_worker_message(wpb.WorkerMessage(finished=wpb.JobFinished(job_id="t/b")), 5.0, 5.25)
    assert all(sample(count, stage=stage) == before[stage][0] + 1 for stage in before)
    assert sample("alise:worker_message_handling_seconds_count", kind="finished") == handled_before + 2
    metrics.observe_worker_message(wpb.WorkerMessage(load=wpb.LoadReport(), produced_unix_s=10.0), 9.0, 9.5)
    assert sample(total, stage="received") - before["received"][1] == 1.0       # clamped at 0
    # stamps that are no time (a broken worker clock): not counted, the sums stay finite
    counted = sample(count, stage="outbox")
    for bad in (float("nan"), float("inf")):
        metrics.observe_worker_message(wpb.WorkerMessage(load=wpb.LoadReport(), produced_unix_s=bad), 9.0, 9.5)
        metrics.observe_worker_message(wpb.WorkerMessage(load=wpb.LoadReport(), produced_unix_s=8.0,
                                                         left_outbox_unix_s=bad), 9.0, 9.5)
    assert sample(count, stage="outbox") == counted
    assert all(math.isfinite(sample(total, stage=stage)) for stage in before)
