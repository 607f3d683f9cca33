"""How a preempted job gives up its worker: the one name for it in the scheduler, the worker, the simulator
and on the wire."""
from __future__ import annotations

from enum import Enum

from alise.v1 import worker_pb2 as wpb


class PreemptMode(str, Enum):
    RECOMPUTE = "recompute"     # drop the KV; the scheduler re-sends prompt + output when it resumes the job
    SWAP = "swap"               # copy the KV to host memory; resumed on this worker

    def __str__(self) -> str:   # flags and messages show the value ("swap"), not the member name
        return self.value

    @property
    def wire(self) -> int:
        return wpb.PREEMPT_MODE_SWAP if self is PreemptMode.SWAP else wpb.PREEMPT_MODE_RECOMPUTE

    @classmethod
    def from_wire(cls, value: int) -> "PreemptMode":
        """Anything but swap (recompute, or unset from an older peer) is recompute: it is always possible."""
        return cls.SWAP if value == wpb.PREEMPT_MODE_SWAP else cls.RECOMPUTE
