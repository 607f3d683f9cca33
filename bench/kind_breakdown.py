"""A run's jobs by the predictor's kind of request (services/predictor/kind_reliability.py: a conversation's first
message, a later turn): per kind, how many, the Kendall tau of predicted against true output length, the mean and
p99 normalized latency, and how many of the run's worst jobs by normalized latency are of that kind. Session 40
read with it that the pull by kind cut first messages' p99 to about a third and left the tail to later turns.

    python -m bench.kind_breakdown --dataset-path .bench-data/sharegpt_heldout_880.json \
        --tokenizer .bench-data/llama3-8b-shape out/KP/alise-r44.csv [more.csv or .csv.xz ...]

The runs' requests are rebuilt from the dataset as the sweep sent them (`--prime` requests first, not in the CSV).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from bench.online_learning_replay import as_the_scheduler_asks
from bench.run_over_time import read_run
from bench.serve_metrics import RequestResult, kendall_tau
from bench.workloads import Dataset, load
from services.predictor.kind_reliability import RequestKind, kinds_of
from services.predictor.length_mlp import side_features
from services.scheduler.tokenizer import PromptTokenizer
from services.scheduler.validation import PredictorInputs

WORST = 30


def asked_in_runs(dataset: Dataset, path: Path, tokenizer: str, num: int, prime: int) -> list[PredictorInputs]:
    """What the predictor was told about each of a sweep's `num` measured requests (its `prime` ones left out),
    rebuilt from the dataset it sent them from."""
    requests = load(dataset, path, num + prime, AutoTokenizer.from_pretrained(tokenizer))
    if len(requests) < num + prime:       # another dataset, or another tokenizer's length limits
        raise ValueError(f"{path} gives {len(requests)} requests; the runs need {prime} priming + {num}")
    tok = PromptTokenizer(tokenizer)
    return [as_the_scheduler_asks(r, tok) for r in requests[prime:]]


def side_of(asked: list[PredictorInputs]) -> np.ndarray:
    """The predictor's side features of these requests (length_mlp.side_features)."""
    return side_features([len(a.text) for a in asked], [a.previous_reply_tokens for a in asked],
                         [a.newest_message_chars for a in asked])


def request_kinds(asked: list[PredictorInputs]) -> list[RequestKind]:
    """Each request's kind, as the predictor tells it from what the scheduler sends."""
    masks = kinds_of(side_of(asked))
    return [next(kind for kind, mask in masks.items() if mask[i]) for i in range(len(asked))]


@dataclass(frozen=True)
class KindStats:
    jobs: int
    kendall_tau: float | None      # of predicted against true output length; None: too few jobs to rank
    mean: float                    # normalized latency (s / output token)
    p99: float
    among_worst: int               # of the run's `worst` jobs by normalized latency, how many are of this kind


def breakdown(results: list[RequestResult], kinds: list[RequestKind],
              worst: int = WORST) -> dict[RequestKind, KindStats]:
    """Per kind (`kinds[index]` for each result's index), over the requests served."""
    done = [r for r in results if r.ok and r.normalized_s is not None]
    worst_ones = {r.index for r in sorted(done, key=lambda r: r.normalized_s, reverse=True)[:worst]}
    out = {}
    for kind in RequestKind:
        jobs = [r for r in done if kinds[r.index] is kind]
        if not jobs:
            continue
        norm = np.array([r.normalized_s for r in jobs])
        out[kind] = KindStats(len(jobs), kendall_tau([r.predicted_output_tokens for r in jobs],
                                                     [r.output_tokens for r in jobs]),
                              float(norm.mean()), float(np.percentile(norm, 99)),
                              sum(r.index in worst_ones for r in jobs))
    return out


@dataclass(frozen=True)
class Recorded:
    """A run's requests by index: what the predictor said, the true length (0 where the request failed: it has
    none), and the length the request asked for (what bench.simulate checks a workload by)."""
    predicted: np.ndarray
    lengths: np.ndarray
    asked: list[int]


def recorded(results: list[RequestResult]) -> Recorded:
    num = max(r.index for r in results) + 1
    out = Recorded(np.zeros(num), np.zeros(num, dtype=np.int64), [0] * num)
    for r in results:
        out.predicted[r.index], out.asked[r.index] = r.predicted_output_tokens, r.expected_output_tokens
        out.lengths[r.index] = r.output_tokens if r.ok else 0
    return out


def dataset_args(p: argparse.ArgumentParser) -> None:
    """The flags that say which dataset a sweep sent its runs from, and how."""
    p.add_argument("--dataset-name", type=Dataset, choices=list(Dataset), default=Dataset.SHAREGPT_CHAT)
    p.add_argument("--dataset-path", type=Path, required=True, help="the dataset the runs were sent from")
    p.add_argument("--tokenizer", required=True, help="the served model's tokenizer, as the sweep's")
    p.add_argument("--prime", type=int, default=20, help="the sweep's priming requests, sent first")


def asked_as_flagged(p: argparse.ArgumentParser, a: argparse.Namespace, num: int) -> list[PredictorInputs]:
    """asked_in_runs from the flags of dataset_args; a dataset that cannot have sent the runs is a usage error."""
    try:
        return asked_in_runs(a.dataset_name, a.dataset_path, a.tokenizer, num, a.prime)
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="a run's per-request CSV (`alise bench`), or it xz-compressed")
    dataset_args(p)
    p.add_argument("--worst", type=int, default=WORST, help="how many of the worst jobs to count by kind")
    a = p.parse_args(argv)
    runs = {path: read_run(path) for path in a.runs}
    num = max(r.index for results in runs.values() for r in results) + 1
    kinds = request_kinds(asked_as_flagged(p, a, num))
    for path, results in runs.items():
        print(path)
        for kind, s in breakdown(results, kinds, a.worst).items():
            tau = "n/a" if s.kendall_tau is None else f"{s.kendall_tau:.3f}"
            print(f"  {kind.value:14s} {s.jobs:5d} jobs  tau {tau}  normalized mean {s.mean:.4f} "
                  f"p99 {s.p99:.3f}  among the worst {a.worst}: {s.among_worst}")


if __name__ == "__main__":
    main()
