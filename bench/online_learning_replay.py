"""What online learning would do for the predictor's ranking over a long run, offline (no GPU, no services).

A benchmark with a random-weight model forces every output's length (ignore_eos), so its predictor learns nothing
online unless the scheduler is told to (`--learn-forced-lengths`); in serving, every job that stops by itself
teaches it. This replays a dataset's requests in arrival order through a trained predictor: each chunk is
predicted, and a request's true length is learned `--lag` requests after it arrived (a job finishes seconds after
it arrives: at 42 req/s, 600 requests is ~14 s). It prints Kendall tau over the run and by thirds, with and without
learning, so the two live configurations can be compared before spending GPU time.

    python -m bench.online_learning_replay --model-dir .bench-data/predictor_880 --dataset-name sharegpt-chat \
        --dataset-path .bench-data/sharegpt_heldout_880.json --tokenizer .bench-data/llama3-8b-shape --num 3000 --lag 600

The requests are the sweep's (bench.workloads.load, its 20 priming ones first), and the predictor sees each as the
scheduler asks about it (services/scheduler/validation.predictor_inputs).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from alise.v1 import generate_pb2 as pb
from transformers import AutoTokenizer

from bench.workloads import BenchRequest, Dataset, load
from services.predictor.encoder import load_encoder
from services.predictor.length_predictor import LengthPredictor
from services.scheduler.tokenizer import PromptTokenizer
from services.scheduler.validation import PredictorInputs, predictor_inputs


def load_predictor(model_dir: Path) -> LengthPredictor:
    """As the predictor service loads it with its default flags."""
    predictor = LengthPredictor(load_encoder("auto", model_dir / "encoder"))
    predictor.load(model_dir)
    return predictor


def replay(predictor: LengthPredictor, asked: list[PredictorInputs], lengths: list[int],
           lag: int | None, chunk: int) -> np.ndarray:
    """Each request's predicted mean length, predicted when it arrives; with `lag`, requests that arrived `lag`
    or more before are learned first (None: nothing is learned)."""
    predicted = np.zeros(len(asked))
    learned = 0
    for start in range(0, len(asked), chunk):
        if lag is not None and (upto := max(0, start - lag)) > learned:
            predictor.observe(lengths=lengths[learned:upto], **columns(asked[learned:upto]))
            learned = upto
        end = min(start + chunk, len(asked))
        predicted[start:end] = [p.mean for p in predictor.predict(**columns(asked[start:end]))]
    return predicted


def columns(asked: list[PredictorInputs]) -> dict[str, list]:
    """The predictor's per-request arguments, as lists."""
    return {"prompts": [a.text for a in asked], "previous_reply_tokens": [a.previous_reply_tokens for a in asked],
            "newest_message_chars": [a.newest_message_chars for a in asked]}


def as_the_scheduler_asks(req: BenchRequest, tok) -> PredictorInputs:
    """What the predictor is told about a request as the bench sends it (bench/serve.py)."""
    text = (dict(chat=pb.ChatConversation(messages=[pb.ChatMessage(**m) for m in req.messages()]))
            if req.as_chat else dict(prompt=req.prompt))
    return predictor_inputs(pb.GenerateRequest(**text), tok)


def taus(predicted: np.ndarray, lengths: list[int]) -> list[float]:
    """Kendall tau over the whole run, then over each third."""
    true = np.asarray(lengths)
    parts = [slice(None)] + [slice(k * len(true) // 3, (k + 1) * len(true) // 3) for k in range(3)]
    return [float(kendalltau(predicted[s], true[s])[0]) for s in parts]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True, help="a trained predictor (services.predictor.train)")
    p.add_argument("--dataset-name", type=Dataset, choices=list(Dataset), default=Dataset.SHAREGPT_CHAT)
    p.add_argument("--dataset-path", type=Path, required=True)
    p.add_argument("--tokenizer", required=True, help="the served model's tokenizer (output lengths in its tokens)")
    p.add_argument("--num", type=int, default=3000, help="measured requests (the sweep's --num-prompts)")
    p.add_argument("--prime", type=int, default=20, help="the sweep's priming requests, sent first")
    p.add_argument("--lag", type=int, nargs="+", default=[600], help="requests between arrival and learning")
    p.add_argument("--chunk", type=int, default=20)
    p.add_argument("--out-predictions", type=Path, default=None,
                   help="write each lag's predictions here (PATH with the lag before its suffix) as a live run's "
                        "per-request CSV: bench.simulate --predictions replays them")
    a = p.parse_args(argv)
    if a.chunk < 1 or min(a.lag) < 0:        # a negative lag would learn a length before predicting it
        p.error("--chunk must be >= 1 and every --lag >= 0")
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    requests = load(a.dataset_name, a.dataset_path, a.num + a.prime, tokenizer)
    tok = PromptTokenizer(a.tokenizer)
    asked = [as_the_scheduler_asks(r, tok) for r in requests]
    lengths = [r.output_tokens for r in requests]
    print(f"{len(asked)} requests; Kendall tau over the run, then by thirds")
    for lag in [None, *a.lag]:
        predicted = replay(load_predictor(a.model_dir), asked, lengths, lag, a.chunk)   # fresh each
        label = "no online learning" if lag is None else f"learning {lag} requests after arrival"
        measured = taus(predicted[a.prime:], lengths[a.prime:])        # as the sweep reports: priming left out
        print(f"{label:40s} " + " ".join(f"{t:.3f}" for t in measured), flush=True)
        if a.out_predictions:
            tag = "no_learning" if lag is None else f"lag{lag}"
            out = a.out_predictions.with_name(f"{a.out_predictions.stem}_{tag}{a.out_predictions.suffix}")
            write_predictions(out, predicted[a.prime:], lengths[a.prime:])


def write_predictions(path: Path, predicted: np.ndarray, lengths: list[int]) -> None:
    """The columns of a live run's CSV that bench.simulate's --predictions reads (index: after the priming)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "expected_output_tokens", "predicted_output_tokens"])
        w.writerows((i, n, round(float(x))) for i, (x, n) in enumerate(zip(predicted, lengths)))


if __name__ == "__main__":
    main()
