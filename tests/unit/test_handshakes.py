"""Refused ZeroMQ handshakes, on real sockets: what each side reports, the worker connecting
again after a refusal libzmq gives up on, and the gateway's worker keys read again."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest
import zmq
import zmq.asyncio

from gateway.worker_keys import Authenticator, WorkerKeys
from protocol import curve, handshakes
from worker import config as worker_config
from worker import gateway_handshakes
from worker.gateway_handshakes import GatewayHandshakes


async def until(condition, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def worker_config_for(endpoint: str, *flags: str):
    return worker_config.parse(["--connect", endpoint, "--model", "m", *flags], environ={})


@pytest.fixture
def key_dir(tmp_path):
    keys = tmp_path / "keys"
    for name in ("gateway", "admitted", "other"):
        curve.generate(keys, name)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "admitted.key").write_bytes((keys / "admitted.key").read_bytes())
    return keys, allowed


async def test_a_refused_worker_says_why_and_joins_once_its_key_is_added(key_dir, monkeypatch,
                                                                       caplog):
    keys, allowed = key_dir
    monkeypatch.setattr(gateway_handshakes, "RETRY_S", 0.2)
    ctx = zmq.asyncio.Context()
    auth = Authenticator(ctx)
    auth.start()
    worker_keys = WorkerKeys(str(allowed), peer_address=lambda: auth.peer_address)
    auth.configure_curve_callback("*", worker_keys)
    server = ctx.socket(zmq.ROUTER)
    server.curve_server = True
    server.curve_publickey, server.curve_secretkey = curve.load_keypair(keys / "gateway.key_secret")
    seen_by_gateway: list[handshakes.Handshake] = []
    server_watch = handshakes.watch(server, seen_by_gateway.append, "server")
    port = server.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"

    client = ctx.socket(zmq.DEALER)
    client.curve_serverkey = curve.load_public(keys / "gateway.key")
    client.curve_publickey, client.curve_secretkey = curve.load_keypair(keys / "other.key_secret")
    config = worker_config_for(endpoint, "--curve-server-key", str(keys / "gateway.key"),
                               "--curve-secret-key", str(keys / "other.key_secret"))

    def connect_again():
        client.disconnect(endpoint)
        client.connect(endpoint)

    other = curve.load_public(keys / "other.key").decode()
    joining = GatewayHandshakes(config, other, connect_again)
    seen_by_worker: list[handshakes.Handshake] = []
    client_watch = handshakes.watch(client, lambda h: (seen_by_worker.append(h), joining(h)),
                                    "client")
    try:
        with caplog.at_level(logging.INFO):
            client.connect(endpoint)
            await until(lambda: joining.failures >= 2)  # refused, and tried again
            assert {h.cause for h in seen_by_worker} == {handshakes.REFUSED_KEY}
            assert f"refused a worker at 127.0.0.1: its CURVE public key {other} is not in " \
                   f"{allowed}" in caplog.text
            # The refusal is logged once a minute per key, however often it comes.
            assert caplog.text.count(f"its CURVE public key {other}") == 1
            assert f"does not admit this worker's CURVE key {other}" in caplog.text
            assert "Trying again every 0.2 s." in caplog.text

            (allowed / "other.key").write_bytes((keys / "other.key").read_bytes())
            assert worker_keys.reload_if_changed()
            await until(lambda: seen_by_worker[-1].ok)
            await client.send(b"hello")
            assert (await asyncio.wait_for(server.recv_multipart(), 10))[-1] == b"hello"
            assert joining.failures == 0
            assert "joined the gateway at" in caplog.text
            assert not any(h.ok for h in seen_by_gateway[:-1]) and seen_by_gateway[-1].ok
    finally:
        joining.cancel()
        for task in (server_watch, client_watch):
            task.cancel()
        await asyncio.gather(server_watch, client_watch, return_exceptions=True)
        client.close(0)
        server.close(0)
        auth.stop()
        ctx.term()


async def test_curve_on_one_side_is_named_on_both(key_dir):
    keys, _ = key_dir
    ctx = zmq.asyncio.Context()
    server = ctx.socket(zmq.ROUTER)
    server.curve_server = True
    server.curve_publickey, server.curve_secretkey = curve.load_keypair(keys / "gateway.key_secret")
    client = ctx.socket(zmq.DEALER)  # no CURVE
    seen: dict[str, list] = {"server": [], "client": []}
    watches = [handshakes.watch(server, seen["server"].append, "server"),
               handshakes.watch(client, seen["client"].append, "client")]
    try:
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.connect(f"tcp://127.0.0.1:{port}")
        await until(lambda: seen["server"] and seen["client"])
        assert seen["server"][0].cause == seen["client"][0].cause == handshakes.CURVE_ON_ONE_SIDE
        assert handshakes.CURVE_ON_ONE_SIDE in handshakes.NOT_RETRIED
        config = worker_config_for(f"tcp://127.0.0.1:{port}")
        assert "it requires CURVE: pass --curve-server-key" in GatewayHandshakes(
            config, None, lambda: None).why(seen["client"][0])
    finally:
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        client.close(0)
        server.close(0)
        ctx.term()


def test_a_worker_without_its_own_key_pair_is_told_to_make_one():
    config = worker_config_for("tcp://10.0.0.1:5555", "--curve-server-key", "gw.key")
    why = GatewayHandshakes(config, "PUBLIC", lambda: None).why(
        handshakes.Handshake(handshakes.REFUSED_KEY, 400))
    assert "PUBLIC, a fresh one made at start" in why and "batchwire keygen" in why


def test_worker_keys_are_read_again_when_the_directory_changes(key_dir, caplog):
    keys, allowed = key_dir
    extra = curve.load_public(keys / "gateway.key")  # stands for serve's own workers' key
    worker_keys = WorkerKeys(str(allowed), {extra})
    revoked: list[frozenset] = []
    worker_keys.on_revoked = revoked.append
    admitted = curve.load_public(keys / "admitted.key")
    assert worker_keys.callback("*", admitted) and worker_keys.callback("*", extra)
    assert not worker_keys.reload_if_changed()

    (allowed / "other.key").write_bytes((keys / "other.key").read_bytes())
    assert worker_keys.reload_if_changed()
    assert worker_keys.count == 3 and not revoked

    # Rewritten in place: the directory's own stamp may not change, the file's does.
    (allowed / "admitted.key").write_bytes((keys / "other.key").read_bytes() + b"\n")
    os.utime(allowed, ns=(0, 0))
    assert worker_keys.reload_if_changed()
    assert revoked == [frozenset({admitted.decode()})]
    assert not worker_keys.admits(admitted.decode()) and worker_keys.admits(extra.decode())

    # A file that does not load keeps the keys read before, and is read again next time.
    (allowed / "broken.key").write_text("not a certificate")
    with caplog.at_level(logging.ERROR):
        assert not worker_keys.reload_if_changed()
    assert "still admitting the keys read before" in caplog.text
    assert worker_keys.count == 2
    (allowed / "broken.key").unlink()
    assert worker_keys.reload_if_changed()

    # A directory moved away, or a FIFO in it, is a read that failed, not an empty directory:
    # read as empty, it revoked every worker.
    moved = allowed.with_name("moved")
    allowed.rename(moved)
    assert not worker_keys.reload_if_changed()
    assert worker_keys.count == 2 and not revoked[1:]
    moved.rename(allowed)
    os.mkfifo(allowed / "pipe.key")
    assert not worker_keys.reload_if_changed()  # refused without being opened
    assert "not a regular file" in caplog.text and worker_keys.count == 2
