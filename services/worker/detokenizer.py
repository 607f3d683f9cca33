"""Incremental detokenization with stop strings.

Decoding a growing token list one token at a time can split a multi-byte character, so text is only
released once it no longer ends in U+FFFD. While stop strings are set, the last (longest stop - 1)
characters are held back: they might be the start of a stop string that must not reach the client.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"
_CONTEXT = 6   # tokens re-decoded before the new ones, so merges at the boundary decode right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...], output_ids: list[int], text: str = ""):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = text                 # all output text decoded so far (stop string cut off)
        self.sent = len(text)            # characters already released to the client
        self.read_offset = len(output_ids)
        self.prefix_offset = max(0, len(output_ids) - _CONTEXT)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:        # token ids only (benchmarks with random-weight models)
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, output_ids: list[int]) -> None:
        """Account for the newest token(s) at the end of output_ids."""
        before = self._decode(output_ids[self.prefix_offset:self.read_offset])
        after = self._decode(output_ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return
        start = len(self.text)
        self.text += after[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(output_ids)
        self._check_stop(max(0, start - self.hold))

    def _check_stop(self, search_from: int) -> None:
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def release(self, final: bool) -> str:
        """Text not yet sent that is safe to send (everything, when the sequence has finished)."""
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
