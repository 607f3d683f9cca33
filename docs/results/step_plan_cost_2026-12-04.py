"""Host cost of StepScheduler.schedule() with 512 running decodes: the decodes-first order (session 20) against the
admission order it replaced. Run from the repository root (dev VM, 2 cores):

    PYTHONPATH=. .venv/bin/python docs/results/step_plan_cost_2026-12-04.py
"""
import time

from services.worker.block_manager import BlockManager
from services.worker.sequence import Sampling, Sequence
from services.worker.step_scheduler import StepScheduler


def decoding(batch: int = 512):
    """A scheduler with `batch` sequences past their prompts, each with one token to compute per step."""
    blocks = BlockManager(num_blocks=40000, block_size=16)
    sched = StepScheduler(blocks, max_batch=batch, token_budget=4096, max_model_len=4096)
    seqs = [Sequence(f"s{i}", [1] * 100, Sampling(max_tokens=4000, ignore_eos=True)) for i in range(batch)]
    for s in seqs:
        sched.add(s)
    for _ in range(20):
        for c in sched.schedule().chunks:
            if c.start + c.num_tokens == c.seq.num_tokens:
                c.seq.output_ids.append(7)
    return sched


def us_per_schedule(sched, steps: int = 300) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        for c in sched.schedule().chunks:
            c.seq.output_ids.append(7)
    return (time.perf_counter() - t) / steps * 1e6


def main() -> None:
    decodes_first = StepScheduler._decodes_first
    for label, order in (("admission order", lambda self: list(self.running)), ("decodes first", decodes_first)):
        StepScheduler._decodes_first = order
        print(f"{label}: {min(us_per_schedule(decoding()) for _ in range(3)):.0f} us per schedule(), 512 decodes")
    StepScheduler._decodes_first = decodes_first


if __name__ == "__main__":
    main()
