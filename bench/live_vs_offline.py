"""Live serving against the offline engine, on the same requests and the same machine.

1. offline: the worker's engine in this process's child, fed the workload's prompts (tokenized as the
   scheduler tokenizes them) with the dataset's output lengths; output tokens/s after a priming run.
2. live: the whole stack as real processes (Redis, scheduler, one GPU worker; no predictor, so the scheduler
   uses its prior), the same workload sent at once by `alise bench serve`'s load generator after a priming run.
Prints both, and live / offline. The engine runs in a child process each time, so the two never share the GPU.
With ALISE_PROFILE_THREADS=FILE the worker samples its threads during the measured live run (thread_sampler.py).

    python -m bench.live_vs_offline --model-dir DIR --dataset-path sharegpt.json --out results/ [--repeats 3 --rounds 2]
With repeats and rounds, live / offline is the median live run over the median offline run.
DIR holds a config.json (e.g. Llama-3-8B's shape) and a tokenizer; the worker builds random bf16 weights.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.process_cpu import cpu_share, process_cpu
from bench.serve import Target, run
from bench.serve_metrics import format_summary, summarize
from bench.workloads import BenchRequest, Dataset, load, rendered_chat
from services.common import thread_sampler


def worker_flags(a: argparse.Namespace) -> list[str]:
    """The worker's settings, as flags: the offline engine is built from the very same ones."""
    gpu = a.device == "cuda"
    flags = ["--device", a.device, "--dtype", "bfloat16" if gpu else "float32", "--model-dir", a.model_dir,
             "--max-model-len", "4096", "--num-host-blocks", "0", "--max-batch", str(a.max_batch)]
    return flags + (["--random-weights"] if gpu or a.random_weights else [])


def offline(a: argparse.Namespace) -> dict:
    """Child process: the engine alone on the workload; prints one JSON line."""
    import torch

    from services.worker.factory import build_engine
    from services.worker.sequence import Sampling

    requests, tok = workload(a)
    from services.worker.config import WorkerConfig

    engine = build_engine(WorkerConfig.from_args(worker_flags(a)))
    out = {}
    for name, batch in runs(requests, a):
        for i, r in enumerate(batch):
            text = rendered_chat(r, tok) if r.as_chat else r.prompt      # as the scheduler renders a chat
            engine.add(f"{name}-{i}", tok.encode(text, add_special_tokens=False),
                       Sampling(max_tokens=r.output_tokens, ignore_eos=True))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t, produced = time.perf_counter(), 0
        while engine.has_work:
            produced += sum(len(d.token_ids) for d in engine.step().deltas)
        sec = time.perf_counter() - t
        out[name] = {"requests": len(batch), "output_tokens": produced, "seconds": sec,
                     "output_tokens_per_s": produced / sec}
    print("OFFLINE " + json.dumps(out), flush=True)
    return out


def runs(requests: list, a: argparse.Namespace) -> list[tuple[str, list]]:
    """A priming run, then the measured run `--repeats` times ("measured", "measured-2", ...). Each run's prompts
    start with the run's name, so no run finds another's prompts in the prefix cache (a repeat of the same
    prompts would skip most of its prefill, and the GPU-bound offline side would gain more from it than live)."""
    names = ["prime"] + ["measured" if i == 0 else f"measured-{i + 1}" for i in range(a.repeats)]
    return [(name, [tagged(r, name) for r in (requests[:a.prime] if name == "prime" else requests)]) for name in names]


def tagged(req: BenchRequest, tag: str) -> BenchRequest:
    """The request with `tag` in front of its first message."""
    if req.history:
        (role, text), *rest = req.history
        return replace(req, history=((role, f"[{tag}] {text}"), *rest))
    return replace(req, prompt=f"[{tag}] {req.prompt}")


def measured(res: dict, key: str) -> list[float]:
    """One phase's figure (tok/s) in each of its measured runs."""
    return [v[key] for name, v in res.items() if name.startswith("measured")]


def workload(a: argparse.Namespace):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    return load(Dataset(a.dataset_name), a.dataset_path, a.num_prompts, tok), tok


def live(a: argparse.Namespace) -> dict:
    from services.common.local_stack import LocalStack

    requests, _ = workload(a)
    if a.profile_scheduler:                  # the scheduler under cProfile (it exits cleanly on SIGTERM)
        class ProfiledStack(LocalStack):
            def scheduler_command(self) -> list[str]:
                return ["cProfile", "-o", str(a.out / "scheduler.prof"), "-m", *super().scheduler_command()]
        LocalStack = ProfiledStack  # noqa: N806
    stack = LocalStack(log_dir=a.out / "stack", with_predictor=False, worker_args=worker_flags(a) + a.worker_arg,
                       scheduler_args=["--model-dir", a.model_dir, "--policy", a.policy, "--max-tokens-cap", "4096"])
    stack.start(timeout_s=900)
    try:
        target = Target(stack.address, stack.api_key)
        res = {}
        for name, batch in runs(requests, a):
            if name == "measured" and os.environ.get(thread_sampler.ENV):
                os.kill(stack.services["worker-0"].proc.pid, signal.SIGUSR2)   # its thread profile starts here
            before = process_cpu(stack)
            results, duration = asyncio.run(run(batch, target, rate=math.inf, burstiness=1.0, seed=0,
                                                max_concurrency=0, ignore_eos=True, label=f"{name}-{a.policy}",
                                                progress=False))
            res[name] = summarize(results, duration, [50, 90, 99])
            res[name]["label"] = f"live {name} ({a.policy})"
            # share of one core each process used during the run: a process near 1.0 is what limits it
            res[name]["cpu_share"] = cpu_share(before, process_cpu(stack), duration)
            print("CPU share of one core:", {k: round(v, 2) for k, v in res[name]["cpu_share"].items()})
            print(format_summary(res[name]), flush=True)
        return res
    finally:
        stack.stop()
        if a.profile_scheduler:
            import pstats

            pstats.Stats(str(a.out / "scheduler.prof")).sort_stats("tottime").print_stats(30)


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", nargs="?", choices=["both", "offline"], default="both")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--dataset-name", default="sharegpt")
    p.add_argument("--dataset-path", type=Path, help="not needed for synthetic")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--max-batch", type=int, default=0, help="0: the worker's default")
    p.add_argument("--device", default="cuda", help="cuda: random bf16 weights; cpu: the model's own, fp32")
    p.add_argument("--random-weights", action="store_true", help="on CPU too (a tiny model stresses the serving path)")
    p.add_argument("--prime", type=int, default=100, help="requests of the priming run before each measurement")
    p.add_argument("--repeats", type=positive, default=1, help="measured runs per phase, after one priming run")
    p.add_argument("--rounds", type=positive, default=1,
                   help="offline-then-live rounds, each phase in fresh processes (machines drift: alternate)")
    p.add_argument("--policy", default="fcfs")
    p.add_argument("--profile-scheduler", action="store_true", help="run the scheduler under cProfile, print its top")
    p.add_argument("--worker-arg", action="append", default=[], help="extra worker flag for the live phase (repeat)")
    p.add_argument("--skip-offline", action="store_true", help="live phase only")
    p.add_argument("--out", type=Path, default=Path("live_vs_offline"))
    a = p.parse_args()
    if a.phase == "offline":
        offline(a)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    if a.skip_offline:
        live(a)
        return
    rounds = [one_round(a) for _ in range(a.rounds)]
    off = [x for r in rounds for x in measured(r["offline"], "output_tokens_per_s")]
    on = [x for r in rounds for x in measured(r["live"], "output_throughput")]
    # the median of each side: one slow run (the host's neighbours, a GC pause) should not decide the ratio
    ratio = statistics.median(on) / statistics.median(off)
    result = {"rounds": rounds, "offline_tok_s": off, "live_tok_s": on, "live_over_offline": ratio,
              "per_round": [r["live_over_offline"] for r in rounds]}
    if a.rounds == 1:                          # the layout earlier results were saved in
        result.update(offline=rounds[0]["offline"], live=rounds[0]["live"])
    (a.out / "live_vs_offline.json").write_text(json.dumps(result, indent=2))
    print(f"\noffline tok/s {[round(x) for x in off]}, live tok/s {[round(x) for x in on]} ({a.policy}): "
          f"median live / median offline = {ratio:.3f}; per round {[round(x, 3) for x in result['per_round']]}")


def one_round(a: argparse.Namespace) -> dict:
    """Offline in a child process, then live: both on the same requests, each after its own priming run."""
    args = [x for x in sys.argv[1:] if x != "both"]
    child = subprocess.run([sys.executable, "-m", "bench.live_vs_offline", "offline", *args],
                           capture_output=True, text=True)
    line = next((x for x in child.stdout.splitlines() if x.startswith("OFFLINE ")), None)
    if line is None:
        raise SystemExit(f"offline phase failed:\n{child.stdout[-3000:]}\n{child.stderr[-5000:]}")
    off = json.loads(line[len("OFFLINE "):])
    print(f"offline: {json.dumps(off)}", flush=True)
    on = live(a)
    ratio = statistics.median(measured(on, "output_throughput")) / statistics.median(
        measured(off, "output_tokens_per_s"))
    print(f"round: live / offline = {ratio:.3f}", flush=True)
    return {"offline": off, "live": on, "live_over_offline": ratio}


if __name__ == "__main__":
    main()
