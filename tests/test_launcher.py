"""`make run` as a user runs it: the launcher starts everything, the CLI finds it, Ctrl-C stops it all,
and what the predictor learned from the served job is kept for the next run."""
from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time

import httpx2 as httpx           # the HTTP client the openai package uses

from services.common.local_stack import free_port
from services.common.model_paths import cache_root


def test_launcher_serves_the_cli_and_keeps_what_the_predictor_learned(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(cache_root() / "models")          # the converted model, not a copy
    http_port = free_port()
    env = {**os.environ, "ALISE_CACHE": str(cache), "ALISE_PORT": str(free_port()), "ALISE_HTTP_PORT": str(http_port)}
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
        # the OpenAI-compatible API, over TLS with the same CA and API key
        key = (cache / "local" / "api-key").read_text()
        ca = cache / "local" / "tls" / "ca.crt"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=60) as http:
            models = http.get(f"https://127.0.0.1:{http_port}/v1/models", headers={"authorization": f"Bearer {key}"})
        assert models.status_code == 200 and models.json()["data"][0]["id"]
        time.sleep(2.0)                                               # the predictor reads the stream
    finally:
        launcher.send_signal(signal.SIGINT)                           # Ctrl-C
        launcher.wait(60)
    assert launcher.returncode == 0
    assert (cache / "predictor" / "index.npz").exists() and (cache / "predictor" / "meta.json").exists()
