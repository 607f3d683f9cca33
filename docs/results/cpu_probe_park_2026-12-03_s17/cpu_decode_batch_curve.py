"""Decode step time vs batch size on the CPU engine (SmolLM2 fp32), contexts ~160 tokens."""
import time, statistics, torch
from services.worker.config import WorkerConfig
from services.worker.factory import build_engine
from services.worker.sequence import Sampling
engine = build_engine(WorkerConfig(device="cpu", num_blocks=2048))
gen = torch.Generator().manual_seed(0)
res = {}
for rep in range(2):
    for B in (4, 8, 10, 11, 12, 13, 14, 16):
        ids = [f"r{rep}b{B}i{i}" for i in range(B)]
        for j in ids:
            engine.add(j, torch.randint(100, 20000, (130,), generator=gen).tolist(), Sampling(max_tokens=80, ignore_eos=True))
        while any(s.num_uncomputed > 1 for s in engine.sched.running) or len(engine.sched.running) < B:
            engine.step()
        for _ in range(3):
            engine.step()
        ts = []
        for _ in range(15):
            t = time.perf_counter(); engine.step(); ts.append(time.perf_counter() - t)
        for j in ids:
            engine.abort(j)
        while engine.has_work:
            engine.step()
        res.setdefault(B, []).append(statistics.median(ts))
        print(rep, B, "%.4f s/step  %.1f ms/token  %.1f tok/s" % (statistics.median(ts), 1e3 * statistics.median(ts) / B, B / statistics.median(ts)), flush=True)
