"""`alise bench serve`: workloads from dataset files, arrival times, the summary's arithmetic, and a run against
the live stack through the CLI."""
from __future__ import annotations

import csv
import json
import math

import pytest

from bench.serve import arrival_offsets
from bench.serve_metrics import RequestResult, meets, parse_goodput, summarize
from bench.workloads import Dataset, Limits, load, rendered_chat, trace_gaps
from client.cli import main as cli_main


def test_poisson_arrivals_have_the_asked_rate_and_inf_sends_everything_at_once():
    offsets = arrival_offsets(4000, rate=20.0, burstiness=1.0, seed=1)
    assert offsets == sorted(offsets) and offsets[0] == 0.0
    assert 4000 / offsets[-1] == pytest.approx(20.0, rel=0.08)
    bursty = arrival_offsets(4000, rate=20.0, burstiness=0.25, seed=1)
    gaps = [b - a for a, b in zip(bursty, bursty[1:])]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert cv > 1.5                     # gamma shape 0.25: coefficient of variation 2 (Poisson: 1)
    assert arrival_offsets(5, math.inf, 1.0, 0) == [0.0] * 5


AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def test_a_traces_gaps_keep_their_shape_at_the_asked_rate(tmp_path):
    trace = tmp_path / "trace.csv"         # a burst of three 0.1 s apart, a 9.8 s lull, then two 0.1 s apart
    trace.write_text(AZURE_HEADER + "".join(f"2023-11-16 18:15:{t},100,10\n"
                                            for t in ("00.0", "00.1", "00.2", "10.0", "10.1")))
    gaps = trace_gaps(trace)
    assert gaps == pytest.approx([0.1, 0.1, 9.8, 0.1], rel=1e-5)    # (epoch seconds as floats: ~0.2 us)
    offsets = arrival_offsets(5, rate=2.0, burstiness=1.0, seed=0, trace=gaps)
    assert 4 / offsets[-1] == pytest.approx(2.0)                 # the asked rate, exactly
    scaled = [b - a for a, b in zip(offsets, offsets[1:])]
    assert scaled == pytest.approx([g * scaled[0] / gaps[0] for g in gaps])   # the same shape
    longer = arrival_offsets(9, rate=2.0, burstiness=1.0, seed=0, trace=gaps)   # more requests: from the start again
    assert len(longer) == 9 and [b - a for a, b in zip(longer, longer[1:])][4:] == pytest.approx(
        [b - a for a, b in zip(longer, longer[1:])][:4])
    assert arrival_offsets(3, math.inf, 1.0, 0, trace=gaps) == [0.0] * 3
    with pytest.raises(ValueError, match="all 0"):               # a burst at once has no rate to be scaled to
        arrival_offsets(3, rate=2.0, burstiness=1.0, seed=0, trace=[0.0, 0.0, 1.0])


@pytest.mark.parametrize("rows", ["2023-11-16 18:15:01.0,1,1\n2023-11-16 18:15:00.0,1,1\n",    # backwards
                                  "2023-11-16 18:15:01.0,1,1\n"])                                # one arrival
def test_a_file_that_is_not_an_arrival_trace_is_refused(tmp_path, rows):
    bad = tmp_path / "bad.csv"
    bad.write_text(AZURE_HEADER + rows)
    with pytest.raises(ValueError, match="arrival trace"):
        trace_gaps(bad)


def test_the_arrival_flags_exclude_each_other_and_a_bad_trace_is_a_clear_exit(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["bench", "serve", "--dataset-name", "synthetic", "--burstiness", "0.5", "--arrival-trace", "x.csv"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err
    not_a_trace = tmp_path / "lengths.json"
    not_a_trace.write_text("[[10, 10]]")
    with pytest.raises(SystemExit, match="--arrival-trace .*not a readable Azure LLM trace"):
        cli_main(["--address", "127.0.0.1:1", "--api-key", "k", "bench", "serve", "--dataset-name", "synthetic",
                  "--num-prompts", "2", "--request-rate", "5", "--arrival-trace", str(not_a_trace)])


def result(i, out, e2e, ttft, ok=True, predicted=0):
    return RequestResult(index=i, expected_output_tokens=out, ok=ok, output_tokens=out, prompt_tokens=10,
                         e2e_s=e2e, ttft_s=ttft, predicted_output_tokens=predicted)


def test_summary_counts_throughput_latency_fairness_and_goodput():
    results = [result(i, out=(i + 1) * 10, e2e=float(i + 1), ttft=0.1 * (i + 1), predicted=(i + 1) * 7)
               for i in range(10)]
    results.append(RequestResult(index=10, expected_output_tokens=5, error="UNAVAILABLE: gone"))
    s = summarize(results, duration_s=10.0, percentiles=[50, 99], slo=parse_goodput(["ttft:450", "e2el:5000"]))
    assert (s["completed"], s["failed"]) == (10, 1) and s["errors"] == ["UNAVAILABLE: gone"]
    assert s["output_throughput"] == pytest.approx(sum(range(10, 101, 10)) / 10.0)
    assert s["normalized_latency_s"]["mean"] == pytest.approx(0.1)        # e2e (i+1) s over 10 (i+1) tokens
    assert s["ttft_s"]["p50"] == pytest.approx(0.55)
    assert s["fairness"]["shortest_half_mean_e2e_s"] == pytest.approx(3.0)
    assert s["fairness"]["longest_tenth_mean_e2e_s"] == pytest.approx(10.0)
    assert s["predictor_kendall_tau"] == pytest.approx(1.0)                 # predictions in the true order
    assert s["goodput"]["requests_meeting"] == 4                            # ttft <= 0.45 s and e2e <= 5 s


def test_goodput_specs_are_checked():
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput(["latency:5"])
    one_token = RequestResult(index=0, expected_output_tokens=1, ok=True, output_tokens=1, e2e_s=0.2, ttft_s=0.2)
    assert meets(one_token, {"tpot": 0.01})                                 # no TPOT with a single token


def test_sharegpt_and_azure_workloads(tmp_path, tokenizer):
    conv = [{"id": "a", "conversations": [
        {"from": "human", "value": "Tell me about lighthouses and the people who keep them."},
        {"from": "gpt", "value": "Lighthouses guide ships along dangerous coasts at night."},
        {"from": "human", "value": "ok"},                                    # too short: dropped
        {"from": "gpt", "value": "Glad to help with anything else you would like to know."}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conv))
    reqs = load(Dataset.SHAREGPT, path, 10, tokenizer)
    assert len(reqs) == 1 and reqs[0].prompt.startswith("Tell me")
    assert reqs[0].output_tokens == len(tokenizer.encode(conv[0]["conversations"][1]["value"]))
    trace = tmp_path / "azure.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5000000,40,12\n"
                     "2023-11-16 18:15:48.0000000,3000,10\n2023-11-16 18:15:49.2500000,24,7\n")
    reqs = load(Dataset.AZURE, trace, 10, tokenizer, limits=Limits())
    assert [r.output_tokens for r in reqs] == [12, 7]                       # the 3000-token prompt is over the limit
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 2.75])
    for r, n in zip(reqs, (40, 24)):
        assert abs(r.prompt_tokens - n) <= 1 and r.prompt_tokens == len(tokenizer.encode(r.prompt, add_special_tokens=False))


CHAT = [{"id": "c", "conversations": [
    {"from": "human", "value": "Name three rivers in Europe, please."},
    {"from": "gpt", "value": "The Danube, the Rhine and the Seine are three rivers in Europe."},
    {"from": "human", "value": "Which of them is the longest, and by how much?"},
    {"from": "gpt", "value": "The Danube is the longest of the three, at about 2,850 kilometres."},
    {"from": "human", "value": "And which countries does it flow through on its way?"},
    {"from": "gpt", "value": "Germany, Austria, Slovakia, Hungary, Croatia, Serbia, Romania, Bulgaria, Moldova and Ukraine."}]}]


def test_sharegpt_chat_sends_each_turn_with_its_history_trimmed_oldest_first(tmp_path, tokenizer):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(CHAT))
    reqs = load(Dataset.SHAREGPT_CHAT, path, 10, tokenizer)
    assert [len(r.history) for r in reqs] == [0, 2, 4]
    third = reqs[2]
    assert third.prompt.startswith("And which") and third.history[-1] == ("assistant", CHAT[0]["conversations"][3]["value"])
    assert third.messages()[-1] == {"role": "user", "content": third.prompt}
    assert third.prompt_tokens == len(tokenizer.encode(rendered_chat(third, tokenizer), add_special_tokens=False))
    assert reqs[0].prompt_tokens < reqs[1].prompt_tokens < third.prompt_tokens
    # a context limit between the second and third turn's size: the third keeps only its newest exchange
    trimmed = load(Dataset.SHAREGPT_CHAT, path, 10, tokenizer,
                   limits=Limits(max_prompt=third.prompt_tokens - 1, max_total=4096))
    assert [len(r.history) for r in trimmed] == [0, 2, 2]
    assert trimmed[2].history[0] == ("user", CHAT[0]["conversations"][2]["value"])


def test_sharegpt_chat_keeps_a_history_that_starts_mid_way_and_skips_control_tokens(tmp_path, tokenizer, model_dir):
    special = tokenizer.all_special_tokens[0]
    convs = [{"id": "mid", "conversations": [                                # starts mid-way, with a reply
        {"from": "gpt", "value": "As I said before, lighthouses are tall."},
        {"from": "human", "value": "Why are lighthouses usually painted in stripes?"},
        {"from": "gpt", "value": "Stripes make them easy to tell apart from the sea by day."}]},
        {"id": "ctl", "conversations": [
        {"from": "human", "value": f"Please repeat {special} back to me verbatim."},
        {"from": "gpt", "value": "I would rather not repeat control tokens back to anyone."}]}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(convs))
    reqs = load(Dataset.SHAREGPT_CHAT, path, 10, tokenizer)
    assert len(reqs) == 1 and reqs[0].prompt.startswith("Why are")
    assert reqs[0].history == (("assistant", convs[0]["conversations"][0]["value"]),)   # as the dataset has it
    # a template that refuses a conversation starting with a reply: that turn is skipped, the load goes on
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(model_dir)
    strict.chat_template = ("{% for m in messages %}{% if loop.first and m.role == 'assistant' %}"
                            "{{ raise_exception('start with a user turn') }}{% endif %}{{ m.content }}{% endfor %}")
    convs.append({"id": "ok", "conversations": [{"from": "human", "value": "Name a river in Africa, please."},
                                                 {"from": "gpt", "value": "The Nile is a river in Africa."}]})
    path.write_text(json.dumps(convs))
    assert [r.prompt for r in load(Dataset.SHAREGPT_CHAT, path, 10, strict)] == ["Name a river in Africa, please."]


def test_bench_serve_against_the_live_stack(stack_factory, tmp_path, capsys, model_dir, tokenizer):
    stack = stack_factory()
    out, trace = tmp_path / "result.json", tmp_path / "trace.csv"
    # arrivals with a trace's gaps: a 10 s lull, then a burst; at 20 req/s the second request leaves at 0.249 s
    trace.write_text(AZURE_HEADER + "".join(f"2023-11-16 18:15:{t},1,1\n" for t in ("00.00", "10.00", "10.01",
                                                                                     "10.02", "10.03", "10.04")))
    code = cli_main(["--address", stack.address, "--api-key", stack.api_key, *tls_args(stack),
                     "bench", "serve", "--dataset-name", "synthetic", "--num-prompts", "6", "--input-len", "24",
                     "--output-len", "8", "--ignore-eos", "--request-rate", "20", "--label", "t",
                     "--arrival-trace", str(trace), "--goodput", "e2el:600000", "--save-result", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads(out.read_text())
    assert summary["completed"] == 6 and summary["total_output_tokens"] == 48     # ignore_eos: exactly 8 each
    assert summary["goodput"]["requests_meeting"] == 6
    assert 0 < summary["ttft_s"]["mean"] <= summary["e2e_s"]["mean"]
    assert summary["predictor_kendall_tau"] is None or -1 <= summary["predictor_kendall_tau"] <= 1
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert len(rows) == 6 and all(r["ok"] == "True" and r["output_tokens"] == "8" for r in rows)
    assert summary["arrival_trace"] == str(trace)
    assert all(float(r["start_s"]) >= 0.24 for r in rows[1:])       # not before its time (Poisson: 0.09 s)
    assert "Output token throughput" in printed
    # as a chat (the model's template wraps each prompt), one cap for all, the model stopping by itself
    chat = tmp_path / "chat.json"
    code = cli_main(["--address", stack.address, "--api-key", stack.api_key, *tls_args(stack),
                     "bench", "serve", "--dataset-name", "synthetic", "--num-prompts", "3", "--input-len", "24",
                     "--output-len", "8", "--chat", "--max-tokens", "5", "--label", "c", "--save-result", str(chat)])
    assert code == 0, capsys.readouterr().out
    rows = list(csv.DictReader(open(chat.with_suffix(".csv"))))
    assert len(rows) == 3 and all(r["ok"] == "True" and 1 <= int(r["output_tokens"]) <= 5 for r in rows)
    assert all(int(r["prompt_tokens"]) > 24 + 8 for r in rows)             # the template's own tokens
    # ShareGPT turns with their history: sent as chats, the server counts the prompt the loader counted
    conv, turns = tmp_path / "conv.json", tmp_path / "turns.json"
    conv.write_text(json.dumps(CHAT))
    code = cli_main(["--address", stack.address, "--api-key", stack.api_key, *tls_args(stack),
                     "bench", "serve", "--dataset-name", "sharegpt-chat", "--dataset-path", str(conv),
                     "--tokenizer", str(model_dir), "--num-prompts", "3", "--max-tokens", "4", "--label", "h",
                     "--save-result", str(turns)])
    assert code == 0, capsys.readouterr().out
    rows = sorted(csv.DictReader(open(turns.with_suffix(".csv"))), key=lambda r: int(r["index"]))
    sent = load(Dataset.SHAREGPT_CHAT, conv, 3, tokenizer)
    assert [int(r["prompt_tokens"]) for r in rows] == [r.prompt_tokens for r in sent]


def test_bench_options_that_would_fail_every_request_are_refused_at_once(capsys):
    for bad in (["--max-tokens", "0"], ["--max-tokens", "-3"], ["--max-tokens", "5", "--ignore-eos"]):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["bench", "serve", "--dataset-name", "synthetic", *bad])
        assert exit_.value.code == 2
    assert "--max-tokens" in capsys.readouterr().err


def tls_args(stack) -> list[str]:
    return ["--tls-ca", str(stack.tls_files.ca)] if stack.tls_files else []


def test_only_jobs_that_ran_to_their_end_count_as_served():
    """Regression (review): a job that failed or was aborted counted as completed in throughput and latency."""
    from alise.v1 import generate_pb2 as pb

    from bench.serve import _record_complete

    for reason, ok in ((pb.FINISH_REASON_LENGTH, True), (pb.FINISH_REASON_STOP, True),
                       (pb.FINISH_REASON_ERROR, False), (pb.FINISH_REASON_ABORTED, False)):
        res = RequestResult(index=0, expected_output_tokens=4)
        _record_complete(res, pb.GenerateComplete(finish_reason=reason, usage=pb.Usage(completion_tokens=4)))
        assert res.ok is ok and res.finish_reason == pb.FinishReason.Name(reason)
