"""Start the whole stack on loopback as real processes: Redis, predictor, scheduler, worker(s).

Used by `make run` (services/launcher.py) and by the end-to-end tests, so both exercise the same thing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tls import TlsFiles, dev_cert, dev_pki
from services.common.tls import channel as tls_channel
from services.common.private_files import write_private

log = logging.getLogger("alise.stack")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free ports: all held open at once while chosen (closed and reopened one at a time, the
    kernel may hand out the same port twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_healthy(address: str, timeout_s: float, service: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} not healthy after {timeout_s}s")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_deferred():
    """Stop signals that arrive inside the block take effect when it ends. The launcher's handler raises while the
    stack starts; raised inside Popen after the fork, it left a child running that nothing held a handle to, so
    nothing stopped it (a flaky test showed it). Spawn and keep the handle inside the block. Only the main thread
    can set handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    before = {sig: signal.signal(sig, lambda sig, _: arrived.append(sig)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)   # None: set outside Python
        if arrived:
            signal.raise_signal(arrived[0])          # as if it came now: the handler before the block runs


@contextlib.contextmanager
def pinned_to(cpus: tuple[int, ...]):
    """Processes spawned inside the block run on `cpus` only (none given: wherever they may). A child inherits its
    parent thread's CPU mask at the fork, so setting the calling thread's mask while it spawns pins every thread a
    service will ever start, with no window in which one runs elsewhere."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)         # pid 0: the calling thread only, on Linux
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


SERVICE_STOP_S = 20.0     # a service's time to stop after SIGTERM (a worker drains) before SIGKILL
REDIS_STOP_S = 10.0


class RedisServer:
    """A private redis-server on a free loopback port, in its own directory, with the append-only file on
    (fsync every second, as in production): a restarted Redis comes back with every job. `restart` keeps the
    port and directory, so services reconnect to the same address."""

    def __init__(self, port: int | None = None, persist: bool = True, data_dir: str | None = None):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server not found: `apt-get install redis-server` (make does this)")
        self.port = port or free_port()
        self.password = secrets.token_hex(16)      # AUTH, as in production (the URL carries it)
        self.persist = persist
        self.dir = data_dir or tempfile.mkdtemp(prefix="alise-redis-")
        self._owns_dir = data_dir is None
        with signals_deferred():
            self.proc = self._launch()
        try:
            self._wait()
        except BaseException:      # interrupted (or failed) before the caller holds this server: stop it here
            self.kill()
            raise

    def _launch(self) -> subprocess.Popen:
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persist else ["--appendonly", "no"]
        # the password in a config file only its owner reads: a process's arguments are readable by every local user
        auth = Path(self.dir) / "auth.conf"
        write_private(auth, f"requirepass {self.password}\n")
        return subprocess.Popen(
            [self.binary, str(auth), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", *persistence,
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def restart(self, kill: bool = True) -> None:
        """SIGKILL (or SIGTERM) and start again on the same port and data."""
        if kill:
            self.kill()
        else:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = self._launch()
        self._wait()

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def _wait(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(REDIS_STOP_S)
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Service:
    name: str
    args: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        out = open(self.log_path, "ab")
        with signals_deferred():
            self.proc = subprocess.Popen([sys.executable, "-m", *self.args], stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)

    def stop(self, timeout_s: float = SERVICE_STOP_S) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
            log.info("%s stopped in %.1f s", self.name, time.monotonic() - began)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s of SIGTERM: killed (see %s)", self.name, timeout_s,
                        self.log_path)
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


LOCAL_TENANT = "local"
# the name (Common Name) of each service's certificate under TLS; under mTLS the worker gateway accepts only the
# worker's and the predictor only the scheduler's (the chart names them the same way: values.yaml, tls.certNames)
CERT_NAMES = {"scheduler": "alise-scheduler", "predictor": "alise-predictor", "worker": "alise-worker"}
# Tenants of a local stack: `local` (what `make run` and most tests use) may do anything; `other` is a
# second tenant with default limits (isolation tests). Tests can pass their own.
DEFAULT_TENANTS = {LOCAL_TENANT: {"max_priority": 1000, "requests_per_s": 1000.0, "burst": 1000,
                                  "max_live_jobs": 10_000},
                   "other": {}}


def write_credentials(secrets_dir: Path, tenants: dict[str, dict]) -> tuple[str, dict[str, str]]:
    """A fresh internal service token and one API key per tenant, in files only this user can read.
    Returns (service token, {tenant: API key})."""
    from services.common.auth import new_secret
    from services.scheduler.tenants import add_tenant

    secrets_dir.mkdir(parents=True, exist_ok=True)
    secrets_dir.chmod(0o700)
    keys_file = secrets_dir / "api-keys.json"
    keys_file.unlink(missing_ok=True)
    api_keys = {name: add_tenant(keys_file, name, **limits) for name, limits in tenants.items()}
    token = new_secret()
    write_private(secrets_dir / "service-token", token)
    return token, api_keys


@dataclass
class LocalStack:
    """Redis + predictor + scheduler + N workers. `scheduler_args` / `worker_args` add flags.

    Credentials are made fresh for each stack under `secrets_dir` (default: log_dir/secrets): the internal
    service token and an API key per tenant (`api_keys`, `api_key` for the `local` tenant)."""
    log_dir: Path
    scheduler_port: int = 0
    num_workers: int = 1
    scheduler_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    redis_url: str | None = None
    with_predictor: bool = True
    predictor_args: list[str] = field(default_factory=list)
    redis: RedisServer | None = None
    services: dict[str, Service] = field(default_factory=dict)
    tenants: dict[str, dict] = field(default_factory=lambda: dict(DEFAULT_TENANTS))
    secrets_dir: Path | None = None
    api_keys: dict[str, str] = field(default_factory=dict)
    tls: bool = False               # TLS on every link (a throwaway CA under secrets_dir); probes on plain ports
    mtls: bool = False              # and certificates required between services (worker gateway, predictor)
    service_tls: dict[str, TlsFiles] = field(default_factory=dict)   # under TLS: service -> its own certificate
    worker_metrics: bool = False    # each worker serves Prometheus /metrics on a port of its own (metrics_ports)
    metrics_ports: dict[str, int] = field(default_factory=dict)   # worker name -> its /metrics port
    scheduler_metrics: bool = False  # the scheduler serves Prometheus /metrics on a port of its own
    scheduler_metrics_port: int = 0
    health_ports: dict[str, int] = field(default_factory=dict)    # under TLS: service -> its plaintext probe port
    # every process of the stack (Redis too) runs on these CPUs only, its thread pools sized to them (none: anywhere);
    # `alise bench sweep --side-by-side` gives each policy's stack its own share of the machine
    cpus: tuple[int, ...] = ()

    @property
    def tls_files(self) -> TlsFiles | None:
        """The scheduler's TLS files (their CA is every service's and what clients verify with); None without TLS."""
        return self.service_tls.get("scheduler")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.scheduler_port}"

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def api_key(self) -> str:
        return self.api_keys[LOCAL_TENANT]

    def client_channel(self) -> grpc.Channel:
        """A channel to the client API as a client would open it (TLS when the stack serves TLS)."""
        return tls_channel(self.address, TlsFiles(ca=self.tls_files.ca) if self.tls_files else None)

    def health_address(self, service: str) -> str:
        """Where probes reach a service: its own port, or its plaintext health port under TLS."""
        return f"127.0.0.1:{self.health_ports[service]}" if self.tls else {
            "scheduler": self.address, "gateway": self.gateway_address,
            "predictor": f"127.0.0.1:{self.predictor_port}"}[service]

    def _tls_flags(self, service: str, serves: bool, *mtls_flags: str) -> list[str]:
        """A service's TLS flags: the CA, its own certificate where it serves or presents one, and under mTLS
        `mtls_flags` (requiring certificates, naming whose it accepts)."""
        if not self.tls:
            return []
        f = self.service_tls[service]
        flags = ["--tls-ca", f.ca]
        if serves or self.mtls:
            flags += ["--tls-cert", f.cert, "--tls-key", f.key]
        if self.mtls:
            flags += mtls_flags
        return flags

    def start(self, timeout_s: float = 180) -> "LocalStack":
        with pinned_to(self.cpus):
            self._spawn()
        wait_healthy(self.health_address("scheduler"), timeout_s)
        if not self.tls:
            wait_healthy(self.gateway_address, timeout_s)
        if self.with_predictor:
            wait_healthy(self.health_address("predictor"), timeout_s)
        self.wait_workers(self.num_workers, timeout_s)
        return self

    def _spawn(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.secrets_dir = self.secrets_dir or self.log_dir / "secrets"
        self.service_token, self.api_keys = write_credentials(self.secrets_dir, self.tenants)
        # distinct: no two services of this stack share one (drawn at once: see free_ports)
        ports = free_ports(7 + (self.num_workers if self.worker_metrics else 0))
        if self.worker_metrics:
            self.metrics_ports = {f"worker-{i}": port for i, port in enumerate(ports[7:])}
        if self.scheduler_metrics:
            self.scheduler_metrics_port = ports[6]
        if self.tls:
            # a certificate of its own for each service (its name is what the services it calls check), one CA
            pki = self.secrets_dir / "tls"
            self.service_tls = {"scheduler": dev_pki(pki, name=CERT_NAMES["scheduler"]),
                                **{service: dev_cert(pki, CERT_NAMES[service]) for service in ("predictor", "worker")}}
            # one plaintext probe port per process: the scheduler's covers its client API and worker gateway
            self.health_ports = {"scheduler": ports[0], "gateway": ports[0], "predictor": ports[1]}
        if self.redis_url is None:
            self.redis = RedisServer(port=ports[2])
            self.redis_url = self.redis.url
        self.scheduler_port = self.scheduler_port or ports[3]
        self.gateway_port = ports[4]
        self.predictor_port = ports[5]
        # secrets in the environment (readable by their owner only), not in arguments (readable by every local user)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "ALISE_SERVICE_TOKEN": self.service_token, "ALISE_SCHEDULER_REDIS_URL": self.redis_url,
               "ALISE_PREDICTOR_REDIS_URL": self.redis_url}
        if self.cpus:        # torch's and numpy's pools default to every CPU of the machine, not of the mask
            env.update(OMP_NUM_THREADS=str(len(self.cpus)), MKL_NUM_THREADS=str(len(self.cpus)))
        if self.with_predictor:
            probes = ["--health-listen", self.health_address("predictor")] if self.tls else []
            self._add("predictor", ["services.predictor.server", "--listen", f"127.0.0.1:{self.predictor_port}",
                                    *self._tls_flags("predictor", True, "--mtls", "--client-cert-names",
                                                     CERT_NAMES["scheduler"]), *probes,
                                    *self.predictor_args])
        self._add("scheduler", self.scheduler_command())
        for i in range(self.num_workers):
            self._add(f"worker-{i}", self.worker_command(i))
        for svc in self.services.values():
            svc.start(env)
        self._env = env

    def scheduler_command(self) -> list[str]:
        probes = ["--health-listen", self.health_address("scheduler")] if self.tls else []
        return ["services.scheduler.server", "--listen", self.address, "--worker-listen", self.gateway_address,
                "--api-keys-file", str(self.secrets_dir / "api-keys.json"),
                "--predictor-address", f"127.0.0.1:{self.predictor_port}",
                *self._tls_flags("scheduler", True, "--worker-mtls", "--worker-cert-names", CERT_NAMES["worker"]),
                *probes, *(["--metrics-port", str(self.scheduler_metrics_port)] if self.scheduler_metrics else []),
                *self.scheduler_args]

    def worker_command(self, i: int) -> list[str]:
        port = self.metrics_ports.get(f"worker-{i}")
        metrics = ["--metrics-port", str(port)] if port else []
        return ["services.worker.server", "--scheduler", self.gateway_address, "--worker-id", f"worker-{i}",
                *self._tls_flags("worker", False), *metrics, *self.worker_args]

    def _add(self, name: str, args: list[str]) -> None:
        self.services[name] = Service(name, args, self.log_dir / f"{name}.log")

    def add_worker(self) -> str:
        name = f"worker-{sum(n.startswith('worker-') for n in self.services)}"
        if self.worker_metrics:
            self.metrics_ports[name] = self._unused_port()
        self._add(name, self.worker_command(int(name.split("-")[1])))
        with pinned_to(self.cpus):
            self.services[name].start(self._env)
        return name

    def _unused_port(self) -> int:
        """A free port that no service of this stack was given (they may not all be bound yet)."""
        taken = {self.scheduler_port, self.gateway_port, self.predictor_port, *self.metrics_ports.values(),
                 *self.health_ports.values(), self.scheduler_metrics_port}
        while (port := free_ports(1)[0]) in taken:
            pass
        return port

    def restart(self, name: str, kill: bool = True) -> None:
        svc = self.services[name]
        svc.kill() if kill else svc.stop()
        with pinned_to(self.cpus):
            svc.start(self._env)

    def wait_workers(self, n: int, timeout_s: float) -> None:
        from alise.v1 import generate_pb2 as pb
        from alise.v1 import generate_pb2_grpc as pb_grpc

        from services.common.auth import with_bearer

        deadline = time.monotonic() + timeout_s
        with self.client_channel() as ch:
            stub = pb_grpc.AliseStub(with_bearer(ch, self.api_key))
            while time.monotonic() < deadline:
                try:
                    if len(stub.GetLoad(pb.LoadRequest(), timeout=1).workers) >= n:
                        return
                except grpc.RpcError:
                    pass
                for svc in self.services.values():
                    if svc.proc.poll() is not None:
                        raise RuntimeError(f"{svc.name} exited with {svc.proc.returncode}; see {svc.log_path}")
                time.sleep(0.2)
        raise TimeoutError(f"{n} workers did not register within {timeout_s}s")

    def stop(self) -> None:
        for svc in reversed(list(self.services.values())):
            svc.stop()
        if self.redis is not None:
            self.redis.stop()
