"""`make run`: the whole stack on loopback with embedded defaults, until Ctrl-C."""
from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
from urllib.parse import urlsplit
from pathlib import Path

from services.common.grpc_server import configure_logging
from services.common.local_stack import LocalStack, free_port, port_is_free
from services.common.model_paths import cache_root

log = logging.getLogger("alise.launcher")
DEFAULT_PORT = 50051


def other_stack_alive(address_file: Path) -> bool:
    """Whether the address an earlier `make run` wrote still answers: then that stack keeps the shared files."""
    try:
        host, port = address_file.read_text().strip().rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def main() -> None:
    configure_logging()
    port = int(os.environ.get("ALISE_PORT", 0)) or (DEFAULT_PORT if port_is_free(DEFAULT_PORT) else 0)
    log_dir = Path(tempfile.mkdtemp(prefix="alise-logs-"))
    http_port = int(os.environ.get("ALISE_HTTP_PORT", 0)) or free_port()      # the OpenAI-compatible API
    address_file = cache_root() / "address"
    # A second `make run` while the first is alive gets credentials and predictor state of its own and leaves
    # the files the CLI reads (address, key, CA) to the first.
    shared = not other_stack_alive(address_file)
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
    try:
        stack.start()
        if shared:
            address_file.write_text(stack.address)
        else:
            print(f"note: another `make run` serves {address_file.read_text().strip()} and keeps the CLI's defaults; "
                  f"reach this one with --address {stack.address} --api-key ... --tls-ca {stack.tls_files.ca}",
                  flush=True)
        # Ctrl-C is handled from before "serving" is printed: a signal right after it stops cleanly too
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        key_file = stack.secrets_dir / "api-key"
        key_file.write_text(stack.api_key)
        key_file.chmod(0o600)
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
    finally:
        log.info("stopping")
        stack.stop()


if __name__ == "__main__":
    main()
