"""One-off: per-step phase breakdown of the engine as of commit e4c6cc9 (before issue 9), by wrapping."""
import json, sys, time, collections, torch
from transformers import LlamaConfig
import services.worker.engine as E
from bench.engine_bench import LLAMA3_8B
from services.worker.config import WorkerConfig
from services.worker.factory import build_engine
from services.worker.model_runner import load_hf_model
from services.worker.sequence import Sampling

T = collections.defaultdict(float)
def wrap(obj, name, label):
    f = getattr(obj, name)
    def g(*a, **k):
        torch.cuda.synchronize(); t = time.perf_counter()
        r = f(*a, **k)
        torch.cuda.synchronize(); T[label] += time.perf_counter() - t
        return r
    setattr(obj, name, g)

cfg = LlamaConfig(**LLAMA3_8B)
t = time.perf_counter()
hf = load_hf_model(None, torch.bfloat16, torch.device("cuda"), random_weights=True, config=cfg)
eng = build_engine(WorkerConfig(device="cuda", dtype="bfloat16", max_batch=128, token_budget=2048, num_host_blocks=0, max_model_len=4096), model=hf)
print("build", time.perf_counter() - t, flush=True)
wrap(eng.sched, "schedule", "schedule")
wrap(eng, "_chunk", "prepare_chunks")
wrap(eng.runner, "prepare_decode", "prepare_inputs"); wrap(eng.runner, "prepare_mixed", "prepare_inputs")
wrap(eng.runner.graphs, "run", "forward_decode_graph"); wrap(eng.runner, "forward_mixed", "forward_mixed_eager")
wrap(E, "sample", "sample_and_copy_back")
wrap(eng, "_append_token", "bookkeeping_detok")
pairs = json.load(open(".bench-data/sharegpt_lengths.json"))[:1000]
res = {}
for run in ("first", "second"):
    T.clear()
    g = torch.Generator().manual_seed(2)
    for i, (a, b) in enumerate(pairs):
        eng.add(f"{run}{i}", torch.randint(0, cfg.vocab_size, (a,), generator=g).tolist(), Sampling(max_tokens=b, ignore_eos=True))
    torch.cuda.synchronize(); t = time.perf_counter(); n = steps = 0; mixed = 0
    while eng.has_work:
        o = eng.step(); n += len(o.deltas); steps += 1
    sec = time.perf_counter() - t
    res[run] = {"tok_s": n / sec, "seconds": sec, "steps": steps, "tokens": n, "phase_s": dict(T)}
    print(run, json.dumps(res[run]), flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
