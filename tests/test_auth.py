"""Unit checks of the shared secret helpers (services/common/auth.py)."""
from __future__ import annotations

import string

from client.cli import parser
from services.common.auth import digest, matches, new_secret


def test_new_secrets_are_hex_so_no_cli_reads_one_as_an_option():
    # A urlsafe secret began with '-' one time in 64 and `alise --api-key <secret>` failed on it.
    secrets_ = {new_secret() for _ in range(2000)}
    assert len(secrets_) == 2000
    assert all(len(s) == 64 and set(s) <= set(string.hexdigits.lower()) for s in secrets_)
    for s in list(secrets_)[:50]:
        assert parser().parse_args(["--api-key", s, "info"]).api_key == s


def test_a_secret_matches_only_its_own_digest():
    a, b = new_secret(), new_secret()
    assert matches(a, digest(a))
    assert not matches(b, digest(a))
    assert not matches(None, digest(a))


def test_a_secret_file_is_private_from_its_first_byte_even_over_a_readable_one(tmp_path):
    from services.common.private_files import write_private

    path = tmp_path / "token"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, "s3cret")
    assert path.read_text() == "s3cret" and path.stat().st_mode & 0o777 == 0o600
    write_private(tmp_path / "new", b"k")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o600


def test_the_bearer_scheme_is_read_in_any_case():
    # review of session 30: only "Bearer " was read, so a client sending "bearer KEY" (the scheme is case-insensitive,
    # RFC 9110 11.1) was refused as unauthenticated
    from services.common.auth import presented_secret
    from services.scheduler.openai_http import HttpCallContext

    key = new_secret()
    for header in (f"Bearer {key}", f"bearer {key}", f"BEARER  {key} "):
        assert presented_secret(HttpCallContext(header)) == key, header
    for header in ("Bearer", "Bearer  ", f"Basic {key}", key, None):
        assert presented_secret(HttpCallContext(header)) is None, header
