"""Bearer credentials on gRPC calls: how a caller presents a secret and how a service checks it.

Secrets travel in the `authorization: Bearer <secret>` metadata entry (as in OAuth2 / gRPC's own access
tokens). Services keep only SHA-256 digests of what they accept, compared in constant time, so a leaked
configuration or log line does not leak a usable credential.

Two kinds of secret exist: client API keys (mapped to tenants by the scheduler, services/scheduler/tenants.py)
and the internal service token shared by ALISE's own services (worker -> scheduler gateway, scheduler ->
predictor), read from a file (a mounted Kubernetes Secret) or an environment variable.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import grpc

HEADER = "authorization"
SERVICE_TOKEN_ENV = "ALISE_SERVICE_TOKEN"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    # Hex, not urlsafe base64: a urlsafe secret starts with '-' one time in 64, and
    # `alise --api-key -xyz` then reads it as an option (a CI run failed on exactly that).
    return secrets.token_hex(32)


def bearer_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    return ((HEADER, f"Bearer {secret}"),)


def presented_secret(context) -> str | None:
    """The bearer secret a caller sent, or None. The scheme's name is matched in any case (RFC 9110, 11.1)."""
    for key, value in context.invocation_metadata() or ():
        if key == HEADER and isinstance(value, str):
            scheme, _, secret = value.partition(" ")
            if scheme.lower() == "bearer" and secret.strip():
                return secret.strip()
    return None


def matches(secret: str | None, expected_digest: str) -> bool:
    return secret is not None and hmac.compare_digest(digest(secret), expected_digest)


def read_service_token(path: str | None) -> str:
    """The internal service token: from a file when given, else from $ALISE_SERVICE_TOKEN.

    Refuses to run without one: no ALISE service trusts (or talks to) an unauthenticated peer."""
    if path:
        token = Path(path).read_text().strip()
    else:
        token = os.environ.get(SERVICE_TOKEN_ENV, "").strip()
    if len(token) < 16:
        raise SystemExit(f"a service token of at least 16 characters is required: --service-token-file or "
                         f"${SERVICE_TOKEN_ENV}")
    return token


class ServiceTokenCheck:
    """Accepts only callers presenting the internal service token and, given `cert_names` (a port with mTLS), a client
    certificate named (its Common Name) as one of the services that may call this one. The CA alone does not tell
    services apart: every service's certificate is signed by it, so without names a worker's certificate and key,
    taken from its pod, would call the predictor as the scheduler does."""

    def __init__(self, token: str, cert_names: tuple[str, ...] = ()):
        self._digest = digest(token)
        self._names = frozenset(cert_names)

    async def require(self, context) -> None:
        if not matches(presented_secret(context), self._digest):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: a valid service token is required")
        if self._names and not self._names.intersection(peer_cert_names(context)):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"client certificate: named {', '.join(peer_cert_names(context)) or 'nothing'}; "
                                f"this service accepts {', '.join(sorted(self._names))}")


def peer_cert_names(context) -> list[str]:
    """The Common Name of the caller's verified client certificate (none without mTLS)."""
    return [n.decode(errors="replace") for n in context.auth_context().get("x509_common_name", [])]


def cert_names(value: str) -> tuple[str, ...]:
    """A comma-separated list of certificate names, as flags give it. A value that names nothing (blanks, commas) is
    refused: an empty list turns the check off, which a typo must not do silently."""
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if value and not names:
        raise ValueError(f"certificate names: {value!r} names no certificate")
    return names


class _BearerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                         grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the bearer entry to every call on a (synchronous) channel: the CLI and tests."""

    def __init__(self, secret: str):
        self._metadata = bearer_metadata(secret)

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def with_bearer(channel: grpc.Channel, secret: str | None) -> grpc.Channel:
    return grpc.intercept_channel(channel, _BearerInterceptor(secret)) if secret else channel
