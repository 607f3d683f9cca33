"""The text the length predictor sees for a request: the newest user message first, then earlier turns,
most recent first. Encoders truncate (128-256 tokens), and the newest turn says most about the answer's
length, so it must never be the part cut off. Shared by the scheduler (live requests) and the predictor's
dataset readers (training), so both see requests the same way."""
from __future__ import annotations

HISTORY_CHARS = 2000
# the newest message's bound: encoders read its first 128-512 tokens, and every finished job's text is kept in
# the predictor's stream of observations, which a flood of near-empty giant prompts must not fill with gigabytes
NEWEST_CHARS = 32_768


def predictor_text(turns: list[str]) -> str:
    """turns: the conversation so far, oldest first, ending with the user's newest message."""
    newest, earlier = turns[-1].strip()[:NEWEST_CHARS], [t for t in turns[:-1] if t.strip()]
    history = "\n".join(reversed(earlier))[:HISTORY_CHARS]
    return (newest + "\n" + history).strip() if history else newest


def newest_message(text: str, chars: int) -> str:
    """The newest message of a predictor text (predictor_text) whose newest message had `chars` characters (as
    newest_message_chars counts it): its first `chars` characters, the message without its outer spaces."""
    return text[:max(chars, 0)]


def newest_message_chars(message: str) -> int:
    """The newest user message's length as the predictor is told it (its conversation line's third term): what
    predictor_text keeps of it. The scheduler counts a chat's, the dataset readers a training turn's, the same way."""
    return min(len(message.strip()), NEWEST_CHARS)


def prompt_key(prompt: str) -> str:
    """Identity of a prompt for de-duplication and train/test splits (case and outer spaces ignored)."""
    import hashlib

    return hashlib.sha1(prompt.strip().lower().encode()).hexdigest()
