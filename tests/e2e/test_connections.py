"""What clients may hold of the gateway's connections (gateway/connections.py), on the real
app listening on 127.0.0.1 the way `batchwire serve` listens, with raw sockets as clients:
no more than --max-connections open, none idle past --idle-timeout-s, no body arriving past
its request's deadline, and no body sent at all (Expect: 100-continue) that would be refused."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import resource
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from gateway.app import BROKER, CONNECTIONS, create_app
from gateway.broker import Broker
from gateway.config import GatewayConfig
from gateway.connections import OTHER_DESCRIPTORS
from tests.e2e.conftest import free_port, http_get, wait_for, wait_for_async
from tests.e2e.in_process import connect_raw, listening

IDLE_TIMEOUT_S = 0.4
MAX_CONNECTIONS = 3
HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
async def gateway():
    """start(idle_timeout_s) -> (the guard, connect() -> a raw client socket)."""
    clients: list[socket.socket] = []
    async with contextlib.AsyncExitStack() as stack:

        async def start(idle_timeout_s: float = IDLE_TIMEOUT_S, **settings):
            config = GatewayConfig(max_connections=MAX_CONNECTIONS,
                                   idle_timeout_s=idle_timeout_s, **settings)
            app = create_app(config, Broker("inproc://connections-test", max_queue=4,
                                            max_held_bytes=config.max_held_bytes))
            port = await stack.enter_async_context(listening(app, handler_cancellation=True))
            start.app = app
            # The app's own guard, which server.py listens with.
            return app[CONNECTIONS], functools.partial(connect_raw, port, clients)

        yield start
        for sock in clients:  # before the servers stop: they wait for open connections
            sock.close()


async def recv_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the gateway sends until it closes the connection (or the timeout)."""
    loop = asyncio.get_running_loop()
    received = b""

    async def until_closed() -> None:
        nonlocal received
        while chunk := await loop.sock_recv(sock, 65536):
            received += chunk
    await asyncio.wait_for(until_closed(), timeout)
    return received


async def answer(sock: socket.socket, request: bytes) -> bytes:
    """One keep-alive request's whole answer (its body is JSON with a Content-Length)."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, request)
    received = b""
    while True:
        head, _, body = received.partition(b"\r\n\r\n")
        if _ and b"Content-Length: " in head:
            length = int(head.partition(b"Content-Length: ")[2].split(b"\r\n")[0])
            if len(body) >= length:
                return received
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
        assert chunk, f"closed mid-answer: {received!r}"
        received += chunk


async def test_idle_and_slow_head_connections_are_closed_and_busy_ones_kept(gateway):
    guard, connect = await gateway()
    idle = await connect()
    slow_head = await connect()
    await asyncio.get_running_loop().sock_sendall(slow_head, HEALTH[:20])  # never finished
    busy = await connect()
    loop = asyncio.get_running_loop()
    started = loop.time()
    # The busy one asks for something, one request after another, for three timeouts.
    while loop.time() - started < 3 * IDLE_TIMEOUT_S:
        assert (await answer(busy, HEALTH)).startswith(b"HTTP/1.1 200")
    # The other two were closed, between one and two timeouts after they opened.
    assert await recv_until_closed(idle, 1) == b""
    assert await recv_until_closed(slow_head, 1) == b""
    assert guard.idle_closed == 2 and guard.open == 1
    # And the busy one, once it stops asking, goes too.
    assert await recv_until_closed(busy, 4 * IDLE_TIMEOUT_S + 2) == b""
    assert guard.idle_closed == 3 and guard.open == 0


async def test_refused_connections_linger_no_more_than_max_lingering_at_once(gateway,
                                                                           monkeypatch):
    """A flood past the limit must not hold a descriptor per refused connection for its
    linger: past max_lingering, a refused connection is closed once its 503 is written."""
    # A linger longer than the test: its 1 s could end on a loaded machine before the
    # count is read, and the end below must come from the client's close.
    monkeypatch.setattr("gateway.connections.REFUSED_LINGER_S", 30.0)
    guard, connect = await gateway(idle_timeout_s=60)
    guard.max_lingering = 1
    for _ in range(MAX_CONNECTIONS):
        await connect()
    await wait_for_async(lambda: asyncio.sleep(0, guard.open == MAX_CONNECTIONS), 5,
                         "the connections to be open")
    lingering = await connect()  # has not closed its side: it lingers
    await wait_for_async(lambda: asyncio.sleep(0, guard.lingering == 1), 5, "a linger")
    closed = await connect()
    assert (await recv_until_closed(closed)).startswith(b"HTTP/1.1 503")
    assert guard.refused == 2 and guard.lingering == 1
    lingering.close()  # the client closes its side: the linger ends
    await wait_for_async(lambda: asyncio.sleep(0, guard.lingering == 0), 5, "the linger to end")


async def test_a_connection_past_the_limit_gets_503_and_the_next_one_after_a_close_is_served(
        gateway):
    guard, connect = await gateway(idle_timeout_s=60)
    held = [await connect() for _ in range(MAX_CONNECTIONS)]
    await wait_for_async(lambda: asyncio.sleep(0, guard.open == MAX_CONNECTIONS), 5,
                         "the connections to be open")
    extra = await connect()
    await asyncio.get_running_loop().sock_sendall(extra, HEALTH)
    refused = await recv_until_closed(extra)
    head, _, body = refused.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
    assert b"Server: batchwire" in head and b"X-Content-Type-Options: nosniff" in head
    error = orjson.loads(body)["error"]
    assert error["code"] == "overloaded" and "--max-connections" in error["message"]
    assert guard.refused == 1 and guard.open == MAX_CONNECTIONS

    held.pop().close()
    await wait_for_async(lambda: asyncio.sleep(0, guard.open < MAX_CONNECTIONS), 5,
                         "a connection to close")
    again = await connect()
    metrics = await answer(again, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert metrics.startswith(b"HTTP/1.1 200")
    assert b"batchwire_connections 3.0" in metrics
    assert b'batchwire_connections_closed_total{reason="refused"} 1.0' in metrics
    info = orjson.loads((await answer(again, b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n"))
                        .partition(b"\r\n\r\n")[2])
    assert info["connections"] == 3 and info["config"]["max_connections"] == MAX_CONNECTIONS


async def test_a_body_that_does_not_arrive_within_the_deadline_is_504(gateway):
    guard, connect = await gateway()
    sock = await connect()
    await asyncio.get_running_loop().sock_sendall(
        sock, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"X-Timeout-Ms: 300\r\nContent-Length: 100\r\n\r\n" + b'{"inputs": ')
    answered = await recv_until_closed(sock)
    head, _, body = answered.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504"), answered
    error = orjson.loads(body)["error"]
    assert error["code"] == "deadline_exceeded"
    assert "body did not arrive" in error["message"] and "0.3 s" in error["message"]
    assert guard.open == 0  # the rest of the body was never coming: closed


async def read_head(sock: socket.socket) -> bytes:
    """What the gateway sends, up to at least the end of its first status line and headers
    (a 100 Continue is one on its own)."""
    loop = asyncio.get_running_loop()
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
        assert chunk, f"closed: {received!r}"
        received += chunk
    return received


def expecting(length: int) -> bytes:
    return (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n")


async def test_expect_100_continue_is_answered_only_once_the_body_is_wanted(gateway):
    """aiohttp's default sent 100 Continue before the handler ran: the client then sent a
    body the gateway was about to refuse unread. Now a refusal comes instead of the 100."""
    guard, connect = await gateway(idle_timeout_s=60, max_body_bytes=1000,
                                   max_held_bytes=4000)
    loop = asyncio.get_running_loop()
    # Over --max-body-bytes: 413 at once, and no 100 before it.
    sock = await connect()
    await loop.sock_sendall(sock, expecting(5000))
    assert (await read_head(sock)).startswith(b"HTTP/1.1 413")

    # The budget full (another request's body holds 4000 of 4000): 503 at once.
    held = gateway.app[BROKER].memory.claim()
    held.hold_body(2000)
    sock = await connect()
    await loop.sock_sendall(sock, expecting(100))
    head = await read_head(sock)
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
    assert b"Server: batchwire" in head and b"X-Content-Type-Options: nosniff" in head
    held.release()

    # Room for it: 100 Continue, then the body is read and the request goes on (to the 503
    # of a gateway no worker has joined).
    sock = await connect()
    await loop.sock_sendall(sock, expecting(len(b'{"inputs": "a [MASK]"}')))
    assert await read_head(sock) == b"HTTP/1.1 100 Continue\r\n\r\n"
    await loop.sock_sendall(sock, b'{"inputs": "a [MASK]"}')
    answer = await read_head(sock)
    while b"no_workers" not in answer:
        answer += await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
    assert answer.startswith(b"HTTP/1.1 503")

    # An expectation it does not know is ignored (RFC 9110 allows it), not a plain-text 417.
    sock = await connect()
    await loop.sock_sendall(sock, b"POST /predict HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\n"
                                  b"Content-Type: application/json\r\nContent-Length: 22\r\n"
                                  b"\r\n" + b'{"inputs": "a [MASK]"}')
    assert (await read_head(sock)).startswith(b"HTTP/1.1 503")


@pytest.mark.parametrize("room", ["under the hard limit", "past the hard limit"])
def test_the_gateway_raises_its_open_files_limit_to_fit_its_connections(tmp_path, room):
    """Many hosts start processes at 1,024 descriptors: past them, connections would be
    reset in the kernel's backlog, never reaching the guard, with nothing in any log."""
    _, runner_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 500 + OTHER_DESCRIPTORS
    hard = wanted + 100 if room == "under the hard limit" else 300
    assert runner_hard == resource.RLIM_INFINITY or runner_hard >= hard
    port, zmq_port = free_port(), free_port()
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "gateway", "--port", str(port), "--zmq-bind",
             f"tcp://127.0.0.1:{zmq_port}", "--max-connections", "500"],
            stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard)))
    try:
        wait_for(lambda: "listening on" in log.read_text(), 30, "the gateway to listen")
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        soft = int(next(line for line in limits.splitlines()
                        if line.startswith("Max open files")).split()[3])
        if room == "under the hard limit":
            assert f"raised the open-files limit from 300 to {wanted}" in log.read_text()
            assert soft == wanted
        else:
            assert ("the open-files limit is 300 (hard limit 300), under the "
                    f"{wanted} that --max-connections 500 needs") in log.read_text()
            assert soft == 300
        assert http_get(f"http://127.0.0.1:{port}/health")[0] == 200
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
