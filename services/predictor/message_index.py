"""What short user messages were answered with: a kNN over the newest message alone, for chat turns whose newest
message is short ("Thanks!", "hey", "continue", "Is that it?").

A chat turn's predictor text is its newest message followed by up to 2,000 characters of history
(predictor_text.py), so for a message of a few words the embedding, and with it the main index's neighbours and
the MLP, is mostly the previous reply's; and the conversation line (reply_line.py) knows only the message's
length, which cannot tell "Thanks!" (answered in a sentence) from "continue" (answered at length). Here the message
is embedded alone and looked up among the short messages seen before: their replies' lengths are a vote, blended
into the estimate with a weight that grows with how often similar messages were seen. The index learns from every
finished turn, so what a "thank you" gets is known from the first few seen.

On the GPU benchmark's chat turns this lowered the simulated p99 of normalized latency by 10-22% at 44-64 req/s
(mean -2 to -3%); the jobs that made that tail were short replies to such messages, predicted 200-600 tokens
(docs/BENCHMARKS.md, session 37).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from services.common.predictor_text import newest_message
from services.predictor.knn_index import KnnIndex
from services.predictor.length_mlp import newest_message_log

K = 16                  # distinct messages looked at
MIN_SIMILARITY = 0.5    # ... of which those at least this similar vote ("Thanks!" and "thank you": 0.67 in MiniLM)
# the weight the votes get: message_weight * n / (n + PRIOR_VOTES) for n sightings of similar messages, so one odd
# sighting moves the estimate little and many move it up to message_weight
PRIOR_VOTES = 4.0


def is_short(side: np.ndarray) -> np.ndarray:
    """Requests whose newest message is short: below the conversation line's cap (~54 characters; a message of
    unknown length, 0, is not)."""
    return newest_message_log(side) < 0


def message_vectors(encoder, prompts: list[str], newest_message_chars, side: np.ndarray) -> np.ndarray:
    """The embedding of each request's newest message alone where it is short (is_short of its side features),
    zeros elsewhere: one more encoder call, on a few words, for the short ones only."""
    out = np.zeros((len(prompts), encoder.dim), dtype=np.float32)
    short = np.flatnonzero(is_short(side))
    if len(short):
        out[short] = encoder.encode([newest_message(prompts[i], int(newest_message_chars[i])) for i in short])
    return out


@dataclass(frozen=True)
class MessageVotes:
    """Per request: the votes' log length (a sightings- and similarity-weighted mean) and how many sightings of
    similar messages cast them (0: no vote)."""
    mu: np.ndarray
    count: np.ndarray

    def weight(self, message_weight: float) -> np.ndarray:
        return message_weight * self.count / (self.count + PRIOR_VOTES)


def message_key(vec: np.ndarray) -> str:
    """One entry per message as the encoder sees it: an identical embedding (the same words; with an uncased
    encoder, in any case) is the same message, whose replies' lengths the entry averages."""
    return hashlib.sha1(np.asarray(vec, np.float16).tobytes()).hexdigest()


class MessageIndex:
    """Short messages' embeddings with the mean log length of their replies and how often each was seen. Keyed by
    the message (message_key), not by the turn: every sighting of "Thanks!" counts in one entry, so its vote follows
    all of them. Keyed by turn, the 16 nearest of a thousand identical "Thanks!" were whichever the search returned
    among equals (with faiss the oldest), and its vote froze on its first 16 sightings (review, session 37)."""

    def __init__(self, dim: int, max_entries: int = 1_000_000):
        self.index = KnnIndex(dim, max_entries=max_entries)

    def __len__(self) -> int:
        return len(self.index)

    def add(self, message_vecs: np.ndarray, side: np.ndarray, lengths) -> None:
        """Learn the short ones among these requests (message_vecs: their message_vectors)."""
        short = np.flatnonzero(is_short(side))
        if len(short):
            vecs = np.asarray(message_vecs)[short]
            self.index.add(vecs, np.asarray(lengths)[short], [message_key(v) for v in vecs])

    def votes(self, message_vecs: np.ndarray, side: np.ndarray) -> MessageVotes:
        """The similar short messages' votes for each request with a short message (no vote for the rest)."""
        out = MessageVotes(np.zeros(len(side)), np.zeros(len(side)))
        short = np.flatnonzero(is_short(side))
        if not len(short) or not len(self):
            return out
        sims, ids = self.index.neighbours(np.asarray(message_vecs, np.float32)[short], K)
        similar = sims >= MIN_SIMILARITY                         # never a missing neighbour (-inf)
        seen = np.where(similar, self.index.counts[np.maximum(ids, 0)], 0.0)
        w = np.where(similar, sims, 0.0) * seen
        logs = self.index.log_lengths[np.maximum(ids, 0)]
        out.mu[short] = (w * logs).sum(1) / np.maximum(w.sum(1), 1e-9)
        out.count[short] = seen.sum(1)
        return out

    def state(self) -> dict:
        return self.index.state()

    def load_state(self, state: dict) -> None:
        self.index.load_state(state)
