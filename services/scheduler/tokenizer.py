"""The served model's tokenizer and chat template (transformers' fast tokenizer; no torch needed)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def control_tokens(tok) -> list[str]:
    """A tokenizer's special (control) tokens as text: a client's message must not carry them as plain characters
    (the load generator's chat workload skips turns that do, as this server would refuse them)."""
    return sorted({t.content for t in tok.added_tokens_decoder.values() if t.special} | set(tok.all_special_tokens))


def render_chat(tok, messages: list[dict[str, str]]) -> str:
    """The text the model reads for a chat: its template, ready for the assistant's reply."""
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class PromptTokenizer:
    def __init__(self, model_dir: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.max_model_len = int(config.get("max_position_embeddings", 2048))
        self.control_tokens = control_tokens(self.tok)

    def control_token_in(self, text: str) -> str | None:
        """The first special (control) token that appears in text as plain characters, if any."""
        return next((t for t in self.control_tokens if t in text), None)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return render_chat(self.tok, messages)
