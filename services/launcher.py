"""`make run`: the whole stack on loopback with embedded defaults, until Ctrl-C."""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from services.common.grpc_server import configure_logging
from services.common.local_stack import STOP_SIGNALS, LocalStack, free_port, port_is_free
from services.common.model_paths import cache_root
from services.common.private_files import write_private

log = logging.getLogger("alise.launcher")
DEFAULT_PORT = 50051


def claim_shared_files(cache: Path) -> IO | None:
    """The lock that makes this launcher the one whose files (address, API key, CA) the CLI reads, held while it
    runs and released by the OS however it ends; None while another launcher holds it. (Before, a probe of the
    written address decided, which two launches a few seconds apart both passed: each rewrote the other's keys.)"""
    cache.mkdir(parents=True, exist_ok=True)
    lock = open(cache / "launcher.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def write_atomically(path: Path, text: str) -> None:
    """A reader sees the old file or the new one, never a half-written one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    configure_logging()
    port = int(os.environ.get("ALISE_PORT", 0)) or (DEFAULT_PORT if port_is_free(DEFAULT_PORT) else 0)
    log_dir = Path(tempfile.mkdtemp(prefix="alise-logs-"))
    http_port = int(os.environ.get("ALISE_HTTP_PORT", 0)) or free_port()      # the OpenAI-compatible API
    address_file = cache_root() / "address"
    # A second `make run` while the first is alive gets credentials and predictor state of its own and leaves
    # the files the CLI reads (address, key, CA) to the first.
    lock = claim_shared_files(cache_root())
    shared = lock is not None
    state = cache_root() if shared else log_dir
    # secure as in production: TLS on every link, mTLS between services, an API key for the client
    stack = LocalStack(log_dir=log_dir, scheduler_port=port, secrets_dir=state / "local", tls=True, mtls=True,
                       redis_url=os.environ.get("REDIS_URL"),
                       num_workers=int(os.environ.get("ALISE_WORKERS", 1)),
                       scheduler_args=["--http-listen", f"127.0.0.1:{http_port}",
                                       *os.environ.get("ALISE_SCHEDULER_FLAGS", "").split()],
                       # what the predictor learns is kept across runs (and a trained one, if
                       # `services.predictor.train` wrote it there, is used)
                       predictor_args=["--model-dir", str(state / "predictor"),
                                       *os.environ.get("ALISE_PREDICTOR_FLAGS", "").split()])
    log.info("starting redis, predictor, scheduler and worker (logs in %s)", log_dir)
    # Ctrl-C, `kill` or a closed terminal: while starting, leave start() at once; once serving, stop the loop
    # below. Either way the finally stops every service (they run in sessions of their own, so no terminal
    # signal reaches them: before, a signal during the minutes of starting left them running)
    stop, serving = threading.Event(), threading.Event()

    def on_signal(*_):
        if not serving.is_set():
            raise KeyboardInterrupt
        stop.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    try:
        stack.start()
        key_file = stack.secrets_dir / "api-key"
        write_private(key_file, stack.api_key)
        if shared:                         # the address last: a CLI that reads it finds this stack's key already
            write_atomically(address_file, stack.address)
        else:
            print(f"note: another `make run` serves {address_file.read_text().strip()} and keeps the CLI's defaults; "
                  f"reach this one with --address {stack.address} --api-key ... --tls-ca {stack.tls_files.ca}",
                  flush=True)
        serving.set()                      # from here a signal stops the loop below
        redis_at = urlsplit(stack.redis_url).hostname, urlsplit(stack.redis_url).port   # not its password
        print(f"\nALISE is serving {stack.address} (redis {redis_at[0]}:{redis_at[1]}, logs {log_dir})\n"
              f"try:  .venv/bin/alise generate --chat \"What is the capital of France?\"\n"
              f"      (the CLI finds this address in {address_file}, its API key (tenant 'local') in\n"
              f"      {key_file} and the TLS CA in {stack.tls_files.ca};\n"
              f"      other clients: ALISE_ADDRESS, ALISE_API_KEY, ALISE_TLS_CA)\n"
              f"OpenAI-compatible HTTP API: https://127.0.0.1:{http_port}/v1 (same API key and CA), e.g.\n"
              f"  curl --cacert {stack.tls_files.ca} -H \"Authorization: Bearer $(cat {key_file})\" \\\n"
              f"       https://127.0.0.1:{http_port}/v1/models\n"
              f"Ctrl-C stops everything.\n", flush=True)
        while not stop.wait(1.0):
            for svc in stack.services.values():
                if svc.proc.poll() is not None:
                    log.error("%s exited (%s); see %s", svc.name, svc.proc.returncode, svc.log_path)
                    stop.set()
    except KeyboardInterrupt:
        log.info("interrupted while starting")
    finally:
        for sig in STOP_SIGNALS:           # a second Ctrl-C must not leave half the stack running
            signal.signal(sig, signal.SIG_IGN)
        log.info("stopping")
        stack.stop()


if __name__ == "__main__":
    main()
