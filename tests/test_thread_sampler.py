"""The benchmark's thread profiler: a busy thread shows up with its CPU time and the function it spends it in."""
from __future__ import annotations

import json
import threading
import time

from services.common.thread_sampler import ThreadSampler


def spin(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def test_a_busy_thread_is_sampled_with_its_cpu_time_and_its_function(tmp_path):
    out = tmp_path / "threads.json"
    sampler = ThreadSampler(out, interval_s=0.005)
    stop = threading.Event()
    busy = threading.Thread(target=spin, args=(stop,), name="busy")
    busy.start()
    sampler.start()
    deadline = time.monotonic() + 60
    while (sampler.samples["busy"] < 20 or "busy" not in sampler.cpu_seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    sampler.finish()
    stop.set()
    busy.join()
    report = json.loads(out.read_text())
    thread = report["threads"]["busy"]
    assert thread["samples"] >= 20 and thread["cpu_s"] > 0
    assert dict(thread["inclusive"])["test_thread_sampler.py:spin"] >= 20
    assert report["gil_probe"]["wakeups"] > 0


def test_a_folder_given_gets_one_file_per_process_named_by_its_service(tmp_path):
    import os
    import subprocess
    import sys

    folder = tmp_path / "profiles"
    code = ("from services.common import thread_sampler; import os, time; "
            "thread_sampler.start_from_env('scheduler'); time.sleep(0.3); print(os.getpid())")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ALISE_PROFILE_THREADS": f"{folder}/"},
                          capture_output=True, text=True, timeout=120, check=True)
    report = json.loads((folder / f"scheduler-{done.stdout.strip()}.json").read_text())
    assert report["seconds"] > 0 and "MainThread" in report["threads"]


def test_a_file_given_is_written_by_the_worker_only_never_by_two_processes(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "threads.json"
    for service, takes_file in (("scheduler", False), ("worker", True)):
        code = ("from services.common import thread_sampler; import time; "
                f"print(thread_sampler.start_from_env({service!r}, takes_file={takes_file}) is not None); "
                "time.sleep(0.3)")
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ALISE_PROFILE_THREADS": str(out)},
                              capture_output=True, text=True, timeout=120, check=True)
        assert done.stdout.strip() == str(takes_file) and out.exists() == takes_file
    assert json.loads(out.read_text())["seconds"] > 0
