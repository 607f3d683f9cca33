"""Incremental detokenization with stop strings, including a job resumed part-way (preempted or moved)."""
from __future__ import annotations

import pytest

from services.worker.detokenizer import IncrementalDetokenizer

TEXT = ("Les élèves ont répondu: «très bien» — 東京は晴れ 🌤️. The quick brown fox jumps over the lazy dog; "
        "then it stops, STOP is never reached, and the end comes with ünïcödé everywhere.")


def run(tokenizer, ids: list[int], stop: tuple[str, ...], cut: int | None = None) -> str:
    """Feed ids one at a time and collect what is released; at `cut`, rebuild the detokenizer the way a
    resumed job gets it: from its token ids and the text its client already received."""
    detok = IncrementalDetokenizer(tokenizer, stop, [])
    sent = ""
    for i in range(1, len(ids) + 1):
        if i - 1 == cut:
            detok = IncrementalDetokenizer(tokenizer, stop, ids[:i - 1], sent)
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
