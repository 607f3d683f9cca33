"""The stream of finished jobs' true output lengths, from the scheduler to the predictor (Redis).

The scheduler appends an entry in the same Lua transaction that marks a job finished, so a learned length
is never lost, even when the predictor is down or restarting. Each predictor replica reads the whole stream
on its own from the position it saved with its model (no consumer group: every replica learns everything),
so a restarted predictor resumes exactly where its saved state ends, and a new one starts from what the
stream still retains. Only uncensored lengths are appended: the model stopped by itself (EOS or a stop
string), not at max_tokens and not with ignore_eos.
"""
from __future__ import annotations

from dataclasses import dataclass

from services.common.predictor_text import NEWEST_CHARS

STREAM = "alise:observations"
MAX_ENTRIES = 100_000          # approximate trim (XADD MAXLEN ~): what a new predictor replica can learn from
# Bounds of a real observation, the same for the stream and the predictor's Observe call: an entry outside them
# is not learned (a length of 10^40 would turn the MLP's weights to NaN, and every prediction with them)
MAX_PROMPT_CHARS = 200_000
MAX_OUTPUT_TOKENS = 1 << 17    # longer than any served context
MAX_NEWEST_MESSAGE_CHARS = NEWEST_CHARS     # what the scheduler counts of a newest message at most


@dataclass(frozen=True)
class Observation:
    prompt: str
    output_tokens: int
    previous_reply_tokens: int
    newest_message_chars: int = 0      # 0: unknown (an entry from a scheduler before the field) or not a chat


def parse(fields: dict) -> Observation | None:
    """An entry's fields (bytes or str); None for an entry that is not a usable observation."""
    f = {(k.decode() if isinstance(k, bytes) else k): (v.decode(errors="replace") if isinstance(v, bytes) else v)
         for k, v in fields.items()}
    try:
        obs = Observation(f["prompt"], int(f["output_tokens"]), int(f.get("previous_reply_tokens", 0)),
                          int(f.get("newest_message_chars", 0)))
    except (KeyError, ValueError):
        return None
    usable = (0 < len(obs.prompt) <= MAX_PROMPT_CHARS and 0 < obs.output_tokens <= MAX_OUTPUT_TOKENS
              and 0 <= obs.previous_reply_tokens <= MAX_OUTPUT_TOKENS
              and 0 <= obs.newest_message_chars <= MAX_NEWEST_MESSAGE_CHARS)
    return obs if usable else None
