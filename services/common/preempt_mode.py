"""How a preempted job gives up its worker: the one name for it in the scheduler, the worker, the simulator
and on the wire."""
from __future__ import annotations

from enum import Enum

from alise.v1 import worker_pb2 as wpb


class PreemptMode(str, Enum):
    RECOMPUTE = "recompute"     # drop the KV; the scheduler re-sends prompt + output when it resumes the job
    SWAP = "swap"               # copy the KV to host memory; resumed on this worker
    PARK = "park"               # keep the KV on the device, stop decoding; resumed on this worker at no cost (the
                                # worker drops parked KV first when its pool runs short: the job is then recomputed)

    def __str__(self) -> str:   # flags and messages show the value ("swap"), not the member name
        return self.value

    @property
    def keeps_kv(self) -> bool:
        """The worker still holds the job's KV: resuming it there needs no recompute."""
        return self is not PreemptMode.RECOMPUTE

    @property
    def wire(self) -> int:
        return _WIRE[self]

    @classmethod
    def from_wire(cls, value: int) -> "PreemptMode":
        """Anything unknown (recompute, or unset from an older peer) is recompute: it is always possible."""
        return _FROM_WIRE.get(value, cls.RECOMPUTE)


_WIRE = {PreemptMode.RECOMPUTE: wpb.PREEMPT_MODE_RECOMPUTE, PreemptMode.SWAP: wpb.PREEMPT_MODE_SWAP,
         PreemptMode.PARK: wpb.PREEMPT_MODE_PARK}
_FROM_WIRE = {v: k for k, v in _WIRE.items()}
