"""Incremental detokenization with stop strings.

Text comes from `tokenizers`' DecodeStream (Rust): one call per new token, which buffers a token that ends
inside a multi-byte character until the character is complete. It costs ~2 us a token, against ~18 us for
re-decoding a window of tokens twice in Python (what this module did before), so at a batch of 512 the
engine thread spends about 1 ms a step here, hidden behind the GPU's step (engine.py overlaps them).
While stop strings are set, the last (longest stop - 1) characters are held back: they might be the start
of a stop string that must not reach the client. Jobs without stop strings never search.
Special tokens (EOS, chat markers) add no text here and never enter the stream: a run of them would otherwise
grow its buffer, each step decoding the whole run again. A job that ends on a token whose character is still
partial gets what transformers' decode gives for it (U+FFFD), not nothing.
"""
from __future__ import annotations

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...], output_ids: list[int], released: str = ""):
        """output_ids: the sequence's own list of output tokens (not a copy: its owner appends each token before
        `add`, and the final flush decodes it); a resumed job's holds its tokens so far. released: the text
        already sent to its client."""
        # None: token ids only (benchmarks with random-weight models)
        self.backend = tokenizer.backend_tokenizer if tokenizer is not None else None
        self.special = frozenset(tokenizer.all_special_ids) if tokenizer is not None else frozenset()
        self.stream = DecodeStream(skip_special_tokens=True)
        self.ids = output_ids            # read only: the sequence owns it
        self.partial = False             # the newest text token's character is not complete yet
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = released             # all output text decoded so far (stop string cut off)
        self.sent = len(released)        # characters already released to the client
        self.stopped = False
        if output_ids and self.backend is not None:
            self._rebuild(output_ids, released)

    def _rebuild(self, output_ids: list[int], released: str) -> None:
        """A resumed job: only released text was recorded, not the characters held back for stop matching
        (nor a half-decoded character), so the stream replays the tokens and the release point is kept."""
        text = "".join(self._piece(t) for t in output_ids)
        if text.startswith(released):    # else (cannot happen with a deterministic tokenizer) never resend
            self.text = text
            if self.stop:                # the held-back text may hold a whole stop string: the job has ended
                self._check_stop(len(released))

    def add(self, token_id: int) -> None:
        """Account for the newest token (already appended to output_ids)."""
        if self.backend is None:
            return
        if piece := self._piece(token_id):
            start = len(self.text)
            self.text += piece
            if self.stop:
                self._check_stop(max(0, start - self.hold))

    def _piece(self, token_id: int) -> str:
        """The text this token completes ('' while a character is still partial, and for a special token)."""
        if token_id in self.special:
            return ""
        try:
            piece = self.stream.step(self.backend, token_id) or ""
        except Exception:  # noqa: BLE001 - "invalid prefix": a token the stream cannot join; start a new one
            self.stream = DecodeStream(skip_special_tokens=True)
            piece = self.backend.decode([token_id], skip_special_tokens=True)
        self.partial = not piece
        return piece

    def _flush(self) -> None:
        """The end of a job whose last text token left a character partial: its text as a whole decode has it."""
        whole = self.backend.decode(self.ids, skip_special_tokens=True)
        if whole.startswith(self.text) and len(whole) > len(self.text):
            start = len(self.text)
            self.text = whole
            if self.stop:
                self._check_stop(max(0, start - self.hold))
        self.partial = False

    def _check_stop(self, search_from: int) -> None:
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def release(self, final: bool) -> str:
        """Text not yet sent that is safe to send (everything, when the sequence has finished)."""
        if final and self.partial and not self.stopped and self.backend is not None:
            self._flush()
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
