"""A sampling profiler for every Python thread of a process, for benchmarks on machines without py-spy.

cProfile sees one thread; a worker runs the engine thread, the asyncio (gRPC) thread and torch's own threads
against one GIL, and what limits it is how they share that lock. Every `interval_s` this samples each thread's
Python stack (`sys._current_frames`) and, at the end, reads each thread's CPU seconds from /proc. It also
measures how long a thread that wants the GIL waits for it: a probe thread sleeps 5 ms and times how late it wakes.

    ALISE_PROFILE_THREADS=/tmp/worker_threads.json python -m services.worker.server ...
    ALISE_PROFILE_THREADS=/tmp/profiles/ alise bench sweep ...      (a file per profiled service of each stack)

writes, at exit, per thread: CPU seconds, samples, the functions most often on its stack (inclusive) and at
its top (exclusive), plus the probe's GIL wait. SIGUSR2 starts the counts afresh (a benchmark sends it when
its measured phase begins, so model loading and priming are left out). Overhead: one stack walk per thread per
sample, holding the GIL: ~1% of a core for the worker's few threads at 100 Hz, but 9% (12.7 of 137.6 CPU seconds) in
a scheduler of ~45 threads (session 44), enough to push an event loop near a full core behind. Read its samples of a
thread that calls into the kernel often (an asyncio loop) with care: the sampler gets the GIL when that thread lets
go of it, mostly at a system call, so its samples pile up on `select` and socket writes whatever it spends its
time on; cProfile is the profile of such a thread.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ENV = "ALISE_PROFILE_THREADS"
TOP = 25              # functions kept per thread and kind
CPU_READ_S = 1.0      # how often threads' CPU seconds are read (the report uses the last read)
PROBE_SLEEP_S = 0.005


def frame_key(frame) -> str:
    code = frame.f_code
    return f"{Path(code.co_filename).name}:{code.co_name}"


def cpu_seconds(native_id: int) -> float | None:
    """User + system CPU seconds of one thread of this process (Linux), None where /proc has no such task."""
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime, stime (fields 14, 15)


def tasks_cpu() -> Counter:
    """CPU seconds of every OS thread of this process by its name (gRPC's and torch's threads run no Python)."""
    out: Counter = Counter()
    for task in Path("/proc/self/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        out[comm] += cpu_seconds(int(task.name)) or 0.0
    return out


class ThreadSampler(threading.Thread):
    def __init__(self, out: Path, interval_s: float = 0.01):
        super().__init__(name="thread-sampler", daemon=True)
        self.out, self.interval_s = out, interval_s
        self.inclusive: dict[str, Counter] = defaultdict(Counter)
        self.exclusive: dict[str, Counter] = defaultdict(Counter)
        self.samples: Counter = Counter()
        self.cpu_start: dict[str, float] = {}
        self.probe_late: list[float] = []
        self.stop_event = threading.Event()
        self.started_at = time.monotonic()
        self.process_cpu_start = sum(os.times()[:2])
        self.tasks_start = tasks_cpu()
        self.cpu_seen: dict[str, float] = {}
        self.tasks_seen, self.process_cpu_seen, self.seen_at = self.tasks_start, self.process_cpu_start, self.started_at

    def reset(self) -> None:
        """Forget everything so far (from a signal handler: only rebinds, never waits on a lock)."""
        self.inclusive, self.exclusive, self.samples = defaultdict(Counter), defaultdict(Counter), Counter()
        self.probe_late = []
        self.cpu_start = {t.name: cpu_seconds(t.native_id) or 0.0 for t in threading.enumerate() if t.native_id}
        self.started_at, self.process_cpu_start = time.monotonic(), sum(os.times()[:2])
        self.tasks_start = tasks_cpu()
        self.cpu_seen = {}
        self.tasks_seen, self.process_cpu_seen, self.seen_at = self.tasks_start, self.process_cpu_start, self.started_at

    def run(self) -> None:
        threading.Thread(target=self._probe, name="gil-probe", daemon=True).start()
        last_cpu_read = 0.0
        while not self.stop_event.wait(self.interval_s):
            self._sample()
            if time.monotonic() - last_cpu_read > CPU_READ_S:     # while the threads live (not at exit)
                last_cpu_read = time.monotonic()
                self._read_cpu()

    def _read_cpu(self) -> None:
        for t in threading.enumerate():
            if t.native_id is not None and (cpu := cpu_seconds(t.native_id)) is not None:
                self.cpu_seen[t.name] = cpu
        self.tasks_seen = tasks_cpu()
        self.process_cpu_seen = sum(os.times()[:2])
        self.seen_at = time.monotonic()

    def _sample(self) -> None:
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            name = names.get(ident, str(ident))
            if name in ("thread-sampler", "gil-probe"):
                continue
            self.samples[name] += 1
            self.exclusive[name][frame_key(frame)] += 1
            seen = set()
            while frame is not None:
                key = frame_key(frame)
                if key not in seen:           # recursion counts once per sample
                    seen.add(key)
                    self.inclusive[name][key] += 1
                frame = frame.f_back

    def _probe(self) -> None:
        while not self.stop_event.is_set():
            t = time.perf_counter()
            time.sleep(PROBE_SLEEP_S)
            self.probe_late.append(time.perf_counter() - t - PROBE_SLEEP_S)

    def report(self) -> dict:
        threads = {name: {"cpu_s": round(cpu - self.cpu_start.get(name, 0.0), 3)} for name, cpu in self.cpu_seen.items()}
        for name, n in self.samples.items():
            threads.setdefault(name, {})
            threads[name].update(samples=n, inclusive=self.inclusive[name].most_common(TOP),
                                 exclusive=self.exclusive[name].most_common(TOP))
        late = sorted(self.probe_late) or [0.0]
        return {"seconds": time.monotonic() - self.started_at, "interval_s": self.interval_s,
                "cpu_read_at_s": self.seen_at - self.started_at,   # CPU figures below are as of then
                "process_cpu_s": self.process_cpu_seen - self.process_cpu_start,
                "gil_probe": {"wakeups": len(self.probe_late), "mean_late_ms": 1e3 * sum(late) / len(late),
                              "p50_late_ms": 1e3 * late[len(late) // 2], "p99_late_ms": 1e3 * late[int(0.99 * (len(late) - 1))]},
                "threads": threads,
                "os_threads_cpu_s": {k: round(v, 3) for k, v in (self.tasks_seen - self.tasks_start).most_common(20)}}

    def finish(self) -> None:
        self.stop_event.set()
        self.out.write_text(json.dumps(self.report(), indent=1))


def start_from_env(service: str, takes_file: bool = False) -> ThreadSampler | None:
    """Starts the sampler when ALISE_PROFILE_THREADS is set; it writes its report at exit. A name that ends in "/"
    is a folder: each process that starts the sampler writes SERVICE-PID.json there (a stack started with the
    variable set, as `alise bench sweep` starts one, profiles its worker and scheduler). Any other name is one file,
    written by the service that `takes_file` only (the worker), so that two processes never write one file."""
    path = os.environ.get(ENV)
    if not path:
        return None
    if path.endswith("/"):
        Path(path).mkdir(parents=True, exist_ok=True)
        path = f"{path}{service}-{os.getpid()}.json"
    elif not takes_file:
        return None
    sampler = ThreadSampler(Path(path))
    sampler.start()
    atexit.register(sampler.finish)
    signal.signal(signal.SIGUSR2, lambda *_: sampler.reset())
    return sampler
