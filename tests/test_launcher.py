"""`make run` as a user runs it: the launcher starts everything, the CLI finds it, Ctrl-C stops it all,
and what the predictor learned from the served job is kept for the next run."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx           # the HTTP client the openai package uses
import pytest

from services.common.local_stack import REDIS_STOP_S, SERVICE_STOP_S, free_port
from services.common.model_paths import cache_root
from tests.helpers import wait_until

# the launcher's bound on stopping its stack (three services, one of them a worker, then Redis), and a margin
STOP_BOUND_S = 3 * SERVICE_STOP_S + REDIS_STOP_S + 30


@pytest.mark.timeout(900)      # two starts (up to 240 s each) and two stops (up to STOP_BOUND_S each) on a busy host
def test_launcher_serves_the_cli_and_keeps_what_the_predictor_learned(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(cache_root() / "models")          # the converted model, not a copy
    http_port = free_port()
    env = {**os.environ, "ALISE_CACHE": str(cache), "ALISE_PORT": str(free_port()), "ALISE_HTTP_PORT": str(http_port)}
    launcher = start_launcher(env)
    lines = []
    try:
        lines = read_until_serving(launcher)
        second_make_run_keeps_to_its_own_files(env, cache)
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
        stop_launcher(launcher, lines)                                # Ctrl-C
    assert launcher.returncode == 0
    assert (cache / "predictor" / "index.npz").exists() and (cache / "predictor" / "meta.json").exists()


def test_a_launcher_stopped_while_starting_stops_what_it_started(tmp_path):
    """`kill`, a closed terminal or Ctrl-C during the minutes of starting used to end the launcher before its
    cleanup, and Redis, the predictor, the scheduler and the worker (in sessions of their own, so no terminal
    signal reaches them) kept running (found by review)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(cache_root() / "models")
    env = {**os.environ, "ALISE_CACHE": str(cache), "ALISE_PORT": str(free_port()), "ALISE_HTTP_PORT": str(free_port())}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        launcher = start_launcher(env)
        try:
            children = wait_until(lambda: kids if len(kids := child_pids(launcher.pid)) >= 4 else None, 240, 0.1)
        finally:
            launcher.send_signal(sig)                                 # still starting: not yet serving
            launcher.wait(120)
        wait_until(lambda: not any(alive(pid) for pid in children), 60, 0.2)


def test_one_launcher_at_a_time_owns_the_files_the_cli_reads(tmp_path):
    """Two `make run`s started a few seconds apart both found no live stack at the written address (the first was
    still starting) and both rewrote the API key, the service token and the CA under each other (found by
    review). A lock held for the launcher's life decides now; the OS releases it however the launcher ends."""
    from services.launcher import claim_shared_files

    first = claim_shared_files(tmp_path)
    assert first is not None and claim_shared_files(tmp_path) is None
    first.close()                                                     # the first launcher has ended
    assert claim_shared_files(tmp_path) is not None


def child_pids(pid: int) -> list[int]:
    """The process's children (Redis and the three services, once started)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"      # a zombie has stopped
    except (OSError, IndexError):
        return False


def start_launcher(env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "services.launcher"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def read_until_serving(launcher: subprocess.Popen, timeout_s: float = 240) -> list[str]:
    """The launcher's lines up to 'ALISE is serving'; the list keeps growing with what it says after (read on a
    thread of its own, so that the launcher never blocks on a full pipe, and its last words can be shown)."""
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = launcher.stdout.readline()
        assert line, "launcher exited before serving:\n" + "".join(lines[-30:])
        lines.append(line)
        if "ALISE is serving" in line:
            threading.Thread(target=lambda: lines.extend(launcher.stdout), daemon=True).start()
            return lines
    raise AssertionError("launcher not serving in time")


def stop_launcher(launcher: subprocess.Popen, lines: list[str] | None = None) -> None:
    """Ctrl-C, and wait past the launcher's own bound (each service gets 20 s of SIGTERM before SIGKILL, Redis 10
    s). One CI run saw a second launcher still running 60 s after Ctrl-C, with nothing to tell why: a launcher that
    does not stop is now killed and its last words (which service it waited on) and its services' logs shown."""
    launcher.send_signal(signal.SIGINT)
    try:
        launcher.wait(STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        for pid in [*child_pids(launcher.pid), launcher.pid]:           # no stack left running behind the test
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()
        time.sleep(1.0)                                                 # the reader takes the last lines
        said = "".join((lines or [])[-60:])
        logs = [Path(m.group(1)) for line in lines or [] if (m := re.search(r"logs (/\S+)\)", line))]
        tails = "".join(f"\n--- {f}\n" + "".join(f.read_text(errors="replace").splitlines(True)[-15:])
                        for d in logs for f in sorted(d.glob("*.log")))
        raise AssertionError(f"the launcher did not stop within {STOP_BOUND_S} s of Ctrl-C; it said:\n{said[-4000:]}"
                             f"{tails[-8000:]}") from None


def second_make_run_keeps_to_its_own_files(env: dict, cache):
    """A second `make run` beside a live one serves with credentials of its own and leaves the files the CLI
    reads (address, API key, CA) to the first (the CLI test after this one still reaches the first)."""
    shared = {name: (cache / name).read_bytes() for name in ("address", "local/api-key", "local/tls/ca.crt")}
    second = start_launcher({**env, "ALISE_PORT": str(free_port()), "ALISE_HTTP_PORT": str(free_port())})
    lines = []
    try:
        lines = read_until_serving(second)
        assert any(line.startswith("note: another `make run` serves") for line in lines), "".join(lines)
        assert {name: (cache / name).read_bytes() for name in shared} == shared
    finally:
        stop_launcher(second, lines)
    assert second.returncode == 0


def test_a_stop_signal_inside_a_spawn_takes_effect_once_the_handle_is_kept():
    """The launcher's handler raises while the stack starts. Raised inside Popen after the fork, it left the child
    running with no handle to stop it (a launcher stopped while starting left a service alive: the test above,
    flaky). Inside `signals_deferred` a stop signal waits until the block ends, once the handle is kept."""
    from services.common.local_stack import signals_deferred

    def stop(*_):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, stop)
    kept = None
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)          # arrives in the middle of the block
                time.sleep(0.2)                               # (a handler runs between bytecodes: it would have)
                kept = "the child's handle"
        assert kept == "the child's handle"
        assert signal.getsignal(signal.SIGTERM) is stop       # the launcher's handler is back
    finally:
        signal.signal(signal.SIGTERM, before)
