"""Job state as the client sees it: finish reasons, usage and timings in protobuf messages."""
from __future__ import annotations

import time

from alise.v1 import generate_pb2 as pb

from services.scheduler import keys
from services.scheduler.job_store import JobState


FINISH_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                pb.FINISH_REASON_ABORTED: "aborted", pb.FINISH_REASON_ERROR: "error"}
REASONS = {name: code for code, name in FINISH_NAMES.items()}


def timings(state: JobState) -> pb.Timings:
    rec, created = state.record, state.record.created
    end = state.finished or time.time()
    ttft = (state.first_token - created) if state.first_token else 0.0
    decode_s = end - (state.first_token or end)
    n = len(state.token_ids)
    return pb.Timings(
        queue_seconds=(state.first_scheduled - created) if state.first_scheduled else end - created,
        ttft_seconds=ttft, e2e_seconds=end - created,
        tokens_per_second=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        predicted_output_tokens=round(rec.pred_len), predicted_seconds=rec.pred_time,
        num_preemptions=state.num_preemptions, repredicted_output_tokens=round(rec.repred_len))


def complete_message(state: JobState) -> pb.GenerateComplete:
    return pb.GenerateComplete(
        request_id=keys.request_id_of(state.record.job_id), finish_reason=REASONS.get(state.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=state.record.prompt_tokens, completion_tokens=len(state.token_ids)),
        timings=timings(state), text=state.text)


def recorded_since(state: JobState, seen: int, chars: int) -> pb.GenerateResponse | None:
    """A chunk of what the job has recorded past token `seen` (text character `chars`), None if nothing."""
    if len(state.token_ids) <= seen and len(state.text) <= chars:
        return None
    return pb.GenerateResponse(chunk=pb.GenerateChunk(text=state.text[chars:], token_ids=state.token_ids[seen:]))
