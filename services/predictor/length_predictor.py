"""Output-length prediction: retrieval (the ALISE paper's design) with an MLP fallback, as a distribution.

For a prompt: its nearest past prompts (cosine similarity >= `min_similarity`, top `k`) give a
similarity-weighted distribution of log output lengths; the MLP gives quantiles of log length from the
embedding. With similar neighbours the two are blended (`knn_weight`), without any the MLP decides, with
neither (empty start) a prior does. The result is treated as log-normal: p10/p50/p90, deciles (which the
scheduler uses for the expected *remaining* length of a running job) and the mean. `sigma_scale` is
calibrated on validation data so that the p90 covers about 90% of true lengths.

Every finished job teaches it (`observe`): the index grows (bounded, de-duplicated) and the MLP takes a
few steps on a replay buffer. `save` / `load` persist both, so a restarted predictor keeps what it learned.
"""
from __future__ import annotations

import copy
import json
import logging
import threading
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from services.common.log_normal import DECILE_Z, Z90
from services.common.predictor_text import prompt_key
from services.predictor.encoder import Encoder
from services.predictor.kind_reliability import KindReliability, RequestKind
from services.predictor.knn_index import KnnIndex
from services.predictor.length_mlp import SIDE_DIM, LengthMLP, features, fit, has_previous_reply, side_features
from services.predictor.message_index import MessageIndex, MessageVotes, message_vectors
from services.predictor.reply_line import ReplyLine, fit_reply_line, replaces

log = logging.getLogger("alise.predictor")
_DECILE_Z = np.array(DECILE_Z)


class Basis(Enum):
    """What a prediction's median comes from (its wire form: predictor.proto's PredictionBasis)."""
    KNN = "knn"        # similar past prompts
    MLP = "mlp"        # the MLP, none similar enough (or knn_weight 0)
    BLEND = "blend"    # both, weighted by knn_weight
    PRIOR = "prior"    # neither: the configured prior (an empty predictor)


@dataclass(frozen=True)
class Origins:
    """Per prompt of a batch: its prediction's basis, and whether short messages' votes moved it."""
    basis: list[Basis]
    voted: np.ndarray                # bool


@dataclass(frozen=True)
class Prediction:
    mean: float
    p10: float
    p50: float
    p90: float
    deciles: tuple[float, ...]     # quantiles at 0.05, 0.15, ..., 0.95
    neighbours: int
    basis: Basis
    message_votes: bool            # short messages' votes moved it


@dataclass
class PredictorParams:
    k: int = 16
    min_similarity: float = 0.5
    knn_weight: float = 0.5        # share of the kNN estimate when similar neighbours exist
    sigma_scale: float = 1.0
    prior_log_mean: float = float(np.log(128))
    prior_log_std: float = 1.0
    # a request with a previous reply in its conversation: share of the previous-reply line (reply_line.py) in its
    # estimate (training chooses it on validation; 0.5 for a predictor that starts empty and fits its line online),
    # and the line as last fitted (reply_turns 0: none yet, not used; saved files without these fields load so)
    reply_weight: float = 0.5
    reply_a: float = 0.0
    reply_b: float = 0.0
    reply_sd: float = 1.0
    reply_turns: int = 0
    reply_c: float = 0.0           # the newest message's term (saved files from before it load without it)
    # a request whose newest message is short: the most its similar short messages' replies may weigh in its estimate
    # (message_index.py). Not chosen on validation: the training sets hold too few short messages for that; on the
    # GPU benchmark's chat turns 0.35-0.8 simulated alike (docs/BENCHMARKS.md, session 37)
    message_weight: float = 0.5

    def reply_line(self) -> ReplyLine | None:
        if not self.reply_turns:
            return None
        return ReplyLine(self.reply_a, self.reply_b, self.reply_sd, self.reply_turns, self.reply_c)

    def set_reply_line(self, line: ReplyLine | None) -> None:
        if replaces(line, self.reply_turns):           # else the line fitted on more turns stays
            self.reply_a, self.reply_b, self.reply_sd, self.reply_turns = line.a, line.b, line.sd, line.turns
            self.reply_c = line.c


def params_from(saved: dict) -> PredictorParams:
    """Saved parameters, without any this build does not know (saved by a newer one: it may be rolled back to)."""
    known = {f.name for f in fields(PredictorParams)}
    if unknown := sorted(set(saved) - known):
        log.warning("predictor parameters %s are unknown to this build: ignored", ", ".join(unknown))
    return PredictorParams(**{k: v for k, v in saved.items() if k in known})


class LengthPredictor:
    def __init__(self, encoder: Encoder, params: PredictorParams | None = None, max_entries: int = 1_000_000,
                 replay_size: int = 50_000, retrain_every: int = 256):
        self.encoder = encoder
        self.params = params or PredictorParams()
        self.index = KnnIndex(encoder.dim, max_entries=max_entries)
        self.messages = MessageIndex(encoder.dim, max_entries=max_entries)   # short newest messages alone
        self.mlp: LengthMLP | None = None
        self.replay_size = replay_size
        self.retrain_every = retrain_every
        self._replay: list[tuple[np.ndarray, np.ndarray, float]] = []   # (embedding, side features, log length)
        self._since_retrain = 0
        self._lock = threading.Lock()
        self.dirty = False
        self.stream_position = "0"     # last observation-stream entry learned (observation_feed.py)
        self._training = False         # an MLP refresh is running (at most one at a time)
        self._message_weight: float | None = None   # an operator's override of params.message_weight (not saved)
        self._reliability = KindReliability()          # finished jobs' predictions against their lengths, by kind
        self._pull_by_kind = True                     # serve each kind's predictions pulled by its reliability

    @property
    def size(self) -> int:
        return len(self.index)

    # -- prediction ----------------------------------------------------------------------------------
    def predict(self, prompts: list[str], previous_reply_tokens=None, newest_message_chars=None) -> list[Prediction]:
        vecs = self.encoder.encode(prompts)
        side = side_features([len(p) for p in prompts], previous_reply_tokens, newest_message_chars)
        message_vecs = message_vectors(self.encoder, prompts, newest_message_chars, side)
        keys = [prompt_key(p) for p in prompts]
        with self._lock:
            return self.predict_embedded(vecs, side, self.messages.votes(message_vecs, side), keys=keys)

    def set_message_weight(self, weight: float) -> None:
        """An operator's weight for the short messages' votes (0: off), used instead of the state's while this
        process runs. Kept apart from params: saving writes the trained weight, so a restart without the override
        predicts as trained again (review, session 38)."""
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"message weight must be within [0, 1], got {weight}")
        with self._lock:
            self._message_weight = weight

    def set_pull_by_kind(self, on: bool) -> None:
        """Serve each kind's predictions pulled by its reliability (kind_reliability.py), or as the model says."""
        with self._lock:
            self._pull_by_kind = on

    def kind_slope(self, kind: RequestKind) -> float:
        """How much of its predictions' spread a kind is served with (1: all), for metrics."""
        with self._lock:
            return self._reliability.slope(kind)

    def kind_pairs(self, kind: RequestKind) -> list[tuple[float, float]]:
        """The (log median said at admission, true log length) pairs of a kind's finished jobs, oldest first."""
        with self._lock:
            return self._reliability.pairs(kind)

    @property
    def message_weight(self) -> float:
        return self.params.message_weight if self._message_weight is None else self._message_weight

    def predict_embedded(self, vecs: np.ndarray, side: np.ndarray, votes: MessageVotes | None = None,
                         keys: list[str] | None = None) -> list[Prediction]:
        """`keys`: the prompts' keys, to remember what was said of them until their jobs finish (observe)."""
        mu, sigma, n_neigh, origins = self.log_distribution(vecs, side, votes=votes)
        if keys is not None:
            self._reliability.remember(keys, mu)
        if self._pull_by_kind:
            mu = self._reliability.pull(mu, side)
        return [self._prediction(m, s, n, b, bool(v))
                for m, s, n, b, v in zip(mu, sigma, n_neigh, origins.basis, origins.voted)]

    def log_distribution(self, vecs, side, sims=None, neigh_logs=None, mlp_q=None, votes: MessageVotes | None = None):
        """Per prompt: (mu, sigma) of log length, neighbour count, and Origins. Precomputed neighbours and
        MLP outputs may be passed (hyper-parameter search evaluates many settings on the same ones), and the
        short messages' votes (MessageIndex.votes; none: no request's message is looked at)."""
        p = self.params
        if sims is None:
            sims, neigh_logs = self.index.search(vecs, p.k)
        sims, neigh_logs = sims[:, :p.k], neigh_logs[:, :p.k]
        if mlp_q is None:
            mlp_q = self.mlp_quantiles(vecs, side)
        use = sims >= p.min_similarity
        n_neigh = use.sum(1)
        w = np.where(use, np.maximum(sims, 1e-3), 0.0)
        wsum = np.maximum(w.sum(1), 1e-9)
        knn_mu = (w * neigh_logs).sum(1) / wsum
        knn_sd = np.sqrt((w * (neigh_logs - knn_mu[:, None]) ** 2).sum(1) / wsum)
        knn_sd = np.maximum(knn_sd, 0.25)
        if mlp_q is not None:
            base_mu, base_sd, base = mlp_q[:, 1], np.maximum((mlp_q[:, 2] - mlp_q[:, 0]) / (2 * Z90), 0.1), Basis.MLP
        else:
            base_mu = np.full(len(vecs), p.prior_log_mean)
            base_sd, base = np.full(len(vecs), p.prior_log_std), Basis.PRIOR
        has = n_neigh > 0
        beta = p.knn_weight if mlp_q is not None else 1.0
        mu = np.where(has, beta * knn_mu + (1 - beta) * base_mu, base_mu)
        sd = np.where(has, beta * knn_sd + (1 - beta) * base_sd, base_sd)
        blend = Basis.KNN if beta == 1.0 else base if beta == 0.0 else Basis.BLEND
        basis = [blend if h else base for h in has]
        voted = np.zeros(len(vecs), dtype=bool)
        if p.reply_weight > 0 and (line := p.reply_line()) is not None:
            w = np.where(has_previous_reply(side), p.reply_weight, 0.0)
            mu, sd = (1 - w) * mu + w * line.log_length(side), (1 - w) * sd + w * line.sd
        if votes is not None and (weight := self.message_weight) > 0:
            w = votes.weight(weight)
            mu = (1 - w) * mu + w * votes.mu
            voted = w > 0
        return mu, sd * p.sigma_scale, n_neigh, Origins(basis, voted)

    def mlp_quantiles(self, vecs, side) -> np.ndarray | None:
        if self.mlp is None:
            return None
        with torch.no_grad():
            return self.mlp(features(vecs, side)).numpy()

    @staticmethod
    def _prediction(mu: float, sigma: float, neighbours: int, basis: Basis, voted: bool) -> Prediction:
        q = np.exp(mu + sigma * np.array([-Z90, 0.0, Z90]))
        return Prediction(mean=float(np.exp(mu + sigma ** 2 / 2)), p10=float(q[0]), p50=float(q[1]), p90=float(q[2]),
                          deciles=tuple(float(x) for x in np.exp(mu + sigma * _DECILE_Z)),
                          neighbours=int(neighbours), basis=basis, message_votes=voted)

    # -- learning --------------------------------------------------------------------------------------
    def fit(self, vecs, side, lengths, keys, val=None, message_vecs=None) -> None:
        """Offline: build the index from all examples and train the MLP (early stopping on `val`); with
        `message_vecs` (message_index.message_vectors of the examples), the short messages' index too."""
        log_len = np.log(np.asarray(lengths, dtype=np.float32))
        with self._lock:
            self.index.add(vecs, lengths, keys)
            if message_vecs is not None:
                self.messages.add(message_vecs, side, lengths)
            self.mlp = self._new_mlp()
            x_val = y_val = None
            if val is not None:
                x_val, y_val = features(val[0], val[1]), torch.from_numpy(np.log(np.asarray(val[2], np.float32)))
            fit(self.mlp, features(vecs, side), torch.from_numpy(log_len), x_val, y_val)
            self.params.set_reply_line(fit_reply_line(np.asarray(side), log_len))
            self._replay = list(zip(vecs, np.asarray(side, np.float32), log_len))[-self.replay_size:]
            self.dirty = True

    def observe(self, prompts: list[str], lengths: list[int], previous_reply_tokens=None, newest_message_chars=None,
                stream_position: str | None = None) -> int:
        """Learn true lengths. `stream_position`: the stream entry these end at, saved with what was learned."""
        if not prompts:
            return self._advance(stream_position)
        vecs = self.encoder.encode(prompts)
        side = side_features([len(p) for p in prompts], previous_reply_tokens, newest_message_chars)
        message_vecs = message_vectors(self.encoder, prompts, newest_message_chars, side)
        keys = [prompt_key(p) for p in prompts]
        with self._lock:
            if stream_position is not None:
                self.stream_position = stream_position
            self._reliability.record(keys, side, lengths)    # how far what it said of them held
            self.index.add(vecs, lengths, keys)
            self.messages.add(message_vecs, side, lengths)
            self._replay += list(zip(vecs, side, np.log(np.asarray(lengths, np.float32))))
            self._replay = self._replay[-self.replay_size:]
            self._since_retrain += len(prompts)
            self.dirty = True
            size = self.size
            due = self._since_retrain >= self.retrain_every and len(self._replay) >= 200 and not self._training
            if due:
                self._since_retrain, self._training = 0, True
                replay, mlp = list(self._replay), copy.deepcopy(self.mlp) if self.mlp is not None else self._new_mlp()
        if due:
            self._refresh_mlp(mlp, replay)
        return size

    def _advance(self, stream_position: str | None) -> int:
        with self._lock:
            if stream_position is not None:
                self.stream_position, self.dirty = stream_position, True
            return self.size

    def _refresh_mlp(self, mlp: LengthMLP, replay: list) -> None:
        """A few epochs on the replay buffer: the MLP follows the served model's real lengths. Trains a copy
        outside the lock (seconds on a large buffer) and swaps it in, so Predict never waits for it."""
        try:
            vecs, side, ys = map(np.asarray, zip(*replay))
            x, y = features(vecs, side), torch.from_numpy(ys.astype(np.float32))
            # every 10th example validates: early stopping picks how far to fit (small buffers overfit fast)
            val = np.arange(len(ys)) % 10 == 0
            epochs = max(5, min(300, 300 * 512 // len(ys)))   # a few hundred steps at most, few passes when large
            fit(mlp, x[~val], y[~val], x[val], y[val], epochs=epochs)
            line = fit_reply_line(side, ys)            # the served model's replies, as the MLP follows them
            with self._lock:
                self.mlp, self.dirty = mlp, True
                self.params.set_reply_line(line)
        finally:
            self._training = False

    def _new_mlp(self) -> LengthMLP:
        with torch.random.fork_rng():          # the same data gives the same model (reproducible evaluations)
            torch.manual_seed(0)
            return LengthMLP(dim=self.encoder.dim + SIDE_DIM)

    # -- persistence -----------------------------------------------------------------------------------
    STATE_FILES = ("index.npz", "messages.npz", "mlp.pt", "params.json", "meta.json")

    def save(self, directory: Path) -> None:
        """Write the learned state next to (never over) a fine-tuned `encoder/` the directory may hold."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            np.savez(directory / "index.npz.tmp.npz", **self.index.state())
            np.savez(directory / "messages.npz.tmp.npz", **self.messages.state())
            if self.mlp is not None:
                torch.save(self.mlp.state_dict(), directory / "mlp.pt.tmp")
            (directory / "params.json.tmp").write_text(json.dumps(asdict(self.params), indent=2))
            meta = {"stream_position": self.stream_position, "encoder": self.encoder.fingerprint}
            (directory / "meta.json.tmp").write_text(json.dumps(meta))
            self.dirty = False
        # renames are atomic: a crash mid-save leaves the previous files, never half-written ones
        (directory / "index.npz.tmp.npz").replace(directory / "index.npz")
        (directory / "messages.npz.tmp.npz").replace(directory / "messages.npz")
        if self.mlp is not None:
            (directory / "mlp.pt.tmp").replace(directory / "mlp.pt")
        (directory / "params.json.tmp").replace(directory / "params.json")
        (directory / "meta.json.tmp").replace(directory / "meta.json")

    def _read_messages(self, directory: Path) -> tuple[MessageIndex, Exception | None]:
        """The short messages' index, empty when saved before it existed or unreadable (with the error): the votes
        are a refinement learned again from traffic, so a corrupt file of theirs must not cost the main index."""
        messages = MessageIndex(self.encoder.dim, max_entries=self.index.max_entries)
        if not (directory / "messages.npz").exists():
            return messages, None
        try:
            with np.load(directory / "messages.npz", allow_pickle=False) as z:
                messages.load_state({k: z[k] for k in z.files})
        except Exception as e:  # noqa: BLE001 - any unreadable file: zip, array or shape errors alike
            return MessageIndex(self.encoder.dim, max_entries=self.index.max_entries), e
        return messages, None

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        params = params_from(json.loads((directory / "params.json").read_text()))
        meta = json.loads((directory / "meta.json").read_text()) if (directory / "meta.json").exists() else {}
        if meta.get("encoder", self.encoder.fingerprint) != self.encoder.fingerprint:
            raise ValueError(f"the index was built with encoder {meta['encoder']}, this predictor encodes with "
                             f"{self.encoder.fingerprint}: its neighbours would be meaningless")
        position = meta.get("stream_position", "0")
        with np.load(directory / "index.npz", allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
        messages, unreadable = self._read_messages(directory)
        mlp = None
        if (directory / "mlp.pt").exists():
            mlp = self._new_mlp()
            mlp.load_state_dict(torch.load(directory / "mlp.pt", weights_only=True))
            mlp.eval()
        with self._lock:
            self.index.load_state(state)
            self.messages = messages
            self.params, self.mlp, self.stream_position = params, mlp, position
            self._replay = []
        if unreadable is not None:      # set aside once the rest has loaded: else the server sets all of it aside
            log.error("cannot read %s (%r): the short messages' votes start empty, the rest of the state loaded; "
                      "kept as %s", directory / "messages.npz", unreadable, set_aside(directory, ["messages.npz"]))


def set_aside(directory: Path, names) -> list[str]:
    """Rename these state files, unreadable, to NAME.unreadable (never delete what may be recovered by hand); the
    names they now have. One that cannot be renamed (a read-only volume) stays where it is, logged: setting state
    aside must never fail a start, or a corrupt file becomes a crash loop."""
    kept = []
    for name in names:
        if not (directory / name).exists():
            continue
        try:
            (directory / name).replace(directory / f"{name}.unreadable")
            kept.append(f"{name}.unreadable")
        except OSError as e:
            log.error("cannot set %s aside (%r): it stays where it is", directory / name, e)
    return kept
