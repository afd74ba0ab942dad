"""HTTPS on the gateway's port (gateway/tls.py): certificates made by trustme for 127.0.0.1,
the real app listening as `batchwire serve` listens, real TLS clients; a renewed certificate
served to new connections without a restart; `batchwire gateway` refusing files it cannot
use; and the Docker healthcheck following BATCHWIRE_TLS_CERT."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest
import trustme
from aiohttp import web

from gateway import cert_expiry
from gateway.app import create_app
from gateway.broker import Broker
from gateway.config import GatewayConfig
from gateway.tls import ServerTls, TlsConfigError
from tests.e2e.conftest import free_port, start_gateway, wait_for, wait_for_async
from tests.e2e.in_process import bare_app, listening
from tests.e2e.test_connections import recv_until_closed
from tests.e2e.test_deploy import dockerfile_stages, effective


def issue(tmp_path, name: str) -> tuple[trustme.CA, str, str]:
    """A new CA and a certificate for 127.0.0.1 from it: (ca, cert file, key file)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    return ca, str(cert_file), str(key_file)


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
async def https_gateway():
    """start(tls) -> the port of the app listening with ServerTls ``tls``."""
    async with contextlib.AsyncExitStack() as stack:
        async def start(tls: ServerTls, **settings) -> int:
            config = GatewayConfig(**settings)
            app = create_app(config, Broker("inproc://tls-test", max_queue=4,
                                            max_held_bytes=config.max_held_bytes))
            return await stack.enter_async_context(listening(app, ssl=tls.context,
                                                             handler_cancellation=True))
        yield start


async def get_health(port: int, trust: trustme.CA) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"https://127.0.0.1:{port}/health",
                               ssl=client_context(trust)) as response:
            return response.status


async def test_https_serves_every_route_and_plain_http_gets_no_answer(https_gateway, tmp_path):
    ca, cert, key = issue(tmp_path, "server")
    port = await https_gateway(ServerTls(cert, key))
    assert await get_health(port, ca) == 200
    async with aiohttp.ClientSession() as session:
        # The app behind TLS is the whole app: a POST is read and answered (no worker here).
        async with session.post(f"https://127.0.0.1:{port}/", data="a [MASK]",
                                ssl=client_context(ca)) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "no_workers"
        async with session.get(f"https://127.0.0.1:{port}/openapi.json",
                               ssl=client_context(ca)) as response:
            assert response.status == 200
            assert json.loads(await response.read())["info"]["title"] == "batchwire"
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{port}/health") as response:
                await response.read()


async def test_a_renewed_certificate_is_served_to_new_connections(https_gateway, tmp_path,
                                                                  caplog):
    old_ca, cert, key = issue(tmp_path, "server")
    tls = ServerTls(cert, key)
    port = await https_gateway(tls)
    assert tls.reload_if_changed() is False  # nothing changed yet
    # Renewed in place, from another CA, as cert-manager or certbot would.
    new_ca, new_cert, new_key = issue(tmp_path, "renewed")
    os.replace(new_cert, cert)
    os.replace(new_key, key)
    assert tls.reload_if_changed() is True and tls.reloads == 1
    assert await get_health(port, new_ca) == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await get_health(port, old_ca)
    # A pair that does not load (the key of a third certificate) is logged; the last good one
    # is still served.
    _, _, stray_key = issue(tmp_path, "stray")
    os.replace(stray_key, key)
    with caplog.at_level(logging.ERROR, logger="batchwire.gateway.tls"):
        assert tls.reload_if_changed() is False
    assert any("do not load" in r.getMessage() for r in caplog.records)
    assert await get_health(port, new_ca) == 200
    # An encrypted key neither stops the watch nor waits for a pass phrase; the next good
    # pair is served.
    _, _, plain_key = issue(tmp_path, "to-encrypt")
    os.replace(encrypted(plain_key, tmp_path), key)
    assert tls.reload_if_changed() is False
    third_ca, third_cert, third_key = issue(tmp_path, "third")
    os.replace(third_cert, cert)
    os.replace(third_key, key)
    assert tls.reload_if_changed() is True
    assert await get_health(port, third_ca) == 200


async def test_a_connection_that_never_finishes_its_handshake_is_closed(https_gateway,
                                                                       tmp_path):
    _, cert, key = issue(tmp_path, "server")
    port = await https_gateway(ServerTls(cert, key), idle_timeout_s=0.3)
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        # No ClientHello: the handshake timeout (--idle-timeout-s) closes it.
        assert await recv_until_closed(sock, 10) == b""
    finally:
        sock.close()


def test_files_that_cannot_be_used_say_which_and_why(tmp_path):
    _, cert, key = issue(tmp_path, "server")
    _, _, other_key = issue(tmp_path, "other")
    with pytest.raises(TlsConfigError, match="cannot read the TLS key file .*--tls-key"):
        ServerTls(cert, str(tmp_path / "missing.key"))
    with pytest.raises(TlsConfigError, match="cannot use .*: the key does not belong to the certificate"):
        ServerTls(cert, other_key)
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    with pytest.raises(TlsConfigError, match="cannot use"):
        ServerTls(str(tmp_path / "garbage.pem"), key)
    # OpenSSL asked for its pass phrase on the terminal (and waited), then raised an OSError
    # that nothing caught.
    with pytest.raises(TlsConfigError, match="the key is encrypted with a pass phrase"):
        ServerTls(cert, encrypted(key, tmp_path))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(TlsConfigError, match="fifo' .*: not a regular file"):
        ServerTls(cert, str(tmp_path / "fifo"))


def encrypted(key_file: str, tmp_path) -> str:
    """The key, encrypted with a pass phrase as `openssl pkey -aes256` writes it."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(open(key_file, "rb").read(), password=None)
    path = tmp_path / "encrypted.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret")))
    return str(path)


@pytest.mark.parametrize("which", ["mismatched", "encrypted"])
def test_gateway_with_a_pair_it_cannot_use_exits_2_with_one_line(tmp_path, which):
    _, cert, key = issue(tmp_path, "server")
    _, _, other_key = issue(tmp_path, "other")
    key, why = ((other_key, "the key does not belong to the certificate") if which == "mismatched"
                else (encrypted(key, tmp_path), "the key is encrypted with a pass phrase"))
    done = subprocess.run([sys.executable, "-m", "gateway", "gateway", "--port", str(free_port()),
                           "--tls-cert", cert, "--tls-key", key],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and why in lines[0], done.stderr


def test_gateway_serves_https_and_the_docker_healthcheck_follows_it(procs, tmp_path):
    ca, cert, key = issue(tmp_path, "server")
    port = free_port()
    gateway = start_gateway(procs, tmp_path, port, free_port(), "--tls-cert", cert,
                            "--tls-key", key)
    wait_for(lambda: f"listening on https://127.0.0.1:{port}" in gateway.log_text(), 30,
             "the gateway to listen over HTTPS")
    healthcheck = json.loads(effective(dockerfile_stages(), "gateway", "HEALTHCHECK")
                             .split("CMD", 1)[1].strip())
    assert healthcheck[:2] == ["python", "-c"]
    env = {**os.environ, "BATCHWIRE_PORT": str(port)}
    probe = [sys.executable, "-c", healthcheck[2]]
    # With the image's environment naming the certificate, the probe asks over HTTPS...
    assert subprocess.run(probe, env={**env, "BATCHWIRE_TLS_CERT": cert},
                          capture_output=True, timeout=30).returncode == 0
    # ... and without, plain HTTP, which this port does not answer.
    assert subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode != 0
    # A client trusting the CA reads /health; the gateway's own log names no error.
    assert asyncio.run(get_health(port, ca)) == 200
    # /metrics says when the certificate served expires.
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=10,
                                context=client_context(ca)) as answer:
        scrape = answer.read().decode()
    line = next(line for line in scrape.splitlines()
                if line.startswith("batchwire_tls_certificate_expiry_timestamp_seconds "))
    assert float(line.split()[1]) == cert_expiry.not_after(cert) > time.time()
    assert gateway.stop() == 0
    assert " ERROR " not in gateway.log_text() and "Traceback" not in gateway.log_text()


async def test_a_large_answer_is_written_whole_over_tls_and_given_back(tmp_path):
    """An answer larger than a transport takes at once is a HeldAnswer, held in the memory
    budget until written (gateway/app.py): over TLS, whose transport buffers differently,
    it still arrives whole and is given back once written."""
    from types import SimpleNamespace

    from gateway.app import BROKER, WRITTEN_AT_ONCE_BYTES, _claim, answer_response
    from gateway.connections import ConnectionGuard
    from gateway.held_memory import HeldMemory

    memory = HeldMemory(1 << 30)
    answer = [{"token_str": "x" * 1000, "score": 0.5}] * 600  # ~640 kB of JSON

    async def handler(request: web.Request) -> web.StreamResponse:
        _claim(request).hold_answer(700_000)
        return await answer_response(request, answer, {})

    ca, cert, key = issue(tmp_path, "server")
    app = bare_app(handler, ConnectionGuard(16, idle_timeout_s=60),
                   {BROKER: SimpleNamespace(memory=memory)})
    async with listening(app, ssl=ServerTls(cert, key).context) as port:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"https://127.0.0.1:{port}/", data=b"",
                                    ssl=client_context(ca)) as response:
                body = await response.read()
        assert response.status == 200 and len(body) > WRITTEN_AT_ONCE_BYTES
        assert json.loads(body) == answer
        await wait_for_async(lambda: memory.held == 0, 5, "the answer's bytes to be given back")


@pytest.mark.parametrize("expires", [
    datetime.datetime(2027, 3, 4, 5, 6, 7, tzinfo=datetime.timezone.utc),  # UTCTime
    datetime.datetime(2051, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),  # GeneralizedTime
])
def test_the_certificates_expiry_is_read_from_the_pem(tmp_path, expires):
    from cryptography import x509

    issued = trustme.CA().issue_cert("127.0.0.1", not_after=expires)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    # The first certificate of the chain is the server's own.
    own = x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes())
    assert cert_expiry.not_after(str(chain)) == expires.timestamp() == \
        own.not_valid_after_utc.timestamp()
    (tmp_path / "none.pem").write_text("no certificate here\n")
    assert cert_expiry.not_after(str(tmp_path / "none.pem")) is None
    assert cert_expiry.not_after(str(tmp_path / "missing.pem")) is None


def test_a_certificate_near_its_expiry_is_warned_about_once_a_day(tmp_path, caplog):
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=3)
    issued = trustme.CA().issue_cert("127.0.0.1", not_after=soon)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    with caplog.at_level(logging.WARNING, logger="batchwire.gateway.tls"):
        tls = ServerTls(str(cert), str(key))  # warns at start
        for _ in range(3):
            tls.reload_if_changed()  # the 30 s checks: nothing more today
        tls.check_expiry(now=time.time() + 86400.0 + 1)  # a day later: again
        tls.check_expiry(now=soon.timestamp() + 60)  # expired: an error
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in messages] == [logging.WARNING, logging.WARNING, logging.ERROR]
    assert "expires on" in messages[0][1] and "in 3.0 days" in messages[0][1]
    assert "expired on" in messages[2][1]
    # A certificate with years left says nothing.
    caplog.clear()
    _, far_cert, far_key = issue(tmp_path, "far")
    with caplog.at_level(logging.WARNING, logger="batchwire.gateway.tls"):
        ServerTls(far_cert, far_key)
    assert not caplog.records
