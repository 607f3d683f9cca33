"""Client API keys mapped to tenants, with each tenant's limits.

The keys file is JSON: {"tenants": [{"name": "team-a", "key_sha256": "<hex>", "max_priority": 10,
"requests_per_s": 20, "burst": 40, "max_live_jobs": 256}, ...]}. Only digests are stored; add a tenant
(printing its new key once) with `python -m services.scheduler.tenants add FILE NAME [--max-priority N]`.

A tenant's jobs are its own: the scheduler keys every job by (tenant, request_id), so another tenant's
job is invisible (NOT_FOUND), whatever id it guesses.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.common.auth import digest, new_secret
from services.common.file_versions import FileWatch
from services.common.private_files import write_private

log = logging.getLogger("alise.scheduler")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")     # also safe inside Redis keys and metric labels


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: str
    max_priority: int = 0          # highest GenerateRequest.priority this tenant may ask for
    requests_per_s: float = 20.0   # sustained admission rate (token bucket)
    burst: int = 40                # requests admitted at once above the rate
    max_live_jobs: int = 256       # queued + running jobs at a time

    def __post_init__(self):
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise ValueError(f"tenant name {self.name!r}: lowercase letters, digits and '-', at most 63")
        if not isinstance(self.key_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.key_sha256):
            raise ValueError(f"tenant {self.name}: key_sha256 must be 64 hex digits")
        # the file is JSON: a limit written as a string ("10") or true would load, then break every request of the
        # tenant where it is compared (a TypeError, gRPC UNKNOWN); refuse the file instead (found by review)
        for name, kinds, what in (("max_priority", int, "an integer"), ("requests_per_s", (int, float), "a number"),
                                  ("burst", int, "an integer"), ("max_live_jobs", int, "an integer")):
            value = getattr(self, name)
            if kinds is int and isinstance(value, float) and value.is_integer():
                object.__setattr__(self, name, value := int(value))          # JSON writers may write 10 as 10.0
            if not isinstance(value, kinds) or isinstance(value, bool) or value != value:     # NaN != NaN
                raise ValueError(f"tenant {self.name}: {name} must be {what}, not {value!r}")
        if not self.requests_per_s > 0 or self.burst < 1 or self.max_live_jobs < 1:
            raise ValueError(f"tenant {self.name}: requests_per_s, burst and max_live_jobs must be positive")


class TenantRegistry:
    """Looks tenants up by the digest of the key a client presents. One loaded from a file follows it
    (`reload_if_changed`): a key revoked or added, or a limit changed, applies without a restart (Kubernetes updates
    a mounted Secret's files in place)."""

    def __init__(self, tenants: list[Tenant], path: Path | None = None):
        self._by_digest = _by_digest(tenants)
        self.path = path
        self._watch = FileWatch([path]) if path else None

    @classmethod
    def load(cls, path: str | Path) -> "TenantRegistry":
        path = Path(path)
        return cls(_read(path), path)

    def reload_if_changed(self) -> bool:
        """Read the file again if it changed since it was last read; True if the tenants were replaced. A file
        that no longer parses (a half-written edit) leaves the tenants as they were, and is read again once it
        changes again."""
        if self._watch is None or not self._watch.changed():
            return False
        try:
            tenants = _by_digest(_read(self.path))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("API keys file %s not reloaded, the tenants stay as they were: %s", self.path, e)
            return False
        self._by_digest = tenants            # one assignment: a lookup sees the old tenants or the new ones
        log.info("API keys file %s reloaded: %d tenants", self.path, len(tenants))
        return True

    def find(self, key: str | None) -> Tenant | None:
        # Digests of random 256-bit keys: a dict lookup by digest leaks nothing useful about other keys.
        return self._by_digest.get(digest(key)) if key else None

    def __len__(self) -> int:
        return len(self._by_digest)


def _read(path: Path) -> list[Tenant]:
    return [Tenant(**t) for t in json.loads(path.read_text())["tenants"]]


def _by_digest(tenants: list[Tenant]) -> dict[str, Tenant]:
    names = [t.name for t in tenants]
    if len(set(names)) != len(names):
        raise ValueError("tenant names must be unique")
    return {t.key_sha256: t for t in tenants}


@dataclass
class TokenBucket:
    """Admission rate per tenant: `rate` per second on average, `burst` at once (starts full)."""
    rate: float
    burst: int
    tokens: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self.tokens = float(self.burst)

    def take(self) -> float:
        """0 if admitted, else the seconds until a request would be."""
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


def add_tenant(path: Path, name: str, **limits) -> str:
    """Add a tenant with a fresh key to the keys file (created if missing); returns the key."""
    data = json.loads(path.read_text()) if path.exists() else {"tenants": []}
    if any(t["name"] == name for t in data["tenants"]):
        raise SystemExit(f"tenant {name!r} already exists in {path}")
    key = new_secret()
    data["tenants"].append(asdict(Tenant(name=name, key_sha256=digest(key), **limits)))
    write_private(path, json.dumps(data, indent=2) + "\n")
    return key


def main() -> None:
    p = argparse.ArgumentParser(description="ALISE client API keys")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="add a tenant and print its new API key (shown once)")
    a.add_argument("file", type=Path)
    a.add_argument("name")
    a.add_argument("--max-priority", type=int, default=0)
    a.add_argument("--requests-per-s", type=float, default=20.0)
    a.add_argument("--burst", type=int, default=40)
    a.add_argument("--max-live-jobs", type=int, default=256)
    args = p.parse_args()
    print(add_tenant(args.file, args.name, max_priority=args.max_priority, requests_per_s=args.requests_per_s,
                     burst=args.burst, max_live_jobs=args.max_live_jobs))


if __name__ == "__main__":
    main()
