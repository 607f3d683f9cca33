"""TLS on ALISE's gRPC links, and mutual TLS between its services.

Each service takes three files (PEM): its own certificate and key, and the CA that signs its peers (one CA for all).
- A server with a certificate serves TLS; with `require_client_cert` it accepts only callers presenting a
  certificate signed by the CA (mTLS: the scheduler's worker gateway, the predictor).
- A client with a CA verifies the server it dials; if it has a certificate and key too, it presents them.
Kubernetes' gRPC probes cannot speak TLS, so a TLS service also serves plain health checks on a port of its
own (`health_only_server`). `dev_pki` makes a throwaway CA and a certificate for loopback (make run, tests),
`dev_cert` one more certificate from it for another service.
"""
from __future__ import annotations

import contextlib
import logging
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.file_versions import FileWatch
from services.common.keepalive import CHANNEL_OPTIONS
from services.common.private_files import write_private

log = logging.getLogger("alise.tls")
LOAD_ERRORS = (OSError, ValueError, ssl.SSLError)     # what files that do not load (yet: mid-renewal) raise
DEV_HOSTS = ("localhost", "127.0.0.1")
_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class TlsFiles:
    cert: str = ""           # this service's certificate chain
    key: str = ""            # its private key
    ca: str = ""             # the CA that signs the peers it talks to

    def __post_init__(self):
        if bool(self.cert) != bool(self.key):
            raise ValueError("TLS: give both a certificate and its key, or neither")

    @property
    def serves_tls(self) -> bool:
        return bool(self.cert)

    @property
    def dials_tls(self) -> bool:
        return bool(self.ca)

    def server_credentials(self, require_client_cert: bool = False) -> grpc.ServerCredentials:
        """Credentials that follow the files: each new connection's handshake first checks whether they changed
        (a renewed certificate, as cert-manager writes it into a mounted Secret) and then uses the new ones;
        connections already open keep theirs. Files that no longer load keep the last good ones."""
        if require_client_cert and not self.ca:
            raise ValueError("mTLS needs the CA that signs client certificates (--tls-ca)")
        watch = FileWatch(self.paths)

        def configuration() -> grpc.ServerCertificateConfiguration:
            with checked_copy(self.cert, self.key) as (cert, key):
                pair = (key.read_bytes(), cert.read_bytes())
            return grpc.ssl_server_certificate_configuration([pair], root_certificates=_read(self.ca) if self.ca else None)

        def changed() -> grpc.ServerCertificateConfiguration | None:   # gRPC's fetcher: None keeps the last one
            if not watch.changed():
                return None
            try:
                fresh = configuration()
            except LOAD_ERRORS as e:
                log.error("TLS files changed but do not load; the last good ones stay: %s", e)
                return None
            log.info("TLS certificate reloaded from %s", self.cert)
            return fresh

        return grpc.dynamic_ssl_server_credentials(configuration(), changed,
                                                   require_client_authentication=require_client_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Read now, for the life of a channel (gRPC reconnects with them); a CA that does not load, or a certificate
        and key that do not load together, fail here (ssl.SSLError), not at every handshake."""
        ca = _read(self.ca)
        # ssl.SSLError if it holds no CA; a bundle's comments may hold other than ASCII, which gRPC reads past too
        ssl.create_default_context(cadata=ca.decode("ascii", errors="ignore"))
        if not self.cert:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        with checked_copy(self.cert, self.key) as (cert, key):
            return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key.read_bytes(),
                                                certificate_chain=cert.read_bytes())

    @property
    def paths(self) -> tuple[str, ...]:
        return self.cert, self.key, self.ca


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


@contextlib.contextmanager
def checked_copy(cert: str, key: str) -> Iterator[tuple[Path, Path]]:
    """A private copy of a certificate chain and its key, read once each and checked to load together (a renewal
    caught half-written, or a key of another certificate, would fail every handshake); the copy is gone after."""
    with tempfile.TemporaryDirectory(prefix="alise-tls-") as d:
        cert_copy, key_copy = Path(d, "cert.pem"), Path(d, "key.pem")
        write_private(key_copy, _read(key))
        cert_copy.write_bytes(_read(cert))
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_copy, key_copy)   # ssl.SSLError if they differ
        yield cert_copy, key_copy


def add_port(server: grpc.aio.Server, listen: str, tls: TlsFiles | None, require_client_cert: bool = False) -> int:
    if tls is not None and tls.serves_tls:
        return server.add_secure_port(listen, tls.server_credentials(require_client_cert))
    if require_client_cert:
        raise ValueError("mTLS needs a server certificate (--tls-cert, --tls-key)")
    return server.add_insecure_port(listen)


def aio_channel(address: str, tls: TlsFiles | None) -> grpc.aio.Channel:
    """A channel between ALISE's own services, with keepalive (keepalive.py): their streams live long."""
    if tls is not None and tls.dials_tls:
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def channel(address: str, tls: TlsFiles | None) -> grpc.Channel:
    """A blocking channel (the CLI, tests), with keepalive too: a client's token stream lives long."""
    if tls is not None and tls.dials_tls:
        return grpc.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def health_only_server(servicer, listen: str) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with nothing but grpc.health.v1, for probes that cannot do TLS.
    `servicer`: a grpc_health HealthServicer (imported here, not at the top: the GPU benchmarks import the
    worker's config, which needs TLS file settings but not the health package)."""
    from grpc_health.v1 import health_pb2_grpc

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])     # see grpc_server.NO_SHARED_PORT
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"could not bind {listen}")
    return server, port


def dev_pki(directory: Path, name: str = "alise-service", hosts: tuple[str, ...] = DEV_HOSTS) -> TlsFiles:
    """A throwaway CA and one certificate it signs, named `name`, valid for `hosts` as a server and as a client
    (a service on loopback uses it both ways). Made with the openssl command line: no Python crypto dependency for a
    development convenience."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *_EC_KEY, "-keyout", d / "ca.key", "-out", d / "ca.crt", "-days", "30",
             "-subj", "/CN=alise-dev-ca")
    (d / "ca.key").chmod(0o600)
    return dev_cert(d, name, hosts)


def dev_cert(directory: Path, name: str, hosts: tuple[str, ...] = DEV_HOSTS) -> TlsFiles:
    """Another certificate from dev_pki's CA in `directory`, named `name` (its Common Name: the identity a service
    checks, ServiceTokenCheck's cert_names), in files named after it."""
    d = Path(directory)
    key, csr, cert, ext = (d / f"{name}.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
    san = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts)
    _openssl("req", *_EC_KEY, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", csr, "-CA", d / "ca.crt", "-CAkey", d / "ca.key", "-CAcreateserial", "-out", cert,
             "-days", "30", "-extfile", ext)
    key.chmod(0o600)
    return TlsFiles(cert=str(cert), key=str(key), ca=str(d / "ca.crt"))


def _openssl(*args) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
