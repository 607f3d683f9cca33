"""Credentials rewritten while the scheduler runs apply without a restart (review, session 22): a revoked API key
stopped working only when the scheduler happened to restart, and a renewed TLS certificate (cert-manager writes it
into the mounted Secret) was served only after a restart, so clients failed once the old one expired. A real
scheduler in this process (its gRPC and HTTP ports, a real Redis); the files are rewritten as a Secret volume
rewrites them (a new file put in place)."""
from __future__ import annotations

import asyncio
import json
import shutil
import ssl

import grpc
import httpx2 as httpx
from alise.v1 import generate_pb2 as pb
from alise.v1 import generate_pb2_grpc as pb_grpc

from services.common.local_stack import free_port
from services.common.tls import dev_pki
from services.scheduler import server
from services.scheduler.config import SchedulerConfig
from services.scheduler.tenants import TenantRegistry, add_tenant
from services.scheduler.validation import PredictorInputs


def replace_file(src, dst) -> None:
    """Put a new version in place in one step, as a Secret volume's symlink swap does."""
    tmp = dst.with_name(dst.name + ".new")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def test_the_keys_file_is_followed_and_a_broken_version_keeps_the_last_good_one(tmp_path):
    path = tmp_path / "keys.json"
    first, second = add_tenant(path, "a"), add_tenant(path, "b")
    tenants = TenantRegistry.load(path)
    assert tenants.find(first).name == "a" and not tenants.reload_if_changed()
    data = json.loads(path.read_text())
    data["tenants"] = [t for t in data["tenants"] if t["name"] != "a"]
    (tmp_path / "new.json").write_text(json.dumps(data))
    replace_file(tmp_path / "new.json", path)
    assert tenants.reload_if_changed() and tenants.find(first) is None and tenants.find(second).name == "b"
    (tmp_path / "broken.json").write_text('{"tenants": [')                 # a half-written edit
    replace_file(tmp_path / "broken.json", path)
    assert not tenants.reload_if_changed() and tenants.find(second).name == "b"


def test_a_limit_of_the_wrong_type_refuses_the_keys_file_naming_it(tmp_path, caplog):
    """`"max_priority": "10"` (a string) loaded, and every request of that tenant then failed where its priority was
    compared, as gRPC UNKNOWN (found by review). Now the file is refused, naming the field, at start and on reload
    (where the last good version stays)."""
    path = tmp_path / "keys.json"
    key = add_tenant(path, "a")
    tenants = TenantRegistry.load(path)
    good = json.loads(path.read_text())
    for field, value in (("max_priority", "10"), ("max_priority", True), ("burst", 2.5), ("max_live_jobs", None),
                         ("requests_per_s", "20"), ("requests_per_s", float("nan"))):
        bad = {"tenants": [good["tenants"][0] | {field: value}]}
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        try:
            TenantRegistry.load(tmp_path / "bad.json")
        except ValueError as e:
            assert field in str(e), e
        else:
            raise AssertionError(f"{field}={value!r} was accepted")
        replace_file(tmp_path / "bad.json", path)
        caplog.clear()
        assert not tenants.reload_if_changed() and tenants.find(key).max_priority == 0
        assert "not reloaded" in caplog.text and field in caplog.text, caplog.text
    (tmp_path / "whole.json").write_text(json.dumps({"tenants": [good["tenants"][0] | {"burst": 10.0}]}))
    assert TenantRegistry.load(tmp_path / "whole.json").find(key).burst == 10      # 10.0 is a whole number


async def info(port: int, ca: bytes, key: str) -> grpc.StatusCode:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca)) as channel:
        try:
            await pb_grpc.AliseStub(channel).GetServerInfo(pb.ServerInfoRequest(), timeout=10,
                                                           metadata=[("authorization", f"Bearer {key}")])
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            return e.code()


async def until(check, timeout_s: float = 30.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("not within the deadline")
        await asyncio.sleep(0.1)


async def test_a_revoked_key_and_a_renewed_certificate_apply_without_a_restart(redis_server, model_dir, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("ALISE_SERVICE_TOKEN", "t" * 32)
    monkeypatch.setattr(server, "FOLLOW_FILES_S", 0.2)
    old, new = dev_pki(tmp_path / "old"), dev_pki(tmp_path / "new")     # the renewal comes with a new CA too
    live = tmp_path / "live"
    live.mkdir()
    for name in ("cert", "key", "ca"):
        shutil.copyfile(getattr(old, name), live / name)
    keys_file = tmp_path / "keys.json"
    revoked, kept = add_tenant(keys_file, "a"), add_tenant(keys_file, "b")
    http_port = free_port()
    cfg = SchedulerConfig(listen=f"127.0.0.1:{free_port()}", worker_listen=f"127.0.0.1:{free_port()}",
                          http_listen=f"127.0.0.1:{http_port}", api_keys_file=str(keys_file), redis_url=redis_server.url,
                          model_dir=str(model_dir), predictor_address=f"127.0.0.1:{free_port()}",
                          tls_cert=str(live / "cert"), tls_key=str(live / "key"), tls_ca=str(live / "ca"),
                          leader_lease_s=3.0)
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    running = asyncio.create_task(server.serve(cfg, stop, ready))
    try:
        port = await asyncio.wait_for(asyncio.shield(ready), 120)
        old_ca, new_ca = (open(p, "rb").read() for p in (old.ca, new.ca))
        assert await info(port, old_ca, revoked) == grpc.StatusCode.OK
        data = json.loads(keys_file.read_text())
        data["tenants"] = [t for t in data["tenants"] if t["name"] != "a"]
        (tmp_path / "keys.new").write_text(json.dumps(data))
        replace_file(tmp_path / "keys.new", keys_file)
        await until(lambda: _is(info(port, old_ca, revoked), grpc.StatusCode.UNAUTHENTICATED))
        assert await info(port, old_ca, kept) == grpc.StatusCode.OK

        replace_file(new.cert, live / "cert")                 # half a renewal: a certificate without its key
        await asyncio.sleep(1.0)                              # five checks' time: the pair does not load
        assert await info(port, old_ca, kept) == grpc.StatusCode.OK               # the last good pair still serves
        async with httpx.AsyncClient(verify=ssl.create_default_context(cadata=old_ca.decode())) as client:
            r = await client.get(f"https://127.0.0.1:{http_port}/v1/models", headers={"authorization": f"Bearer {kept}"})
            assert r.status_code == 200
        for name in ("key", "cert", "ca"):
            replace_file(getattr(new, name), live / name)
        await until(lambda: _is(info(port, new_ca, kept), grpc.StatusCode.OK))        # new connections: new one
        async with httpx.AsyncClient(verify=ssl.create_default_context(cadata=new_ca.decode())) as client:
            async def http_ok() -> bool:
                try:
                    r = await client.get(f"https://127.0.0.1:{http_port}/v1/models",
                                         headers={"authorization": f"Bearer {kept}"})
                    return r.status_code == 200
                except httpx.ConnectError:
                    return False
            await until(http_ok)
    finally:
        stop.set()
        await asyncio.wait_for(running, 60)


async def _is(call, code: grpc.StatusCode) -> bool:
    return await call == code


async def test_the_predictor_channel_follows_renewed_client_credentials(tmp_path, monkeypatch):
    """Review, session 22, left open then: the scheduler read its client certificate and CA for the predictor once,
    at start, and gRPC reconnects with a channel's first credentials. After a renewal with a new CA, the predictor's
    next start (or the old certificate's expiry) cut predictions off until the scheduler restarted. The predictor's
    side is served here by the services' real server credentials (mTLS), on a bare gRPC server: what is tested is
    the handshake."""
    from services.common.tls import TlsFiles
    from services.scheduler import predictor_client
    from services.scheduler.predictor_client import PredictorClient

    monkeypatch.setattr(predictor_client, "FOLLOW_FILES_S", 0.0)
    old, new = dev_pki(tmp_path / "old"), dev_pki(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("cert", "key", "ca"):
        shutil.copyfile(getattr(old, name), live / name)
    files = TlsFiles(cert=str(live / "cert"), key=str(live / "key"), ca=str(live / "ca"))
    port = free_port()

    async def predictor() -> grpc.aio.Server:
        srv = grpc.aio.server()
        srv.add_secure_port(f"127.0.0.1:{port}", files.server_credentials(require_client_cert=True))
        await srv.start()
        return srv

    srv = await predictor()
    client = PredictorClient(f"127.0.0.1:{port}", 2.0, "token", files)
    try:
        await asyncio.wait_for(client.channel.channel_ready(), 30)
        first = client.channel
        replace_file(new.cert, live / "cert")                      # half a renewal: the pair does not load
        await client.predict(PredictorInputs("hello"), 16)
        assert client.channel is first                             # kept
        (tmp_path / "not-a-ca").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        replace_file(tmp_path / "not-a-ca", live / "ca")           # a CA file that does not load: kept too
        replace_file(new.key, live / "key")
        await client.predict(PredictorInputs("hello"), 16)
        assert client.channel is first
        replace_file(new.ca, live / "ca")
        await srv.stop(None)                                       # the predictor restarts with the new files
        srv = await predictor()
        await client.predict(PredictorInputs("hello"), 16)         # (no Predictor service on this bare server)
        assert client.channel is not first
        # connected at once, not inside the next prediction's 0.5-s timeout: a handshake with the new CA and certificate
        await asyncio.wait_for(client.connecting, 30)
        assert client.channel.get_state() is grpc.ChannelConnectivity.READY
    finally:
        await client.close()
        await srv.stop(None)


def test_a_ca_bundle_with_comments_in_any_script_loads(tmp_path):
    """Trust bundles carry comments such as "# Issuer: ... Főtanúsítvány": gRPC reads past them, and the check that a
    CA loads (review, session 23) must too, or the scheduler would not start and workers would never connect."""
    from services.common.tls import TlsFiles

    pki = dev_pki(tmp_path / "pki")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes("# Issuer: CN=Főtanúsítvány\n".encode() + open(pki.ca, "rb").read())
    assert TlsFiles(ca=str(bundle)).channel_credentials() is not None
    assert TlsFiles(cert=pki.cert, key=pki.key, ca=str(bundle)).channel_credentials() is not None
