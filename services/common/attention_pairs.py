"""How much attention a prefill chunk computes, counted the same by the worker (its step reports) and the simulator
(its step cost): a chunk of `new` tokens after `cached` ones already in the KV cache (a chat turn's history, or the
chunks of its prompt before) has each new token attend to every cached token and to the new ones up to itself."""


def prefill_pairs(cached: int, new: int) -> int:
    """Query-key pairs of one prefill chunk's causal attention."""
    return new * cached + new * (new + 1) // 2
