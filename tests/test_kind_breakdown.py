"""bench/kind_breakdown.py: a run's jobs by the predictor's kind of request, rebuilt from the dataset the sweep sent
them from, so the claim that first messages left the tail (session 40) can be read again from a saved run."""
from __future__ import annotations

import csv
import json

import pytest

from bench.kind_breakdown import breakdown, main, request_kinds
from bench.serve_metrics import RequestResult
from services.predictor.kind_reliability import RequestKind
from services.scheduler.validation import PredictorInputs

FIRST, LATER = RequestKind.FIRST_MESSAGE, RequestKind.LATER_TURN


def result(index: int, output_tokens: int, e2e_s: float, predicted: int) -> RequestResult:
    return RequestResult(index=index, expected_output_tokens=output_tokens, start_s=0.0, ok=True,
                         prompt_tokens=10, output_tokens=output_tokens, ttft_s=0.1, e2e_s=e2e_s, queue_s=0.0,
                         predicted_output_tokens=predicted)


def test_a_request_with_a_reply_before_it_is_a_later_turn():
    asked = [PredictorInputs("Hi there"), PredictorInputs("And then?\nAn answer.\nHi", 3, 9),
             PredictorInputs("Thanks", 0, 6)]
    assert request_kinds(asked) == [FIRST, LATER, FIRST]


def test_each_kind_counts_its_own_jobs_and_its_share_of_the_worst():
    kinds = [FIRST] * 10 + [LATER] * 10
    # first messages: ranked backwards and slow per token; later turns: ranked right and fast
    results = [result(i, 10 + i, 5.0, 100 - i) for i in range(10)] + \
              [result(10 + i, 10 + i, 0.5, 10 + i) for i in range(10)]
    results.append(RequestResult(index=5, expected_output_tokens=3, start_s=0.0, ok=False, error="UNAVAILABLE"))
    s = breakdown(results, kinds, worst=4)
    assert s[FIRST]["jobs"] == 10 and s[LATER]["jobs"] == 10            # the failed one is left out
    assert s[FIRST]["kendall_tau"] == pytest.approx(-1.0) and s[LATER]["kendall_tau"] == pytest.approx(1.0)
    assert s[FIRST]["among_worst"] == 4 and s[LATER]["among_worst"] == 0
    assert s[FIRST]["mean"] > s[LATER]["mean"] and s[FIRST]["p99"] >= s[FIRST]["mean"]


def test_the_command_rebuilds_the_runs_requests_from_the_dataset(tmp_path, model_dir, capsys):
    conversations = [{"conversations": [{"from": "human", "value": f"Question {i}?"},
                                        {"from": "gpt", "value": "An answer. " * (i + 1)},
                                        {"from": "human", "value": "Thanks!"},
                                        {"from": "gpt", "value": "You are welcome."}]} for i in range(3)]
    dataset = tmp_path / "chat.json"
    dataset.write_text(json.dumps(conversations))
    run = tmp_path / "run.csv"
    fields = list(RequestResult.__dataclass_fields__)
    with run.open("w", newline="") as f:       # priming took the first turn: later, first, later, first
        w = csv.DictWriter(f, fieldnames=[n for n in fields if n != "itl_s"], extrasaction="ignore")
        w.writeheader()
        for i in range(4):
            w.writerow({**result(i, 5, 1.0 + i, 5).__dict__, "admit_s": "", "repredicted_output_tokens": 0})
    main([str(run), "--dataset-path", str(dataset), "--tokenizer", str(model_dir), "--prime", "1", "--worst", "1"])
    out = capsys.readouterr().out
    assert "first_message      2 jobs" in out and "later_turn         2 jobs" in out
    assert "among the worst 1: 1" in out.splitlines()[1]          # the slowest (index 3): the third first message


def test_runs_that_the_dataset_cannot_have_sent_are_refused(tmp_path, model_dir, capsys):
    dataset = tmp_path / "chat.json"
    dataset.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi?"},
                                                      {"from": "gpt", "value": "Hello."}]}]))
    run = tmp_path / "run.csv"
    with run.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[n for n in RequestResult.__dataclass_fields__ if n != "itl_s"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerow({**result(3, 5, 1.0, 5).__dict__, "admit_s": ""})
    with pytest.raises(SystemExit):
        main([str(run), "--dataset-path", str(dataset), "--tokenizer", str(model_dir), "--prime", "0"])
    assert "requests; the runs need 0 priming + 4" in capsys.readouterr().err
