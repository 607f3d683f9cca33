"""Read prompt / response datasets in their own formats into (prompt, output length) examples.

Formats (detected per file): Alpaca JSON (`instruction`, `input`, `output`), AlpacaEval JSON (`instruction`,
`output`, `generator`), ShareGPT JSON (`conversations` of `from` / `value`: every assistant turn, with the
conversation before it, is one request), and JSONL with `prompt` / `response`. Output lengths are counted
with the served model's tokenizer, since that is what the scheduler will see.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from services.common.predictor_text import newest_message_chars, predictor_text, prompt_key

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing"}


@dataclass(frozen=True)
class Example:
    prompt: str          # the text the predictor embeds
    response: str
    source: str
    previous_reply: str = ""     # the assistant's reply before this request, in a conversation
    conversation: str = ""       # id of the conversation the request belongs to, if any
    newest_message_chars: int = 0    # in a conversation: the user's newest message, as the scheduler counts it

    @property
    def group(self) -> str:
        """Split key: a conversation (or a prompt) never lands in both train and test; turns of one
        conversation share history and reply style, so splitting them would leak."""
        return self.conversation or prompt_key(self.prompt)


def _sharegpt(records, source: str) -> Iterator[Example]:
    for n, rec in enumerate(records):
        history: list[str] = []
        previous_reply = newest = ""
        conversation = f"{source}:{rec.get('id', n)}"
        for turn in rec.get("conversations", []):
            role, text = turn.get("from", "").lower(), turn.get("value", "")
            if role in ASSISTANT_ROLES and history and text.strip():
                yield Example(predictor_text(history), text, source, previous_reply, conversation,
                              newest_message_chars(newest))
            if role in ASSISTANT_ROLES:
                previous_reply = text
            newest = text if role in USER_ROLES else ""     # a user's message only while it is the last turn
            history.append(text)


def _instruction(records, source: str) -> Iterator[Example]:
    for rec in records:
        prompt = (rec["instruction"] + ("\n" + rec["input"] if rec.get("input") else "")).strip()
        if prompt and rec.get("output", "").strip():
            yield Example(prompt, rec["output"], rec.get("generator", source))


def load_examples(path: Path) -> list[Example]:
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [Example(r["prompt"], r["response"], path.stem) for r in rows if r.get("prompt") and r.get("response")]
    records = json.loads(path.read_text())
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list")
    first = records[0]
    if "conversations" in first:
        return list(_sharegpt(records, path.stem))
    if "instruction" in first and "output" in first:
        return list(_instruction(records, path.stem))
    raise ValueError(f"{path}: unknown format (keys {sorted(first)})")


def count_tokens(tokenizer, texts: list[str], batch: int = 256, empty: int = 1) -> list[int]:
    """Token counts; an empty text counts as `empty` (1 for output lengths, 0 for "no previous reply")."""
    out: list[int] = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"]
        out += [len(x) if x else empty for x in enc]
    return out
