"""Benchmark workloads: the requests a load generator sends, read from real datasets on disk.

Every loader returns `BenchRequest`s: a prompt text and the output length the dataset recorded (a load
generator with `--ignore-eos` asks for exactly that many tokens, so a random-weight model produces the trace's
lengths). Datasets whose records carry no text (the Azure LLM trace, length pairs) get prompts synthesised to
the recorded token count, as `vllm bench serve`'s random dataset does. Datasets are read from paths and never
copied into the repository (`../shared/data` has real ones with their provenance).
"""
from __future__ import annotations

import csv
import json
import operator
import random
from dataclasses import dataclass
from enum import Enum
from itertools import accumulate
from pathlib import Path

from services.predictor.datasets import ASSISTANT_ROLES, USER_ROLES
from services.scheduler.tokenizer import control_tokens, render_chat


@dataclass(frozen=True)
class BenchRequest:
    prompt: str                        # the text, or in a conversation the user's newest message
    output_tokens: int                 # the dataset's output length; 0 = let the model decide
    prompt_tokens: int = 0             # as counted by the workload's tokenizer (0 = not counted)
    arrival_s: float | None = None     # offset from the start, for traces with real arrival times
    history: tuple[tuple[str, str], ...] = ()   # (role, content) of the conversation before it, oldest first
    as_chat: bool = False              # sent as chat messages (the model's template applies), not as a prompt

    def messages(self) -> list[dict[str, str]]:
        """The request as chat messages: its history, then the prompt as the user's turn."""
        return [{"role": r, "content": c} for r, c in self.history] + [{"role": "user", "content": self.prompt}]


class Dataset(str, Enum):
    SHAREGPT = "sharegpt"              # {conversations: [{from, value}]}: each human turn with its reply
    SHAREGPT_CHAT = "sharegpt-chat"    # the same turns, each sent as a chat with the conversation before it
    ALPACA = "alpaca"                  # [{instruction, input, output}] (also AlpacaEval's {instruction, output})
    AZURE = "azure"                    # CSV TIMESTAMP, ContextTokens, GeneratedTokens: arrivals and lengths
    LENGTHS = "lengths"                # JSON [[prompt tokens, output tokens], ...] (bench/make_lengths.py)
    JSONL = "jsonl"                    # one {"prompt": ..., "output_tokens": ...} per line
    SYNTHETIC = "synthetic"            # --input-len / --output-len, no file

    def __str__(self) -> str:           # argparse shows choices as their values
        return self.value


@dataclass(frozen=True)
class Limits:
    """vLLM's ShareGPT benchmark rule: pairs with a prompt over 1024 or prompt + output over 2048 tokens are
    dropped, and so are very short ones (under 4 tokens either side)."""
    max_prompt: int = 1024
    max_total: int = 2048
    min_tokens: int = 4

    def keep(self, n_in: int, n_out: int) -> bool:
        return self.min_tokens <= n_in <= self.max_prompt and n_out >= self.min_tokens and n_in + n_out <= self.max_total


def text_pairs(dataset: Dataset, path: Path):
    """(prompt, reply) texts of a ShareGPT or Alpaca-style file, in file order."""
    data = json.loads(Path(path).read_text())
    for item in data:
        if dataset is Dataset.SHAREGPT:
            turns = item.get("conversations", [])
            for a, b in zip(turns, turns[1:]):
                if a.get("from") == "human" and b.get("from") == "gpt":
                    yield a["value"], b["value"]
        else:
            prompt = (item["instruction"] + "\n" + item.get("input", "")).strip()
            yield prompt, item.get("output", "")


def chat_turns(path: Path, num: int, tokenizer, limits: Limits) -> list[BenchRequest]:
    """Each human turn of a ShareGPT file with the conversation before it, the way a chat client resends its
    history (so the predictor sees the previous reply, and the prefix cache sees the resent history). The
    prompt is counted as the model's chat template renders it; a history too long for `limits.max_prompt`
    loses its oldest exchanges first, as a client trimming to a context window does."""
    from jinja2 import TemplateError     # what a chat template raises for a conversation shape it refuses

    out: list[BenchRequest] = []
    special = [t for t in control_tokens(tokenizer) if t]
    for item in json.loads(Path(path).read_text()):
        turns = [(_role(t.get("from", "")), t.get("value", "")) for t in item.get("conversations", [])]
        # the server refuses control tokens as text: a turn with one, or after one, could never be sent
        forged = list(accumulate((any(s in c for s in special) for _, c in turns), operator.or_))
        for i, ((role, text), (next_role, reply)) in enumerate(zip(turns, turns[1:])):
            if role != "user" or next_role != "assistant" or forged[i]:
                continue
            history = [t for t in turns[:i] if t[0] is not None]     # may start with a reply (mid-way)
            try:
                req = _fit_history(text, history, tokenizer, limits.max_prompt)
            except TemplateError:        # e.g. a template that wants user and assistant turns to alternate
                continue
            n_out = len(tokenizer.encode(reply, add_special_tokens=False))
            if limits.keep(req.prompt_tokens, n_out):
                out.append(BenchRequest(text, n_out, req.prompt_tokens, history=req.history, as_chat=True))
            if len(out) >= num:
                return out
    return out


def _role(source_role: str) -> str | None:
    """A ShareGPT speaker as a chat role, with the role names the predictor's readers use (None: neither)."""
    role = source_role.lower()
    return "user" if role in USER_ROLES else "assistant" if role in ASSISTANT_ROLES else None


def _fit_history(text: str, history: list[tuple[str, str]], tokenizer, max_prompt: int) -> BenchRequest:
    while True:
        req = BenchRequest(text, 0, history=tuple(history), as_chat=True)
        n_in = len(tokenizer.encode(rendered_chat(req, tokenizer), add_special_tokens=False))
        if n_in <= max_prompt or not history:
            return BenchRequest(text, 0, n_in, history=req.history, as_chat=True)
        history = _from_first_user(history[2:] if len(history) > 1 else [])   # drop the oldest exchange


def _from_first_user(history: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The history from its first user message (after trimming, so it starts as an exchange does)."""
    while history and history[0][0] != "user":
        history = history[1:]
    return history


def rendered_chat(req: BenchRequest, tokenizer) -> str:
    """The text the model reads for a request sent as a chat, rendered as the scheduler renders it."""
    return render_chat(tokenizer, req.messages())


def ordinary_vocab(tokenizer) -> list[int]:
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def synthetic_prompt(tokenizer, n: int, rng: random.Random, vocab: list[int]) -> tuple[str, int]:
    """Text that the tokenizer reads as about `n` tokens: random ordinary vocabulary entries (`vocab`), decoded,
    then cut so that re-encoding gives n (decoding can merge neighbours, so it is checked, not assumed)."""
    ids = [rng.choice(vocab) for _ in range(n)]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for _ in range(3):
        got = tokenizer.encode(text, add_special_tokens=False)
        if len(got) == n:
            break
        got = got[:n] + [rng.choice(vocab) for _ in range(n - len(got))]
        text = tokenizer.decode(got, skip_special_tokens=True)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def load(dataset: Dataset, path: Path | None, num: int, tokenizer, *, seed: int = 0, limits: Limits = Limits(),
         input_len: int = 256, output_len: int = 128) -> list[BenchRequest]:
    """Up to `num` requests of the dataset. Text datasets are kept in file order (the same file gives the same
    workload); lengths are counted with `tokenizer`."""
    rng = random.Random(seed)
    out: list[BenchRequest] = []
    if dataset is Dataset.SHAREGPT_CHAT:
        return chat_turns(path, num, tokenizer, limits)
    if dataset in (Dataset.SHAREGPT, Dataset.ALPACA):
        for prompt, reply in text_pairs(dataset, path):
            n_in = len(tokenizer.encode(prompt, add_special_tokens=False))
            n_out = len(tokenizer.encode(reply, add_special_tokens=False))
            if limits.keep(n_in, n_out):
                out.append(BenchRequest(prompt, n_out, n_in))
            if len(out) >= num:
                break
    elif dataset is Dataset.JSONL:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                out.append(BenchRequest(item["prompt"], int(item.get("output_tokens", 0))))
            if len(out) >= num:
                break
    else:
        vocab = ordinary_vocab(tokenizer)
        for n_in, n_out, arrival in length_records(dataset, path, num, input_len, output_len, limits):
            text, counted = synthetic_prompt(tokenizer, n_in, rng, vocab)
            out.append(BenchRequest(text, n_out, counted, arrival))
    return out


def length_records(dataset: Dataset, path: Path | None, num: int, input_len: int, output_len: int,
                   limits: Limits) -> list[tuple[int, int, float | None]]:
    """(prompt tokens, output tokens, arrival offset or None) of the datasets without text."""
    if dataset is Dataset.SYNTHETIC:
        return [(input_len, output_len, None)] * num
    if dataset is Dataset.LENGTHS:
        return [(int(a), int(b), None) for a, b in json.loads(Path(path).read_text())[:num]]
    rows, start = [], None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            t = _seconds(row["TIMESTAMP"])
            start = t if start is None else start
            n_in, n_out = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            if limits.keep(n_in, n_out):
                rows.append((n_in, n_out, t - start))
            if len(rows) >= num:
                break
    return rows


def trace_gaps(path: Path) -> list[float]:
    """The gaps between consecutive arrivals of an Azure LLM trace CSV (its TIMESTAMP column), in trace order: the
    shape of real arrivals (bursts, lulls), to be scaled to a benchmark's rate (bench/serve.py: arrival_offsets)."""
    with open(path, newline="") as f:
        times = [_seconds(row["TIMESTAMP"]) for row in csv.DictReader(f)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    if not gaps or min(gaps) < 0 or sum(gaps) <= 0:
        raise ValueError(f"{path}: an arrival trace needs at least two rows, in time order, not all at once")
    return gaps


def _seconds(timestamp: str) -> float:
    """The Azure trace's '2023-11-16 18:15:46.6805900' -> seconds (sub-microsecond digits dropped)."""
    from datetime import datetime

    day, _, frac = timestamp.partition(".")
    return datetime.fromisoformat(day).timestamp() + float("0." + (frac or "0"))
