"""`make run` as a user runs it: the launcher starts everything, the CLI finds it, Ctrl-C stops it all,
and what the predictor learned from the served job is kept for the next run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from services.common.local_stack import free_port
from services.common.model_paths import cache_root


def test_launcher_serves_the_cli_and_keeps_what_the_predictor_learned(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(cache_root() / "models")          # the converted model, not a copy
    env = {**os.environ, "ALISE_CACHE": str(cache), "ALISE_PORT": str(free_port())}
    launcher = subprocess.Popen([sys.executable, "-m", "services.launcher"], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = launcher.stdout.readline()
            assert line, "launcher exited before serving"
            if "ALISE is serving" in line:
                break
        answer = subprocess.run([sys.executable, "-m", "client.cli", "generate", "--chat",
                                 "What is the capital of France?", "--max-tokens", "32"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert answer.returncode == 0 and "Paris" in answer.stdout, answer.stderr[-2000:]
        time.sleep(2.0)                                               # the predictor reads the stream
    finally:
        launcher.send_signal(signal.SIGINT)                           # Ctrl-C
        launcher.wait(60)
    assert launcher.returncode == 0
    assert (cache / "predictor" / "index.npz").exists() and (cache / "predictor" / "meta.json").exists()
