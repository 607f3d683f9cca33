"""Incremental detokenization with stop strings.

Decoding a growing token list one token at a time can split a multi-byte character, so text is only
released once it no longer ends in U+FFFD. While stop strings are set, the last (longest stop - 1)
characters are held back: they might be the start of a stop string that must not reach the client.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"
_CONTEXT = 6   # tokens re-decoded before the new ones, so merges at the boundary decode right
_MAX_PARTIAL_TOKENS = 4   # a UTF-8 character spans at most 4 byte-level tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...], output_ids: list[int], released: str = ""):
        """output_ids / released: a resumed job's tokens so far and the text already sent to its client."""
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = released             # all output text decoded so far (stop string cut off)
        self.sent = len(released)        # characters already released to the client
        self.read_offset = len(output_ids)
        self.prefix_offset = max(0, len(output_ids) - _CONTEXT)
        self.stopped = False
        if output_ids and tokenizer is not None:
            self._rebuild(output_ids, released)

    def _rebuild(self, output_ids: list[int], released: str) -> None:
        """A resumed job: only released text was recorded, not the characters held back for stop matching
        (nor a half-decoded character), so the text is rebuilt from the tokens and the release point kept."""
        end = len(output_ids)
        while end > max(0, len(output_ids) - _MAX_PARTIAL_TOKENS):
            text = self._decode(output_ids[:end])
            if not text.endswith(REPLACEMENT):
                break
            end -= 1
        else:
            return                       # undecodable tail: keep the released text as the whole text
        if not text.startswith(released):
            return                       # cannot happen with a deterministic tokenizer; never resend text
        self.text = text
        self.read_offset, self.prefix_offset = end, max(0, end - _CONTEXT)

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
