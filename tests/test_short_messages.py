"""The short messages' votes (services/predictor/message_index.py): a chat turn whose newest message is short is
predicted partly from what similar short messages were answered with, which neither the previous reply's length nor
the history-laden embedding of the whole turn can tell ("Thanks!" gets a sentence, "continue" a page)."""
from __future__ import annotations

import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
from alise.v1 import predictor_pb2 as ppb
from alise.v1 import predictor_pb2_grpc as ppb_grpc

from services.common.auth import with_bearer
from services.common.local_stack import free_port, wait_healthy
from services.common.predictor_text import newest_message, newest_message_chars, predictor_text
from services.predictor.encoder import Encoder
from services.predictor.length_mlp import side_features, without_previous_reply
from services.predictor.length_predictor import LengthPredictor
from services.predictor.message_index import MessageIndex, is_short, message_vectors

THANKS = ("Thanks!", "thank you", "Thanks a lot!", "great, thanks", "Thank you so much.", "thx!", "Thanks, that helps.",
          "ok thank you", "Many thanks!", "Cheers, thanks.")
GO_ON = ("continue", "Please continue", "go on", "keep going", "Continue please.", "more", "Continue writing.",
         "go on please", "Keep writing.", "please go on")
REPLY = ("Here is a detailed walk through the design, step by step. First the data model, then the service "
         "boundaries, then how requests flow from the gateway to the workers and back. ") * 6


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


def chat_turn(message: str, topic: int) -> str:
    """A turn's predictor text: the newest message, then the previous reply (the same for every turn here)."""
    return predictor_text([f"Tell me about system {topic}.", REPLY, message])


def teach(pred: LengthPredictor, rng, n: int = 80) -> None:
    """n turns after the same 800-token reply: thanks answered in ~15 tokens, "continue" in ~600."""
    messages, lengths = [], []
    for i in range(n):
        thanks = i % 2 == 0
        messages.append((THANKS if thanks else GO_ON)[rng.integers(10)])
        lengths.append(int(rng.integers(10, 20) if thanks else rng.integers(500, 700)))
    pred.observe([chat_turn(m, i) for i, m in enumerate(messages)], lengths, [800] * n,
                 [newest_message_chars(m) for m in messages])


def test_a_message_is_short_below_the_lines_cap_and_an_unknown_one_is_not():
    side = side_features([100] * 5, [50] * 5, [0, 1, 53, 54, 5000])
    assert list(is_short(side)) == [False, True, True, False, False]
    # the evaluation's no-previous-reply ablation takes the reply away, not the message (review, session 37: it
    # zeroed the message's column too, and with it the votes)
    assert list(is_short(without_previous_reply(side))) == list(is_short(side))


def test_the_newest_message_is_read_back_from_the_head_of_the_predictor_text():
    for message in ("Thanks!", "  Thanks!\n", " \tgo on "):
        text = chat_turn(message, 1)
        assert newest_message(text, newest_message_chars(message)) == message.strip()
    # review, session 37: a leading space used to shift the text, and the message read back ended in the history
    assert newest_message_chars("   ") == 0


def test_only_a_chat_ending_with_the_users_message_has_a_newest_message(model_dir):
    """Review, session 37: a chat ending with a tool's result counted the user's earlier message, while the head of
    the predictor text, which the votes embed, was the tool's JSON."""
    from alise.v1 import generate_pb2 as gpb
    from services.scheduler.tokenizer import PromptTokenizer
    from services.scheduler.validation import predictor_inputs

    def asked(*messages):
        chat = gpb.ChatConversation(messages=[gpb.ChatMessage(role=r, content=c) for r, c in messages])
        return predictor_inputs(gpb.GenerateRequest(chat=chat), PromptTokenizer(str(model_dir)))

    user = asked(("user", "Weather in Paris?"), ("assistant", "Let me look."), ("user", "Thanks!"))
    assert user.newest_message_chars == 7 and newest_message(user.text, 7) == "Thanks!"
    assert asked(("user", "Weather in Paris?"), ("tool", '{"temp": 21, "sky": "clear"}')).newest_message_chars == 0
    assert asked(("user", "Thanks!"), ("assistant", "You are")).newest_message_chars == 0


def test_similar_short_messages_vote_and_others_do_not(encoder):
    prompts = ["Thanks!", "continue", "Thanks!!", "x" * 200, "Thanks!"]
    side = side_features([len(p) for p in prompts], [800] * 5, [7, 8, 8, 200, 0])    # the last: length unknown
    vecs = message_vectors(encoder, prompts, [7, 8, 8, 200, 0], side)
    assert not vecs[3].any() and not vecs[4].any()           # only the short ones are embedded
    index = MessageIndex(encoder.dim)
    index.add(vecs[:2], side[:2], [15, 600])
    index.add(vecs[3:], side[3:], [400, 400])                 # not short: not learned
    assert len(index) == 2
    votes = index.votes(vecs, side)
    assert votes.count[2] >= 1 and votes.mu[2] < np.log(100)   # "Thanks!!" is like "Thanks!"
    assert votes.count[3] == votes.count[4] == 0
    assert list(votes.weight(0.5)[3:]) == [0.0, 0.0]


def test_a_common_messages_vote_follows_all_its_sightings_not_its_first(encoder):
    """Review, session 37: keyed by turn, a thousand identical "Thanks!" were a thousand entries at similarity 1, and
    the search's 16 among equals (with faiss the oldest) decided its vote for good: 20 answered in 15 tokens, then
    300 in 600, still voted 15."""
    side = side_features([7], [800], [7])
    vec = message_vectors(encoder, ["Thanks!"], [7], side)
    index = MessageIndex(encoder.dim)
    for _ in range(20):
        index.add(vec, side, [15])
    assert np.exp(index.votes(vec, side).mu[0]) == pytest.approx(15, rel=0.01)
    for _ in range(300):
        index.add(vec, side, [600])
    votes = index.votes(vec, side)
    assert len(index) == 1 and votes.count[0] == 320           # one message, every sighting counted
    assert np.exp(votes.mu[0]) > 400                            # the running mean of its replies' log lengths


def test_a_thank_you_is_predicted_short_and_a_continue_long_after_the_same_reply(encoder):
    """Session 37: the live p99 tail was short replies to "hey", "Thanks!", "Is that it?", predicted 200-400
    tokens from the previous reply; the line's message-length term cannot tell them from "continue"."""
    pred = LengthPredictor(encoder, retrain_every=10_000)        # no MLP refresh: the votes alone at work
    teach(pred, np.random.default_rng(0))

    def ratio() -> float:
        thanks, more = pred.predict([chat_turn("Thank you!", 99), chat_turn("Continue.", 99)], [800, 800],
                                    [len("Thank you!"), len("Continue.")])
        return more.mean / thanks.mean

    with_votes = ratio()
    pred.params.message_weight = 0.0
    without = ratio()
    assert with_votes > 2.5 and with_votes > 2 * without
    long_message = chat_turn("Could you explain the part about the gateway in more detail, with an example?", 99)
    off = pred.predict([long_message], [800], [77])[0]
    pred.params.message_weight = 0.5
    assert pred.predict([long_message], [800], [77])[0].mean == pytest.approx(off.mean)   # not short: no vote


def test_the_votes_are_saved_and_a_predictor_saved_without_them_loads_with_none(encoder, tmp_path):
    pred = LengthPredictor(encoder, retrain_every=10_000)
    teach(pred, np.random.default_rng(1))
    asked = ([chat_turn("Thanks!!", 5)], [800], [8])
    before = pred.predict(*asked)[0].mean
    pred.save(tmp_path / "m")
    again = LengthPredictor(encoder)
    again.load(tmp_path / "m")
    assert 0 < len(again.messages) == len(pred.messages) and again.predict(*asked)[0].mean == pytest.approx(before)
    (tmp_path / "m" / "messages.npz").unlink()                  # saved by a build from before the votes
    older = LengthPredictor(encoder)
    older.load(tmp_path / "m")
    pred.params.message_weight = 0.0
    assert len(older.messages) == 0 and older.predict(*asked)[0].mean == pytest.approx(pred.predict(*asked)[0].mean)


def test_an_operators_message_weight_is_used_but_never_saved(encoder, tmp_path):
    """Review, session 38: the override was written into params.json, so a restart without it kept it."""
    pred = LengthPredictor(encoder, retrain_every=10_000)
    teach(pred, np.random.default_rng(4))
    asked = ([chat_turn("Thanks!!", 5)], [800], [8])
    voted = pred.predict(*asked)[0]
    pred.set_message_weight(0.0)
    off = pred.predict(*asked)[0]
    assert off.mean > 1.2 * voted.mean and voted.message_votes and not off.message_votes
    pred.save(tmp_path / "m")
    again = LengthPredictor(encoder)
    again.load(tmp_path / "m")
    assert again.params.message_weight == 0.5 and again.predict(*asked)[0].mean == pytest.approx(voted.mean)
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        pred.set_message_weight(float("nan"))


def test_an_unreadable_messages_file_empties_the_votes_only(encoder, tmp_path):
    """Review, session 37: a corrupt messages.npz made load() fail, and the server set the whole state aside."""
    pred = LengthPredictor(encoder, retrain_every=10_000)
    teach(pred, np.random.default_rng(3))
    pred.save(tmp_path / "m")
    for garbage in (b"not a zip", b""):
        (tmp_path / "m" / "messages.npz").write_bytes(garbage)
        again = LengthPredictor(encoder)
        again.load(tmp_path / "m")
        assert len(again.index) == len(pred.index) > 0 and len(again.messages) == 0
        assert (tmp_path / "m" / "messages.npz.unreadable").read_bytes() == garbage
        assert not (tmp_path / "m" / "messages.npz").exists()
        (tmp_path / "m" / "messages.npz.unreadable").unlink()
    # review, session 38: where it cannot be set aside (here a folder is in the way; a read-only volume alike),
    # the state loaded must stay loaded: load failing would make the server set every good file aside
    (tmp_path / "m" / "messages.npz").write_bytes(b"not a zip")
    (tmp_path / "m" / "messages.npz.unreadable").mkdir()
    (tmp_path / "m" / "messages.npz.unreadable" / "x").write_text("x")
    again = LengthPredictor(encoder)
    again.load(tmp_path / "m")
    assert len(again.index) == len(pred.index) and len(again.messages) == 0
    assert (tmp_path / "m" / "messages.npz").read_bytes() == b"not a zip"


def test_training_puts_only_the_short_messages_in_their_index(encoder):
    texts = [chat_turn(m, i) for i, m in enumerate(("Thanks!", "x" * 120, "go on"))]
    chars = [7, 120, 5]
    side = side_features([len(t) for t in texts], [800] * 3, chars)
    pred = LengthPredictor(encoder)
    pred.fit(encoder.encode(texts), side, [15, 300, 600], ["a", "b", "c"],
             message_vecs=message_vectors(encoder, texts, chars, side))
    assert len(pred.index) == 3 and len(pred.messages) == 2


def test_the_service_learns_the_votes_from_observations_and_keeps_them_over_a_restart(tmp_path):
    model_dir = tmp_path / "predictor"

    def start(*flags):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "services.predictor.server", "--listen", f"127.0.0.1:{port}",
                                 "--model-dir", str(model_dir), *flags], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        wait_healthy(f"127.0.0.1:{port}", 90)
        channel = with_bearer(grpc.insecure_channel(f"127.0.0.1:{port}"), os.environ["ALISE_SERVICE_TOKEN"])
        return proc, ppb_grpc.PredictorStub(channel)

    def ask(stub, voted=True) -> float:
        thanks, more = stub.Predict(ppb.PredictRequest(
            prompts=[chat_turn("Thank you!", 99), chat_turn("Continue.", 99)], previous_reply_tokens=[800, 800],
            newest_message_chars=[10, 9])).predictions
        assert thanks.message_votes == voted         # says when the votes moved an estimate
        return more.mean / thanks.mean

    rng = np.random.default_rng(2)
    observations = []
    for i in range(80):
        thanks = i % 2 == 0
        message = (THANKS if thanks else GO_ON)[rng.integers(10)]
        tokens = int(rng.integers(10, 20) if thanks else rng.integers(500, 700))
        observations.append(ppb.Observation(prompt=chat_turn(message, i), previous_reply_tokens=800,
                                            newest_message_chars=len(message), output_tokens=tokens))
    proc, stub = start()
    try:
        stub.Observe(ppb.ObserveRequest(observations=observations))
        learned = ask(stub)
        assert learned > 3                            # the same words, told apart by what they were answered with
    finally:
        proc.terminate()
        proc.wait(30)                                 # SIGTERM saves what was learned
    proc, stub = start()
    try:
        assert ask(stub) == pytest.approx(learned, rel=1e-3)
    finally:
        proc.terminate()
        proc.wait(30)
    # the benchmarks' A/B switches: the same state, votes off (and predictions not pulled by kind: parsed, started)
    proc, stub = start("--message-weight=0", "--read-only", "--no-kind-pull")
    try:
        assert ask(stub, voted=False) < learned / 2
    finally:
        proc.terminate()
        proc.wait(30)
    refused = subprocess.run([sys.executable, "-m", "services.predictor.server", "--message-weight=1.5"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "--message-weight: message weight must be within [0, 1], got 1.5" in refused.stderr
