"""An experiment, not the product: would the reply line gain from the newest message's length as a third term,
ln L = a + b ln(1 + previous reply tokens) + c min(ln(1 + newest message characters), 4)? (docs/BENCHMARKS.md,
session 35, "A lead for the p99 tail".) It runs bench/online_learning_replay.py with the predictor patched in this
process only: the newest message's term rides in the previous-reply argument as prev + f / 10 (f in [0, 4]), the side
features carry it as a 4th column that the MLP does not see, and the line is fitted with the third term at every
online refresh (starting from a, b, c fitted on the training turns: A0, B0, C0). ON=0 runs the same patched code
without the term and reproduces the plain replay exactly. To be replaced by the real feature (a field of its own
beside previous_reply_tokens) and then deleted.

    ON=1 python -m bench.newest_message_replay --model-dir .bench-data/predictor_880 \
        --dataset-path .bench-data/sharegpt_heldout_880.json --tokenizer .bench-data/llama3-8b-shape --num 3000 \
        --lag 600 --out-predictions msg.csv
"""
import math
import os
import sys

import numpy as np

import bench.online_learning_replay as olr
import services.predictor.length_predictor as lp
import services.predictor.reply_line as rl
from services.predictor.length_mlp import features as plain_features
from services.predictor.length_mlp import side_features as plain_side_features

ON = os.environ.get("ON", "1") == "1"
# the third term's coefficient (refitted online) and the line it starts from: fitted on predictor_880's training turns
LINE = {"a": float(os.environ.get("A0", "1.986")), "b": float(os.environ.get("B0", "0.51")),
        "c": float(os.environ.get("C0", "0.191"))}


def side_with_newest(chars, prev=None):
    """The usual 3 side columns from the previous reply's tokens (the integer part), the newest message's term
    (10 x the fractional part) as a 4th."""
    if prev is None:
        return np.concatenate([plain_side_features(chars, None), np.zeros((len(chars), 1), np.float32)], 1)
    v = np.asarray(prev, np.float64)
    whole = np.floor(v)
    return np.concatenate([plain_side_features(chars, whole), ((v - whole) * 10)[:, None].astype(np.float32)], 1)


def log_length(self, side):
    side = np.asarray(side)
    base = self.a + self.b * rl.previous_reply_log(side)
    return base + (LINE["c"] * side[:, 3] if ON and side.shape[1] > 3 else 0.0)


def fit_with_newest(side, log_len):
    side = np.asarray(side)
    has = rl.has_previous_reply(side)
    if has.sum() < rl.MIN_TURNS:
        return None
    x = rl.previous_reply_log(side)[has]
    m = side[has, 3] if side.shape[1] > 3 else np.zeros(int(has.sum()))
    y = np.asarray(log_len, np.float64)[has]
    cols = [np.ones(len(x)), x, m] if ON else [np.ones(len(x)), x]
    coef, *_ = np.linalg.lstsq(np.vstack(cols).T, y, rcond=None)
    b = float(np.clip(coef[1], *rl.SLOPE_RANGE))
    if ON:
        LINE["c"] = float(coef[2])
    a = float(coef[0])
    fitted = a + b * x + (LINE["c"] * m if ON else 0.0)
    return rl.ReplyLine(a, b, max(float(np.std(y - fitted)), rl.MIN_SD), int(has.sum()))


def patch() -> None:
    """Patches this process's predictor and replay (see the module's docstring)."""
    lp.side_features = side_with_newest
    lp.features = lambda vecs, side: plain_features(vecs, np.asarray(side)[:, :3])
    rl.ReplyLine.log_length = log_length
    lp.fit_reply_line = fit_with_newest
    load, ask = olr.load_predictor, olr.as_the_scheduler_asks

    def load_with_line(directory):
        predictor = load(directory)
        if ON:
            predictor.params.reply_a, predictor.params.reply_b = LINE["a"], LINE["b"]
        return predictor

    def ask_with_newest(req, tok):
        text, prev = ask(req, tok)
        return text, prev + (min(math.log1p(len(req.prompt)), 4.0) / 10 if prev > 0 else 0.0)

    olr.load_predictor, olr.as_the_scheduler_asks = load_with_line, ask_with_newest


if __name__ == "__main__":
    patch()
    olr.main(sys.argv[1:])
