"""bench/kind_breakdown.py: a run's jobs by the predictor's kind of request, rebuilt from the dataset the sweep sent
them from, so the claim that first messages left the tail (session 40) can be read again from a saved run;
bench/kind_pull_replay.py: what the pull would have served for a run recorded without it; and
bench/kind_truth_replay.py: a run's predictions with one kind's made true."""
from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from bench import kind_pull_replay, kind_truth_replay
from bench.kind_breakdown import breakdown, main, request_kinds, side_of
from bench.serve import save
from bench.serve_metrics import RequestResult
from services.predictor.kind_reliability import RequestKind
from services.scheduler.validation import PredictorInputs

FIRST, LATER = RequestKind.FIRST_MESSAGE, RequestKind.LATER_TURN


def result(index: int, output_tokens: int, e2e_s: float, predicted: int) -> RequestResult:
    return RequestResult(index=index, expected_output_tokens=output_tokens, start_s=0.0, ok=True,
                         prompt_tokens=10, output_tokens=output_tokens, ttft_s=0.1, e2e_s=e2e_s, queue_s=0.0,
                         predicted_output_tokens=predicted)


def three_conversations(tmp_path):
    """A ShareGPT file of 3 conversations of 2 turns each: in order, first message, later turn, first, later, ..."""
    conversations = [{"conversations": [{"from": "human", "value": f"Question {i}?"},
                                        {"from": "gpt", "value": "An answer. " * (i + 1)},
                                        {"from": "human", "value": "Thanks!"},
                                        {"from": "gpt", "value": "You are welcome."}]} for i in range(3)]
    (tmp_path / "chat.json").write_text(json.dumps(conversations))
    return tmp_path / "chat.json"


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
    assert s[FIRST].jobs == 10 and s[LATER].jobs == 10            # the failed one is left out
    assert s[FIRST].kendall_tau == pytest.approx(-1.0) and s[LATER].kendall_tau == pytest.approx(1.0)
    assert s[FIRST].among_worst == 4 and s[LATER].among_worst == 0
    assert s[FIRST].mean > s[LATER].mean and s[FIRST].p99 >= s[FIRST].mean


def test_the_command_rebuilds_the_runs_requests_from_the_dataset(tmp_path, model_dir, capsys):
    dataset = three_conversations(tmp_path)
    save(tmp_path / "run.json", {}, [result(i, 5, 1.0 + i, 5) for i in range(4)])   # as a sweep writes a run
    # priming took the first turn: later, first, later, first
    main([str(tmp_path / "run.csv"), "--dataset-path", str(dataset), "--tokenizer", str(model_dir), "--prime", "1",
          "--worst", "1"])
    out = capsys.readouterr().out
    assert "first_message      2 jobs" in out and "later_turn         2 jobs" in out
    assert "among the worst 1: 1" in out.splitlines()[1]          # the slowest (index 3): the third first message


def test_runs_that_the_dataset_cannot_have_sent_are_refused(tmp_path, model_dir, capsys):
    dataset = tmp_path / "chat.json"
    dataset.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi?"},
                                                      {"from": "gpt", "value": "Hello."}]}]))
    save(tmp_path / "run.json", {}, [result(3, 5, 1.0, 5)])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run.csv"), "--dataset-path", str(dataset), "--tokenizer", str(model_dir), "--prime", "0"])
    assert "requests; the runs need 0 priming + 4" in capsys.readouterr().err


def test_a_run_recorded_without_the_pull_is_served_as_the_pull_would_have():
    """First messages predicted at random, later turns predicted right: once enough of both have been learned (600
    requests after arrival), the first messages' predictions are drawn together and the later turns' kept."""
    rng = np.random.default_rng(0)
    n = 2000
    later = rng.random(n) < 0.7
    lengths = np.exp(rng.uniform(2, 7, n)).round().astype(int) + 1
    predicted = np.where(later, lengths, np.exp(rng.uniform(2, 7, n)).round() + 1)
    asked = [PredictorInputs("a question", 300 if t else 0) for t in later]
    served = kind_pull_replay.pulled(predicted, lengths, side_of(asked), lag=600)
    settled = np.arange(n) >= 1400                              # past the lag and the pairs a fit needs
    assert np.allclose(served[~settled & (np.arange(n) < 600)], predicted[~settled & (np.arange(n) < 600)])
    assert np.allclose(served[settled & later], predicted[settled & later])
    spread = [np.ptp(np.log(x[settled & ~later])) for x in (predicted, served)]
    assert spread[1] < 0.5 * spread[0]


def test_the_pull_replay_writes_what_the_simulator_replays(tmp_path, model_dir):
    dataset = three_conversations(tmp_path)
    save(tmp_path / "run.json", {}, [result(i, 5 + i, 1.0, 40 + i) for i in range(4)])
    kind_pull_replay.main([str(tmp_path / "run.csv"), "--dataset-path", str(dataset), "--tokenizer", str(model_dir),
                           "--prime", "1", "--out", str(tmp_path / "pulled.csv")])
    rows = list(csv.DictReader((tmp_path / "pulled.csv").open()))
    assert [(int(r["index"]), int(r["expected_output_tokens"])) for r in rows] == [(i, 5 + i) for i in range(4)]
    assert [int(r["predicted_output_tokens"]) for r in rows] == [40 + i for i in range(4)]   # too few to pull


@pytest.mark.parametrize("kind, predicted", [(LATER, [5, 41, 7, 43, 44]), (FIRST, [40, 6, 42, 8, 44])])
def test_the_truth_replay_makes_one_kinds_predictions_true(tmp_path, model_dir, kind, predicted):
    dataset = three_conversations(tmp_path)       # after 1 priming request: later, first, later, first, later
    failed = dataclasses.replace(result(4, 9, 1.0, 44), ok=False, output_tokens=0)     # no length: kept as said
    save(tmp_path / "run.json", {}, [result(i, 5 + i, 1.0, 40 + i) for i in range(4)] + [failed])
    kind_truth_replay.main([str(tmp_path / "run.csv"), "--dataset-path", str(dataset), "--tokenizer",
                            str(model_dir), "--prime", "1", "--kind", kind.value, "--out", str(tmp_path / "t.csv")])
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert [int(r["expected_output_tokens"]) for r in rows] == [5, 6, 7, 8, 9]
    assert [int(r["predicted_output_tokens"]) for r in rows] == predicted
