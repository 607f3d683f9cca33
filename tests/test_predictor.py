"""The length predictor: dataset readers, learning, distribution, persistence, and its gRPC service."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import grpc
import numpy as np
import pytest
from alise.v1 import predictor_pb2 as ppb
from alise.v1 import predictor_pb2_grpc as ppb_grpc

from services.common.auth import with_bearer
from services.common.local_stack import free_port, wait_healthy
from tests.helpers import predictor_stub, wait_until
from services.predictor.datasets import load_examples
from services.predictor.encoder import Encoder
from services.predictor.length_predictor import Basis, LengthPredictor, PredictorParams


def test_dataset_formats(tmp_path):
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Add", "input": "1 and 2", "output": "3"}]))
    (tmp_path / "eval.json").write_text(json.dumps([{"instruction": "Hi", "output": "Hello!", "generator": "m1"}]))
    (tmp_path / "sg.json").write_text(json.dumps([{"id": "a", "conversations": [
        {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}]))
    (tmp_path / "plain.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    assert [(e.prompt, e.response) for e in load_examples(tmp_path / "alpaca.json")] == [("Add\n1 and 2", "3")]
    assert load_examples(tmp_path / "eval.json")[0].source == "m1"
    sg = load_examples(tmp_path / "sg.json")
    assert [(e.prompt, e.response) for e in sg] == [("Q1", "A1"), ("Q2\nA1\nQ1", "A2")]   # newest turn first
    assert [e.previous_reply for e in sg] == ["", "A1"]
    assert sg[0].group == sg[1].group != load_examples(tmp_path / "alpaca.json")[0].group  # split by conversation
    assert load_examples(tmp_path / "plain.jsonl")[0].response == "r"
    (tmp_path / "bad.json").write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(ValueError, match="unknown format"):
        load_examples(tmp_path / "bad.json")


def test_training_examples_see_a_conversation_as_the_scheduler_asks_about_it(tmp_path, model_dir):
    """The predictor learns from ShareGPT turns what the scheduler will tell it about a chat: the same text, and the
    newest message counted the same (the user's last message without its outer spaces, clipped as predictor_text
    clips it; none where the last turn is not the user's: review, session 37, the reader counted the user's earlier
    message under a second assistant turn, and a message's outer spaces)."""
    from alise.v1 import generate_pb2 as gpb

    from services.common.predictor_text import NEWEST_CHARS
    from services.scheduler.tokenizer import PromptTokenizer
    from services.scheduler.validation import predictor_inputs

    turns = [("human", "Tell me about Rome, in detail please."), ("gpt", "Rome was founded... " * 20),
             ("human", "  Thanks! "), ("gpt", "You are welcome."), ("human", "x" * (NEWEST_CHARS + 10)), ("gpt", "Ok."),
             ("gpt", "And one more thing.")]
    (tmp_path / "sg.json").write_text(json.dumps([{"id": "c", "conversations": [
        {"from": r, "value": v} for r, v in turns]}]))
    examples = load_examples(tmp_path / "sg.json")
    assert [e.newest_message_chars for e in examples] == [37, 7, NEWEST_CHARS, 0]
    tok = PromptTokenizer(str(model_dir))
    roles = {"human": "user", "gpt": "assistant"}
    for n, example in zip((1, 3, 5, 6), examples, strict=True):
        chat = gpb.ChatConversation(messages=[gpb.ChatMessage(role=roles[r], content=v) for r, v in turns[:n]])
        asked = predictor_inputs(gpb.GenerateRequest(chat=chat), tok)
        assert (asked.text, asked.newest_message_chars) == (example.prompt, example.newest_message_chars)
    assert predictor_inputs(gpb.GenerateRequest(prompt="Thanks!"), tok).newest_message_chars == 0   # not a chat


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


def test_learns_ranks_and_persists(encoder, tmp_path):
    pred = LengthPredictor(encoder)
    first = pred.predict(["Write a detailed essay about the history of Rome."])[0]
    assert first.basis is Basis.PRIOR and first.neighbours == 0 and not first.message_votes
    pred.observe(["Write a detailed essay about the history of Greece.", "Answer yes or no: is water wet?"], [800, 3])
    long_, short = pred.predict(["Write a detailed essay about the history of Rome.", "Answer yes or no: is water cold?"])
    assert long_.neighbours >= 1 and long_.p50 > 300 and short.p50 < 30
    assert long_.p10 <= long_.p50 <= long_.p90 and list(long_.deciles) == sorted(long_.deciles)
    pred.save(tmp_path / "model")
    again = LengthPredictor(encoder)
    again.load(tmp_path / "model")
    assert again.size == 2
    assert again.predict(["Answer yes or no: is water cold?"])[0].p50 == pytest.approx(short.p50, rel=1e-3)
    from services.predictor.static_encoder import StaticEncoder, base_static_dir

    with pytest.raises(ValueError, match="built with encoder minilm"):      # another embedding space: refused
        LengthPredictor(StaticEncoder(base_static_dir())).load(tmp_path / "model")


def test_previous_reply_length_is_learned_as_a_feature(encoder):
    """In a conversation the assistant's previous reply length is a request feature: with the same words,
    a conversation of long replies must be predicted longer than one of short replies."""
    rng = np.random.default_rng(0)
    pred = LengthPredictor(encoder, retrain_every=256)
    prev = rng.integers(5, 1000, size=400)
    pred.observe([f"Please go on with part {i} of the story." for i in range(400)],
                 [int(p * rng.uniform(0.8, 1.25)) + 1 for p in prev], prev.tolist())
    short, long_ = pred.predict(["Please go on with the next part of the story."] * 2, [10, 800])
    assert long_.p50 > 3 * short.p50


def test_service_persists_online_learning_and_survives_a_corrupt_file(tmp_path):
    model_dir = tmp_path / "predictor"
    started = {}

    def start(*extra: str):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "services.predictor.server", "--listen", f"127.0.0.1:{port}",
                                 "--model-dir", str(model_dir), "--prior", "40", *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_healthy(f"127.0.0.1:{port}", 90)
        channel = with_bearer(grpc.insecure_channel(f"127.0.0.1:{port}"), os.environ["ALISE_SERVICE_TOKEN"])
        started["address"] = f"127.0.0.1:{port}"
        return proc, ppb_grpc.PredictorStub(channel), channel

    proc, stub, channel = start()
    stub.Observe(ppb.ObserveRequest(observations=[ppb.Observation(prompt="Tell me a long story.", output_tokens=700)]))
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(ppb.PredictRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompts" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(ppb.PredictRequest(prompts=["ok", "x" * 300_000]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("prompts[1]")
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(ppb.PredictRequest(prompts=["a", "b"], previous_reply_tokens=[3]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "previous_reply_tokens" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(ppb.PredictRequest(prompts=["a", "b"], newest_message_chars=[3, 4, 5]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "newest_message_chars" in err.value.details()
    for name in ("previous_reply_tokens", "newest_message_chars"):
        for bad in (-1, 2 ** 31 - 1):                       # past any real reply or message
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(ppb.PredictRequest(prompts=["a", "b"], **{name: [3, bad]}))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith(f"{name}[1]: must be in [0, ")
            with pytest.raises(grpc.RpcError) as err:
                stub.Observe(ppb.ObserveRequest(observations=[ppb.Observation(prompt="a", output_tokens=3,
                                                                              **{name: bad})]))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith(f"observations[0].{name}")
    raw = ppb.PredictRequest(prompts=["AAAA"]).SerializeToString().replace(b"AAAA", b"\xff\xfe\xfd\xfc")
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/alise.v1.Predictor/Predict")(raw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompts[0]: invalid UTF-8" in err.value.details()
    # issue 8.8: nobody without the service token may predict or teach (1,000 fake observations used to move
    # a prediction from 211 to 2e9 tokens), and no observation may claim an impossible length
    for wrong in (ppb_grpc.PredictorStub(grpc.insecure_channel(started["address"])),
                  predictor_stub(started["address"], token="not-the-service-token")):
        for call in (lambda: wrong.Predict(ppb.PredictRequest(prompts=["hi"])),
                     lambda: wrong.Observe(ppb.ObserveRequest(observations=[ppb.Observation(prompt="hi",
                                                                                            output_tokens=2_000_000_000)]))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.Observe(ppb.ObserveRequest(observations=[ppb.Observation(prompt="hi", output_tokens=2_000_000_000)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "observations[0].output_tokens" in err.value.details()
    proc.terminate()
    proc.wait(30)                                     # SIGTERM saves what was learned
    proc, stub, _ = start()
    p = stub.Predict(ppb.PredictRequest(prompts=["Tell me a long story, please."])).predictions[0]
    assert p.neighbours == 1 and p.p50 > 300
    proc.terminate()
    proc.wait(30)
    # --read-only (benchmark sweeps): it learns in memory but never writes the model, so one run cannot teach
    # the next the lengths of the same prompts
    proc, stub, _ = start("--read-only")
    stub.Observe(ppb.ObserveRequest(observations=[ppb.Observation(prompt="Name a colour.", output_tokens=3)]))
    learned = stub.Predict(ppb.PredictRequest(prompts=["Name a colour."])).predictions[0]
    assert learned.neighbours == 1 and learned.p50 < 10                       # learned in memory
    proc.terminate()
    proc.wait(30)
    proc, stub, _ = start()
    assert stub.Predict(ppb.PredictRequest(prompts=["Name a colour."])).predictions[0].neighbours == 0   # not saved
    proc.terminate()
    proc.wait(30)
    (model_dir / "index.npz").write_bytes(b"garbage")  # corrupt: an error in the log and a clean empty start
    proc, stub, _ = start()
    p = stub.Predict(ppb.PredictRequest(prompts=["Tell me a long story."])).predictions[0]
    assert p.basis == ppb.PREDICTION_BASIS_PRIOR and p.p50 == pytest.approx(40)   # the configured prior, not a default
    proc.terminate()
    assert b"cannot read predictor" in proc.communicate(timeout=30)[1]
    assert (model_dir / "index.npz.unreadable").read_bytes() == b"garbage"     # kept aside, not overwritten


def test_setting_state_aside_never_fails_a_start(tmp_path):
    """Review, session 38: a file that could not be renamed (a read-only volume; here a folder in the way) raised out
    of the server's start, so a corrupt state became a crash loop."""
    from services.predictor.length_predictor import LengthPredictor, set_aside

    for name in ("index.npz", "params.json"):
        (tmp_path / name).write_bytes(b"garbage")
    (tmp_path / "index.npz.unreadable").mkdir()
    (tmp_path / "index.npz.unreadable" / "x").write_text("x")
    assert set_aside(tmp_path, LengthPredictor.STATE_FILES) == ["params.json.unreadable"]
    assert (tmp_path / "index.npz").read_bytes() == b"garbage" and not (tmp_path / "params.json").exists()


def test_learns_from_the_observation_stream_and_resumes_where_it_saved(redis_server, tmp_path):
    import redis

    from services.common.observations import STREAM

    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    r.delete(STREAM)
    model_dir = tmp_path / "predictor"
    r.xadd(STREAM, {"job_id": "a", "prompt": "Write a very long story about dragons.", "output_tokens": 900,
                    "previous_reply_tokens": 0})
    r.xadd(STREAM, {"job_id": "bad", "prompt": "", "output_tokens": "x"})          # skipped, not fatal
    last = r.xadd(STREAM, {"job_id": "b", "prompt": "Say hi.", "output_tokens": 2, "previous_reply_tokens": 0})

    metrics_port = free_port()

    def start():
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "services.predictor.server", "--listen", f"127.0.0.1:{port}",
                                 "--model-dir", str(model_dir), "--redis-url", redis_server.url,
                                 "--metrics-port", str(metrics_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(f"127.0.0.1:{port}", 90)
        return proc, predictor_stub(f"127.0.0.1:{port}")

    def size(stub):
        return stub.Observe(ppb.ObserveRequest()).index_size

    def learned(stub, prompt):
        return stub.Predict(ppb.PredictRequest(prompts=[prompt])).predictions[0]

    proc, stub = start()
    wait_until(lambda: size(stub) == 2, 30)
    assert learned(stub, "Write a very long story about knights.").p50 > learned(stub, "Say hello.").p50
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'alise:predictor_observations_total{source="stream"} 2.0' in scraped
    assert "alise:predictor_index_entries 2.0" in scraped and "alise:predictor_batch_prompts_count" in scraped
    assert 'alise:predictor_kind_slope{kind="first_message"} 1.0' in scraped      # too few finished to pull by
    proc.terminate()
    proc.wait(30)
    assert json.loads((model_dir / "meta.json").read_text())["stream_position"] == last   # saved with the index
    r.xadd(STREAM, {"job_id": "c", "prompt": "List three colours.", "output_tokens": 12, "previous_reply_tokens": 0})
    proc, stub = start()
    try:
        wait_until(lambda: size(stub) == 3, 30)
    finally:
        proc.terminate()
        proc.wait(30)
    with np.load(model_dir / "index.npz") as index:                  # resumed after its saved position:
        assert index["counts"].tolist() == [1.0, 1.0, 1.0]            # nothing learned twice, nothing lost


@pytest.mark.parametrize("encoder_args", [["--finetune", "--epochs", "1"], ["--encoder", "static"]],
                         ids=["minilm-finetuned", "static"])
def test_train_cli_then_serve(tmp_path, encoder_args):
    topics = ["rivers", "cats", "taxes", "stars", "bread", "chess", "rain", "music", "trains", "glass"]
    rows = [{"instruction": f"Write {n} sentences about {t}.", "input": "", "output": " ".join(["Word."] * (8 * n))}
            for n in (1, 2, 4, 8, 16, 32) for t in topics]
    (tmp_path / "tiny.json").write_text(json.dumps(rows))
    out = tmp_path / "model"
    done = subprocess.run([sys.executable, "-m", "services.predictor.train", str(tmp_path / "tiny.json"),
                           "--out", str(out), *encoder_args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["prompts"] == 60
    if summary["encoder"] == "static":                                         # always kept, always static
        assert (out / "encoder" / "static_encoder.npz").exists() and summary["encoder_val_kendall_tau"] > 0.5
    else:
        assert (out / "encoder").is_dir() == summary["kept_finetuned_encoder"]  # kept only if it ranks better
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "services.predictor.server", "--listen", f"127.0.0.1:{port}",
                             "--model-dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"127.0.0.1:{port}", 90)
        stub = predictor_stub(f"127.0.0.1:{port}")
        short, long_ = stub.Predict(ppb.PredictRequest(prompts=["Write 1 sentences about snow.",
                                                                 "Write 32 sentences about snow."])).predictions
        assert short.basis not in (ppb.PREDICTION_BASIS_PRIOR, ppb.PREDICTION_BASIS_UNSPECIFIED)
        assert long_.p50 > short.p50
    finally:
        proc.terminate()
        proc.wait(30)


def test_index_deduplicates_and_evicts_oldest_first():
    from services.predictor.knn_index import KnnIndex

    idx = KnnIndex(4, max_entries=10)
    v = np.eye(4, dtype=np.float32)
    sims, logs = idx.search(v[:1], 3)                             # empty: no neighbour (a predictor's first call)
    assert np.isneginf(sims).all() and not logs.any() and (idx.neighbours(v[:1], 3)[1] == -1).all()
    idx.add(v[:2], [10, 20], ["a", "b"])
    idx.add(v[:1], [40], ["a"])                                   # same prompt again: running mean in log space
    assert len(idx) == 2 and np.exp(idx.log_lengths[0]) == pytest.approx(20.0)
    idx.add(np.tile(v, (3, 1)), list(range(1, 13)), [f"k{i}" for i in range(12)])
    assert len(idx) <= 10 and "a" not in idx.keys and idx.keys[-1] == "k11"
    sims, logs = idx.search(v[3:4], 2)
    assert sims[0, 0] == pytest.approx(1.0) and np.exp(logs[0, 0]) in (4, 8, 12)


def test_learning_adds_to_the_built_index_instead_of_rebuilding_it(monkeypatch):
    """Every observation used to drop the faiss index, so the next search rebuilt it under the predictor's lock: past
    exact_limit that is a k-means training of the IVF cells per observation, and predictions missed their deadline
    (found by review). Now new entries join the built index, findable at once, with no rebuild."""
    import faiss

    from services.predictor.knn_index import KnnIndex

    builds = []                                                   # every index faiss is asked to make
    for name in ("IndexFlatIP", "index_factory"):
        make = getattr(faiss, name)
        monkeypatch.setattr(faiss, name, lambda *a, make=make, name=name: builds.append(name) or make(*a))
    rng = np.random.default_rng(0)

    def unit(n):
        v = rng.normal(size=(n, 32)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    exact, ivf = KnnIndex(32, exact_limit=10_000), KnnIndex(32, exact_limit=50, nlist=4, nprobe=4)
    first = unit(200)
    for idx in (exact, ivf):
        idx.add(first, [10] * 200, [f"k{i}" for i in range(200)])
        idx.search(first[:1], 3)
    assert builds == ["IndexFlatIP", "index_factory"]
    for i in range(20):
        v = unit(1)
        for idx in (exact, ivf):
            idx.add(v, [5 + i], [f"new{i}"])
            sims, logs = idx.search(v, 1)
            assert sims[0, 0] == pytest.approx(1.0, abs=0.05) and np.exp(logs[0, 0]) == pytest.approx(5 + i)
    assert builds == ["IndexFlatIP", "index_factory"]             # neither was rebuilt
    rebuilt = KnnIndex(32, exact_limit=10_000)
    rebuilt.load_state(exact.state())
    q = unit(5)
    np.testing.assert_allclose(exact.search(q, 4)[0], rebuilt.search(q, 4)[0], rtol=1e-6)   # as if built anew


def test_without_faiss_the_index_finds_the_same_neighbours_exactly(monkeypatch):
    """The GPU benchmark machines carry no faiss wheel (it alone would pass the 64 MiB a device call carries): the
    index then searches exactly in numpy, and must give what faiss's IndexFlatIP gives, learning included."""
    import faiss

    from services.predictor import knn_index
    from services.predictor.knn_index import KnnIndex, exact_search

    rng = np.random.default_rng(1)

    def unit(n):
        v = rng.normal(size=(n, 24)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    base, queries = unit(500), unit(40)
    flat = faiss.IndexFlatIP(24)
    flat.add(base)
    want_sims, want_ids = flat.search(queries, 7)
    sims, ids = exact_search(base, queries, 7)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(sims, want_sims, rtol=1e-5, atol=1e-6)
    extra = unit(10)
    with_faiss, without = KnnIndex(24), KnnIndex(24)
    for idx, have in ((with_faiss, True), (without, False)):
        monkeypatch.setattr(knn_index, "HAVE_FAISS", have)
        idx.add(base, list(range(1, 501)), [f"k{i}" for i in range(500)])
        idx.search(queries[:1], 3)                                # built (with faiss), then learns more
        idx.add(extra, list(range(600, 610)), [f"n{i}" for i in range(10)])
    monkeypatch.setattr(knn_index, "HAVE_FAISS", True)
    got_faiss = with_faiss.search(queries, 5)
    monkeypatch.setattr(knn_index, "HAVE_FAISS", False)
    got_numpy = without.search(queries, 5)
    np.testing.assert_allclose(got_numpy[0], got_faiss[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_numpy[1], got_faiss[1])
    assert without._faiss is None                                 # nothing of faiss was built


def test_static_encoder_is_a_faithful_fast_copy_of_minilm(encoder, tmp_path):
    from services.predictor.static_encoder import StaticEncoder, base_static_dir

    static = StaticEncoder(base_static_dir())
    texts = ["Write a long essay about the French revolution.", "Compose an extended essay on the French revolution.",
             "What is 2 + 2?", "Add two and two."]
    vecs = static.encode(texts)
    assert vecs.shape == (4, encoder.dim) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    sims = vecs @ vecs.T
    assert sims[0, 1] > sims[0, 2] and sims[2, 3] > sims[2, 1]          # paraphrases closer than other topics
    teacher = encoder.encode(texts)
    assert np.corrcoef((vecs @ vecs.T).ravel(), (teacher @ teacher.T).ravel())[0, 1] > 0.8
    static.save(tmp_path / "copy")
    copy = StaticEncoder(tmp_path / "copy")                  # saved in the precision it was stored in
    assert np.allclose(copy.encode(texts), vecs, atol=1e-6) and copy.fingerprint == static.fingerprint


def test_concurrent_calls_are_served_in_one_batch_with_the_same_answers(encoder):
    import asyncio

    from services.predictor.batcher import PredictBatcher

    # a conversation line that decides alone: each answer depends on its own previous reply and newest message
    params = PredictorParams(reply_weight=1.0, reply_a=3.0, reply_b=0.5, reply_c=0.4, reply_sd=0.5, reply_turns=100)
    pred = LengthPredictor(encoder, params)
    pred.observe(["Write a long poem about the sea.", "Reply with one word."], [400, 1])
    prompts = [f"Write a poem about the sea, version {i}." for i in range(10)] + ["Reply with one word: yes?"]
    alone = [pred.predict([p], [50], [5 * i + 1])[0] for i, p in enumerate(prompts)]
    assert len({round(a.p50, 3) for a in alone}) == len(prompts)
    batcher = PredictBatcher(pred)

    async def many():
        return await asyncio.gather(*(batcher.predict([p], [50], [5 * i + 1]) for i, p in enumerate(prompts)))

    together = [r[0] for r in asyncio.run(many())]
    assert batcher.calls == len(prompts) and batcher.batches < len(prompts)       # coalesced
    assert [t.p50 for t in together] == pytest.approx([a.p50 for a in alone], rel=1e-4)


def test_a_caller_that_gives_up_does_not_hang_the_others_in_its_batch(encoder):
    """Regression (issue 8.10): set_result on a cancelled caller's future raised, so the rest of its
    batch never got an answer."""
    import asyncio
    import threading

    from services.predictor.batcher import PredictBatcher

    gate = threading.Event()
    pred = LengthPredictor(encoder)
    slow_predict = pred.predict
    pred.predict = lambda prompts, prev=None, newest=None: (gate.wait(30), slow_predict(prompts, prev, newest))[1]
    batcher = PredictBatcher(pred)

    async def scenario():
        first = asyncio.ensure_future(batcher.predict(["warm the batcher up"], [0], [0]))   # holds the encoder
        await asyncio.sleep(0.05)
        quitter = asyncio.ensure_future(batcher.predict(["I give up early"], [0], [0]))
        stayer = asyncio.ensure_future(batcher.predict(["I wait for my answer"], [0], [0]))
        await asyncio.sleep(0.05)
        quitter.cancel()                              # its deadline passed while queued behind `first`
        gate.set()
        return await asyncio.wait_for(asyncio.gather(first, stayer), 60)

    first, stayer = asyncio.run(scenario())
    assert first[0].p50 > 0 and stayer[0].p50 > 0


def test_predict_does_not_wait_for_an_online_mlp_refresh(encoder):
    import threading

    from services.predictor.length_mlp import side_features

    rng = np.random.default_rng(1)
    pred = LengthPredictor(encoder, retrain_every=1)
    vecs = rng.standard_normal((40_000, encoder.dim)).astype(np.float32)
    side = side_features([16])[0]
    pred._replay = [(v, side, 4.0) for v in vecs]          # a large buffer: a slow refresh
    learner = threading.Thread(target=pred.observe, args=(["Tell me a story."], [300]))
    learner.start()
    wait_until(lambda: pred._training, 30, interval=0.001)
    assert pred.predict(["Tell me a story, please."])[0].p50 > 0
    assert pred._training                      # answered while the refresh was still running, not after it
    learner.join(120)
    assert not pred._training and pred.mlp is not None


def test_evaluate_cli_splits_by_conversation_and_reports_every_baseline(tmp_path):
    topics = ["rivers", "cats", "taxes", "stars", "bread", "chess", "rain", "music", "trains", "glass"]
    convs = []
    for i in range(60):                    # each conversation is either terse or verbose, turn after turn
        words = 4 if i % 2 else 150
        turns = []
        for j in range(3):
            turns += [{"from": "human", "value": f"Tell me about {topics[(i + j) % 10]}, part {j}."},
                      {"from": "gpt", "value": " ".join(["word"] * (words + j))}]
        convs.append({"id": f"c{i}", "conversations": turns})
    (tmp_path / "chats.json").write_text(json.dumps(convs))
    out = tmp_path / "eval.json"
    done = subprocess.run([sys.executable, "-m", "services.predictor.evaluate", str(tmp_path / "chats.json"),
                           "--out", str(out), "--plot-dir", str(tmp_path), "--repeats", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    r = report["offline"][0]
    spread = report["repeats"][0]["kendall_tau"]["alise"]                    # two different held-out splits
    assert len(spread["values"]) == 2 and spread["mean"] == pytest.approx(np.mean(spread["values"]))
    assert r["split_by"] == "conversation" and r["test"] % 3 == 0 and r["examples"] == 180   # whole conversations
    for name in ("alise", "ablation_no_reply_line", "ablation_no_previous_reply", "baseline_knn_only",
                 "baseline_mlp_only", "baseline_prompt_length", "baseline_global_mean"):
        assert {"kendall_tau", "spearman", "mae_tokens", "bucket_accuracy"} <= set(r[name])
    assert r["alise"]["kendall_tau"] > 0.5 and 0.85 <= r["alise"]["p90_coverage"] <= 1.0   # learnable from history
    assert (tmp_path / "predictor_scatter_chats.png").stat().st_size > 1000


def test_stream_entries_outside_a_real_observations_bounds_are_not_learned():
    """Observe refuses lengths past MAX_OUTPUT_TOKENS; the stream did not: an entry of 10^40 tokens was learned as a
    log length of inf, and the next MLP refresh turned every prediction into NaN (found by review)."""
    from services.common.observations import MAX_NEWEST_MESSAGE_CHARS, MAX_OUTPUT_TOKENS, MAX_PROMPT_CHARS, parse

    ok = {"prompt": "Say hi.", "output_tokens": "2", "previous_reply_tokens": "0"}
    assert parse(ok) is not None and parse(ok).newest_message_chars == 0       # an entry from before the field
    assert parse({**ok, "newest_message_chars": "7"}).newest_message_chars == 7
    for bad in ({"output_tokens": "1" + "0" * 40}, {"output_tokens": str(MAX_OUTPUT_TOKENS + 1)},
                {"previous_reply_tokens": "1" + "0" * 40}, {"prompt": "x" * (MAX_PROMPT_CHARS + 1)},
                {"newest_message_chars": "-1"}, {"newest_message_chars": str(MAX_NEWEST_MESSAGE_CHARS + 1)}):
        assert parse({**ok, **bad}) is None, bad


def test_the_online_learning_replay_learns_only_what_has_finished_and_asks_as_the_scheduler(encoder, model_dir,
                                                                                             tmp_path):
    """bench/online_learning_replay.py: with a lag, what arrived that many requests before is learned, so the later
    requests are ranked; without, every prediction is the prior. It asks about a chat as the scheduler does."""
    from bench.online_learning_replay import as_the_scheduler_asks, replay, taus, write_predictions
    from bench.simulate import recorded_predictions
    from bench.workloads import BenchRequest
    from services.scheduler.tokenizer import PromptTokenizer
    from services.scheduler.validation import PredictorInputs

    topics = ["Rome", "Greece", "Egypt", "Persia", "China", "India", "Peru", "Mali", "Japan", "Norway"]
    prompts, lengths = [], []
    for i, topic in enumerate(topics * 3):
        long_ = i % 2 == 0
        prompts.append(f"Write a detailed essay about the history of {topic}." if long_
                       else f"Answer yes or no: is {topic} in Europe?")
        lengths.append(800 + i if long_ else 3 + i % 5)
    asked = [PredictorInputs(p, 0, 0) for p in prompts]
    blind = replay(LengthPredictor(encoder), asked, lengths, lag=None, chunk=5)
    assert len(set(blind)) == 1                                   # the prior for every request
    learning = replay(LengthPredictor(encoder), asked, lengths, lag=5, chunk=5)
    assert taus(learning, lengths)[3] > 0.5                       # the last third is ranked
    write_predictions(tmp_path / "p.csv", learning, lengths)      # for the simulator to replay
    rows = [(10, n, 0, ()) for n in lengths]                      # (prompt, output, ..): as bench.simulate's rows
    assert recorded_predictions(tmp_path / "p.csv", rows) == [round(float(x)) for x in learning]
    chat = BenchRequest("And Italy?", 5, history=(("user", "Capital of France?"), ("assistant", "Paris, of course.")),
                        as_chat=True)
    tok = PromptTokenizer(str(model_dir))
    assert as_the_scheduler_asks(chat, tok) == PredictorInputs("And Italy?\nParis, of course.\nCapital of France?",
                                                               len(tok.encode("Paris, of course.")), len("And Italy?"))
