"""Incremental detokenization with stop strings, including a job resumed part-way (preempted or moved)."""
from __future__ import annotations

import pytest

from services.worker.detokenizer import IncrementalDetokenizer

TEXT = ("Les élèves ont répondu: «très bien» — 東京は晴れ 🌤️. The quick brown fox jumps over the lazy dog; "
        "then it stops, STOP is never reached, and the end comes with ünïcödé everywhere.")


def run(tokenizer, ids: list[int], stop: tuple[str, ...], cut: int | None = None) -> str:
    """Feed ids one at a time and collect what is released; at `cut`, rebuild the detokenizer the way a
    resumed job gets it: from its token ids and the text its client already received."""
    output: list[int] = []                  # the sequence's list, which its owner appends to before add()
    detok = IncrementalDetokenizer(tokenizer, stop, output)
    sent = ""
    for i in range(1, len(ids) + 1):
        if i - 1 == cut:
            output = ids[:i - 1]
            detok = IncrementalDetokenizer(tokenizer, stop, output, sent)
        output.append(ids[i - 1])
        detok.add(ids[i - 1])
        sent += detok.release(final=i == len(ids) or detok.stopped)
        if detok.stopped:
            break
    return sent


@pytest.mark.parametrize("stop", [(), ("never-there-at-all-in-this-text",), ("STOP",)])
def test_a_resumed_job_streams_exactly_the_text_of_an_undisturbed_one(tokenizer, stop):
    """Regression (issue 8.3): characters held back for stop matching were lost on every resume."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    whole = run(tokenizer, ids, stop)
    assert whole == (TEXT.split("STOP")[0] if "STOP" in stop else TEXT)
    for cut in range(1, len(ids)):
        assert run(tokenizer, ids, stop, cut) == whole, f"resumed after {cut} tokens"


def test_a_job_that_ends_inside_a_character_gets_what_a_whole_decode_gives(tokenizer):
    """Ending (max_tokens) on a token whose character was still partial lost that token's text, and the space
    before it with it: the client's text no longer matched its token ids (found by review)."""
    ids = tokenizer.encode("ab 🌤️ 東京", add_special_tokens=False)
    for n in range(1, len(ids) + 1):
        assert run(tokenizer, ids[:n], ()) == tokenizer.decode(ids[:n], skip_special_tokens=True), n


def test_special_tokens_add_no_text_and_never_reach_the_stream(tokenizer):
    """A run of special tokens (a model emitting EOS under ignore_eos) grew the stream's buffer, and each one
    decoded the whole run again: 4,000 took 0.76 s on the dev VM (found by review). They add no text and never
    enter the stream now."""
    output: list[int] = []
    detok = IncrementalDetokenizer(tokenizer, (), output)
    stepped = []

    class Counting:                      # the stream, counting the tokens it is given
        def __init__(self, stream):
            self.stream = stream

        def step(self, backend, token_id):
            stepped.append(token_id)
            return self.stream.step(backend, token_id)

    detok.stream = Counting(detok.stream)
    ids = (tokenizer.encode("Hello", add_special_tokens=False) + [tokenizer.eos_token_id] * 100
           + tokenizer.encode(" world", add_special_tokens=False))
    for t in ids:
        output.append(t)
        detok.add(t)
    assert detok.release(final=True) == "Hello world"
    assert tokenizer.eos_token_id not in stepped
