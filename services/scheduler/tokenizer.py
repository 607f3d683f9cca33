"""The served model's tokenizer and chat template (transformers' fast tokenizer; no torch needed)."""
from __future__ import annotations

import json
import os
from pathlib import Path


class PromptTokenizer:
    def __init__(self, model_dir: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.max_model_len = int(config.get("max_position_embeddings", 2048))
        self.control_tokens = sorted({t.content for t in self.tok.added_tokens_decoder.values() if t.special}
                                     | set(self.tok.all_special_tokens))

    def control_token_in(self, text: str) -> str | None:
        """The first special (control) token that appears in text as plain characters, if any."""
        return next((t for t in self.control_tokens if t in text), None)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
