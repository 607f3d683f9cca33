"""The conversation line of the length predictor (services/predictor/reply_line.py): fitted on conversation turns
(the previous reply's length and the newest message's), blended into the estimate of requests that have a previous
reply, chosen on validation, refitted online."""
from __future__ import annotations

import json

import numpy as np
import pytest

from services.predictor.encoder import Encoder
from services.predictor.evaluation import Split, tune
from services.predictor.length_mlp import NEWEST_MESSAGE_LOG_CAP, side_features
from services.predictor.length_predictor import LengthPredictor, PredictorParams
from services.predictor.reply_line import MIN_TURNS, NEWEST_SLOPE_RANGE, SLOPE_RANGE, fit_reply_line


def conversation_turns(rng, n: int, slope: float = 0.8, noise: float = 0.2):
    """n turns whose length follows their previous reply's: ln L = 1 + slope ln(1 + prev) + noise."""
    prev = rng.integers(5, 2000, size=n)
    log_len = 1.0 + slope * np.log1p(prev) + noise * rng.standard_normal(n)
    return prev, log_len


def test_the_line_is_fitted_on_turns_with_a_previous_reply_only():
    rng = np.random.default_rng(0)
    prev, log_len = conversation_turns(rng, 300)
    # first turns (no previous reply) of any length must not bend the line
    side = side_features([100] * 400, list(prev) + [0] * 100)
    line = fit_reply_line(side, np.concatenate([log_len, rng.uniform(0, 8, 100)]))
    assert line is not None and line.turns == 300
    assert line.b == pytest.approx(0.8, abs=0.05) and line.a == pytest.approx(1.0, abs=0.3)
    assert line.sd == pytest.approx(0.2, abs=0.05)
    assert np.allclose(line.log_length(side_features([1], [99])), line.a + line.b * np.log(100), atol=1e-4)


def turns_with_newest_messages(rng, n: int, c: float = 0.3):
    """n turns whose length follows their previous reply's and, below the cap, their newest message's length."""
    prev, log_len = conversation_turns(rng, n, slope=0.5)
    newest = rng.integers(1, 80, size=n)         # most below the cap, where the length says something
    return prev, newest, log_len + c * np.minimum(np.log1p(newest), NEWEST_MESSAGE_LOG_CAP)


def test_the_newest_messages_length_is_the_lines_third_term():
    """Session 36: "Thanks!" after a long reply was predicted as long as the reply before it (the live p99 tail)."""
    rng = np.random.default_rng(7)
    prev, newest, log_len = turns_with_newest_messages(rng, 400)
    line = fit_reply_line(side_features([100] * 400, prev, newest), log_len)
    assert line.c == pytest.approx(0.3, abs=0.05) and line.b == pytest.approx(0.5, abs=0.05)
    assert line.sd == pytest.approx(0.2, abs=0.05)                         # the term explains its share
    thanks, question = line.log_length(side_features([100] * 2, [800, 800], [len("Thanks!"), 200]))
    assert question - thanks == pytest.approx(0.3 * (NEWEST_MESSAGE_LOG_CAP - np.log1p(7)), abs=0.1)


def test_unknown_newest_messages_fit_and_use_the_line_without_the_term():
    """A newest message of 0 characters is unknown (observations from a scheduler before the field, a client that
    does not say): it counts as an ordinary message, and a line fitted only on such turns is the two-term one."""
    rng = np.random.default_rng(8)
    prev, log_len = conversation_turns(rng, 300)
    unknown = fit_reply_line(side_features([100] * 300, prev, [0] * 300), log_len)
    assert unknown.c == 0.0 and [unknown.b, unknown.a] == pytest.approx(np.polyfit(np.log1p(prev), log_len, 1))
    prev, newest, log_len = turns_with_newest_messages(rng, 300)
    line = fit_reply_line(side_features([100] * 300, prev, newest), log_len)
    said, unsaid, short = line.log_length(side_features([9] * 3, [500] * 3, [300, 0, 5]))
    assert line.c > 0.2 and short < said - 0.4
    assert said == pytest.approx(unsaid)                                  # unknown: as a message past the cap
    # the term is 0 past the cap: a build that ignores c (rolled back to) predicts ordinary turns the same
    assert said == pytest.approx(line.a + line.b * np.log1p(500), abs=1e-4)


def test_the_newest_messages_slope_is_fitted_only_from_enough_short_messages_and_bounded():
    """Review, session 36: one short message among few turns gave the term any slope (c = +-8 from one residual)."""
    rng = np.random.default_rng(10)
    prev, log_len = conversation_turns(rng, 60)
    few_short = np.array([300] * 41 + [40] * (MIN_TURNS - 1))     # one short of enough turns below the cap
    assert fit_reply_line(side_features([9] * 60, prev, few_short), log_len + 3 * (few_short < 50)).c == 0.0
    newest = rng.integers(1, 80, size=60)
    term = np.minimum(np.log1p(newest), NEWEST_MESSAGE_LOG_CAP)
    assert fit_reply_line(side_features([9] * 60, prev, newest), log_len + 5 * term).c == NEWEST_SLOPE_RANGE[1]
    assert fit_reply_line(side_features([9] * 60, prev, newest), log_len - 2 * term).c == NEWEST_SLOPE_RANGE[0]


def test_too_few_turns_or_one_previous_length_fit_no_line():
    rng = np.random.default_rng(1)
    prev, log_len = conversation_turns(rng, MIN_TURNS - 1)
    assert fit_reply_line(side_features([10] * len(prev), prev), log_len) is None
    assert fit_reply_line(side_features([10] * 50, [40] * 50), rng.uniform(2, 6, 50)) is None     # slope unknowable
    assert fit_reply_line(side_features([10] * 50), rng.uniform(2, 6, 50)) is None                 # no conversation


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


WORDS = ("river", "castle", "engine", "garden", "planet", "violin", "harbour", "desert", "library", "glacier",
         "market", "falcon", "lantern", "canyon", "orchard", "compass")


def questions(rng, n: int) -> list[str]:
    """n different questions: their words, not their previous replies, are what the MLP's embedding sees."""
    return [f"Tell me more about the {rng.choice(WORDS)} and the {rng.choice(WORDS)}, part {i}." for i in range(n)]


def trained(encoder, rng, n: int = 240) -> tuple[LengthPredictor, np.ndarray, np.ndarray]:
    """A predictor fitted on n turns of different questions whose length only the previous reply tells."""
    prev, log_len = conversation_turns(rng, n)
    prompts = questions(rng, n)
    pred = LengthPredictor(encoder)
    vecs = encoder.encode(prompts)
    pred.fit(vecs, side_features([len(p) for p in prompts], prev), np.exp(log_len).round() + 1,
             [f"k{i}" for i in range(n)])
    return pred, prev, log_len


def test_the_line_decides_for_requests_with_a_previous_reply_as_much_as_its_weight_says(encoder):
    rng = np.random.default_rng(2)
    pred, _, _ = trained(encoder, rng)
    line = pred.params.reply_line()
    assert line is not None and line.b == pytest.approx(0.8, abs=0.1)
    pred.params.reply_weight = 0.0
    off = pred.predict(["Please go on."] * 3, [10, 1000, 0])
    pred.params.reply_weight = 1.0
    on = pred.predict(["Please go on."] * 3, [10, 1000, 0])
    side = side_features([len("Please go on.")] * 2, [10, 1000])
    assert np.allclose(np.log([p.p50 for p in on[:2]]), line.log_length(side), atol=1e-3)   # the line alone
    assert on[1].p50 / on[0].p50 > 10                     # 100x longer previous reply: ~40x longer at slope 0.8
    assert on[2].p50 == pytest.approx(off[2].p50)         # a first turn: the line has no say


def test_validation_chooses_the_weight_and_saved_files_without_it_load_with_the_line_off(encoder, tmp_path):
    rng = np.random.default_rng(3)
    pred, _, _ = trained(encoder, rng)
    vprev, vlog = conversation_turns(rng, 80)
    texts = questions(rng, 80)
    val = Split(encoder.encode(texts), side_features([len(t) for t in texts], vprev), np.exp(vlog).round() + 1,
                [f"v{i}" for i in range(80)], [f"v{i}" for i in range(80)], np.zeros((80, encoder.dim)))
    chosen = tune(pred, val)
    assert chosen["reply_weight"] >= 0.75 and chosen["val_kendall_tau"] > 0.6
    first_turns = Split(val.vecs, side_features([len(t) for t in texts]), val.lengths, val.keys, val.groups,
                        val.message_vecs)
    chosen_before = pred.params.reply_weight
    # nothing to choose it on: left as it was, not turned off (review, session 34: a predictor trained on prompts
    # alone was saved with weight 0 and never used the line it fitted online once chats came)
    assert tune(pred, first_turns)["reply_weight"] == chosen_before
    fresh = LengthPredictor(encoder)
    fresh.fit(val.vecs[:30], first_turns.side[:30], val.lengths[:30], val.keys[:30])     # no conversation turns
    assert fresh.params.reply_line() is None
    assert tune(fresh, first_turns.take(list(range(30, 80))))["reply_weight"] == PredictorParams().reply_weight
    pred.save(tmp_path / "m")
    older = json.loads((tmp_path / "m" / "params.json").read_text())
    for field in ("reply_weight", "reply_a", "reply_b", "reply_sd", "reply_turns"):
        older.pop(field)
    (tmp_path / "m" / "params.json").write_text(json.dumps(older))
    again = LengthPredictor(encoder)
    again.load(tmp_path / "m")
    assert again.params.reply_line() is None and again.params == PredictorParams(**older)


def test_the_predictor_learns_the_newest_messages_term_online_and_keeps_it_saved(encoder, tmp_path):
    rng = np.random.default_rng(9)
    pred = LengthPredictor(encoder, retrain_every=200)
    prev, newest, log_len = turns_with_newest_messages(rng, 400, c=0.5)
    pred.observe(questions(rng, 400), list(np.exp(log_len).round().astype(int) + 1), list(prev), list(newest))
    assert pred.params.reply_c == pytest.approx(0.5, abs=0.1)
    pred.params.reply_weight = 1.0
    pred.save(tmp_path / "m")
    again = LengthPredictor(encoder)
    again.load(tmp_path / "m")
    thanks, question = again.predict(["Thanks!", "Thanks!"], [600, 600], [7, 300])
    assert question.p50 / thanks.p50 == pytest.approx(np.exp(0.5 * (NEWEST_MESSAGE_LOG_CAP - np.log1p(7))), rel=0.2)


def test_online_learning_refits_the_line_to_the_served_models_replies(encoder):
    rng = np.random.default_rng(4)
    pred, _, _ = trained(encoder, rng)
    before = pred.params.reply_line()
    pred.retrain_every = 200
    prev, log_len = conversation_turns(rng, 600, slope=0.3)        # the served model's replies follow them less
    for i in range(0, 600, 100):
        pred.observe(["Please go on."] * 100, list(np.exp(log_len[i:i + 100]).round().astype(int) + 1),
                     list(prev[i:i + 100]))
    after = pred.params.reply_line()
    assert after.turns > before.turns and after.b < before.b - 0.2


def test_a_refit_on_few_turns_keeps_the_line_fitted_on_many_and_the_slope_stays_in_range():
    """Review, session 34: after a restart the replay buffer is empty, and the first online refresh fitted the line
    on the few turns served since, replacing the trained one; and nothing bounded the slope such a fit gives."""
    rng = np.random.default_rng(5)
    params = PredictorParams()
    params.set_reply_line(fit_reply_line(side_features([9] * 259, conversation_turns(rng, 259)[0]),
                                         conversation_turns(rng, 259)[1]))
    assert params.reply_turns == 259
    prev, log_len = conversation_turns(rng, 30, slope=0.1)
    params.set_reply_line(fit_reply_line(side_features([9] * 30, prev), log_len))
    assert params.reply_turns == 259                       # 30 turns do not replace 259
    prev, log_len = conversation_turns(rng, 120, slope=0.1)
    params.set_reply_line(fit_reply_line(side_features([9] * 120, prev), log_len))
    assert params.reply_turns == 120 and params.reply_b < 0.3     # enough turns: the served model's line wins
    steep = fit_reply_line(side_features([9] * 40, [10, 11] * 20), np.array([1.0, 6.0] * 20))
    shrinking = fit_reply_line(side_features([9] * 40, [10, 1000] * 20), np.array([6.0, 1.0] * 20))
    assert steep.b == SLOPE_RANGE[1] and shrinking.b == SLOPE_RANGE[0]


def test_parameters_saved_by_a_newer_build_load_without_what_this_one_does_not_know(encoder, tmp_path, caplog):
    pred, _, _ = trained(encoder, np.random.default_rng(6))
    pred.save(tmp_path / "m")
    newer = {**json.loads((tmp_path / "m" / "params.json").read_text()), "some_future_knob": 3}
    (tmp_path / "m" / "params.json").write_text(json.dumps(newer))
    again = LengthPredictor(encoder)
    again.load(tmp_path / "m")
    assert again.params == pred.params and "some_future_knob" in caplog.text
