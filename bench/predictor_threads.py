"""The predictor's math threads under a paced load with online learning: CPU spent and Predict latency, by thread
count. As in the service, predictions run on one thread (the batcher's) and learning on another (the observation
feed's), each calling into torch, numpy and faiss; every thread count runs in a fresh process whose
OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS say it before those libraries load, or with --in-process
none of them, and the process limits its pools once loaded as the service does with --math-threads (session 33;
before, the service set nothing and its pools took every core of the machine). A pool of math threads pays a
wake-up per small operation once its threads have gone to sleep between paced requests, and the learning thread's
calls get a pool of their own.

    python -m bench.predictor_threads --threads 1 2 --rate 48 --seconds 30 [--in-process]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def measure(a) -> dict:
    """In this process: `rate` predictions a second in batches of `batch` for `seconds`, and `learn` finished jobs
    learned every 2 s beside them."""
    import math
    import resource
    import threading
    import time

    from services.predictor.encoder import load_encoder
    from services.predictor.length_predictor import LengthPredictor, PredictorParams

    from services.predictor.math_threads import limit_math_threads

    if a.math_threads:              # as the service does it: its pools limited once loaded (--math-threads)
        limit_math_threads(a.math_threads)
    model = Path(a.model_dir)
    predictor = LengthPredictor(load_encoder("auto", model / "encoder", None, False),
                                PredictorParams(prior_log_mean=math.log(128)))
    predictor.load(model)
    data = json.loads(Path(a.dataset_path).read_text())
    prompts = [t["value"] for d in data for t in d["conversations"] if t.get("from") == "human"]
    predictor.predict(prompts[:8])                       # warm
    stop = threading.Event()

    def learn():
        if a.math_threads:          # OpenMP's count is per thread: the service's learning threads set it too
            limit_math_threads(a.math_threads)
        i = 0
        while not stop.wait(2.0):
            batch = prompts[i % len(prompts):i % len(prompts) + a.learn]
            predictor.observe(batch, [64 + (37 * j) % 900 for j in range(len(batch))])
            i += a.learn

    learner = threading.Thread(target=learn, daemon=True)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    learner.start()
    latencies, gap = [], a.batch / a.rate
    for k in range(int(a.seconds / gap)):
        i = (k * a.batch) % (len(prompts) - a.batch)
        t = time.perf_counter()
        predictor.predict(prompts[i:i + a.batch])
        latencies.append(time.perf_counter() - t)
        time.sleep(max(0.0, start + (k + 1) * gap - time.perf_counter()))
    stop.set()
    learner.join()
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    latencies.sort()
    return {"threads": os.environ.get("OMP_NUM_THREADS"), "math_threads": a.math_threads,
            "cores_used": round(cpu / wall, 3),
            "predict_p50_ms": round(latencies[len(latencies) // 2] * 1e3, 2),
            "predict_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 2), "learned": predictor.size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rate", type=float, default=48.0, help="prompts predicted a second")
    p.add_argument("--batch", type=int, default=3, help="prompts a Predict batch (the batcher coalesces calls)")
    p.add_argument("--learn", type=int, default=32, help="finished jobs learned every 2 s")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--model-dir", default=".bench-data/predictor_880")
    p.add_argument("--dataset-path", default=".bench-data/sharegpt_heldout_880.json")
    p.add_argument("--in-process", action="store_true",
                   help="no environment variables: each thread count set in the process as the service's "
                        "--math-threads sets it (services/predictor/server.limit_math_threads)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)     # a child: measure here
    p.add_argument("--math-threads", type=int, default=0, help=argparse.SUPPRESS)    # the child's, --in-process
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a)))
        return
    for n in a.threads:
        env = {**os.environ, **({} if a.in_process else {v: str(n) for v in THREAD_VARS})}
        child = [*(["--math-threads", str(n)] if a.in_process else []), "--rate", str(a.rate), "--batch", str(a.batch),
                 "--learn", str(a.learn), "--seconds", str(a.seconds), "--model-dir", a.model_dir,
                 "--dataset-path", a.dataset_path, "--one"]
        out = subprocess.run([sys.executable, "-m", "bench.predictor_threads", *child], env=env, check=True,
                             capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
