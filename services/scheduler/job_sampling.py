"""How a job samples, as validation normalised it: one typed record from the API to the worker's wire message,
stored with the job in Redis (as JSON: finish.lua reads its `ignore_eos`)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from alise.v1 import generate_pb2 as pb


@dataclass(frozen=True)
class JobSampling:
    # the order of the fields is the order of the request fingerprint's JSON (validation.py): keep it
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop: tuple[str, ...]
    seed: int | None
    ignore_eos: bool

    def as_dict(self) -> dict:
        return {**asdict(self), "stop": list(self.stop)}

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    @classmethod
    def from_json(cls, text: str) -> "JobSampling":
        d = json.loads(text)
        return cls(temperature=float(d["temperature"]), top_p=float(d["top_p"]), top_k=int(d["top_k"]),
                   max_tokens=int(d["max_tokens"]), stop=tuple(d["stop"]), seed=d["seed"],
                   ignore_eos=bool(d["ignore_eos"]))

    def to_proto(self) -> pb.SamplingParams:
        return pb.SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                 max_tokens=self.max_tokens, stop=self.stop, seed=self.seed,
                                 ignore_eos=self.ignore_eos)
