"""Requests that are not valid HTTP/1.1 (gateway/malformed_http.py), sent as raw bytes to the
real app listening on 127.0.0.1 the way `batchwire serve` listens: each gets one JSON error
that says what to fix, its connection is closed, and the log gets one WARNING a minute at
most and no traceback."""

from __future__ import annotations

import asyncio
import functools
import gzip
import logging
import re
import socket

import orjson
import pytest
from aiohttp import web

from gateway import body_coding
from gateway.app import CONNECTIONS, create_app, runner_settings
from gateway.broker import Broker
from gateway.config import GatewayConfig
from gateway.connections import ConnectionGuard
from tests.e2e.conftest import wait_for_async
from tests.e2e.in_process import bare_app, connect_raw, listening
from tests.e2e.test_connections import answer, recv_until_closed


@pytest.fixture
async def gateway():
    """connect() -> a raw client socket to a gateway with no workers (bodies are read before
    a worker is needed)."""
    config = GatewayConfig()
    app = create_app(config, Broker("inproc://malformed-test", max_queue=4,
                                    max_held_bytes=config.max_held_bytes))
    clients: list[socket.socket] = []
    async with listening(app, **runner_settings()) as port:
        connect = functools.partial(connect_raw, port, clients)
        connect.guard = app[CONNECTIONS]
        yield connect
        for sock in clients:
            sock.close()


async def exchange(connect, data: bytes | list[bytes]) -> tuple[bytes, dict]:
    """Send data (the pieces one after another, each once the gateway has read the last), and
    read until the gateway closes: the head of its one answer, and the answer's error."""
    sock = await connect()
    loop = asyncio.get_running_loop()
    for piece in data if isinstance(data, list) else [data]:
        await loop.sock_sendall(sock, piece)
    received = await recv_until_closed(sock, 10)
    assert answers(received) == 1, f"not one answer: {received!r}"
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head and b"Server: batchwire" in head
    assert b"X-Content-Type-Options: nosniff" in head
    return head, orjson.loads(body)["error"]


def answers(received: bytes) -> int:
    return len(re.findall(rb"HTTP/1\.[01] \d{3} ", received))


def troubles(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("request_bytes, status, code, says", [
    (b"GARBAGE\r\n\r\n", 400, "malformed_request", "not valid HTTP/1.1 (Invalid method"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), 400, "malformed_request",
     "use http://, not https://"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "malformed_request", "HTTP/2"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431,
     "head_too_large", "longer than the 8190 bytes"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431, "head_too_large",
     "not the URL or headers"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400, "malformed_request",
     "Content-Length"),
], ids=["bad-method", "tls", "h2c", "long-header", "long-url", "bad-length"])
async def test_a_request_that_is_not_http_gets_a_json_error_and_its_connection_closed(
        gateway, caplog, request_bytes, status, code, says):
    caplog.set_level(logging.DEBUG)
    head, error = await exchange(gateway, request_bytes)
    assert head.startswith(b"HTTP/1.0 %d " % status), head
    assert error["code"] == code and says in error["message"], error
    assert b"aiohttp" not in head and b"Traceback" not in head
    # One WARNING (the first this minute), and no traceback logged at all.
    assert [r.name for r in troubles(caplog)] == ["batchwire.gateway.http"]
    assert not any(r.exc_info for r in caplog.records if r.levelno > logging.DEBUG)
    assert gateway.guard.malformed.count == 1


async def test_malformed_requests_warn_once_a_minute_and_are_counted(gateway, caplog):
    caplog.set_level(logging.INFO)
    for _ in range(5):
        await exchange(gateway, b"GARBAGE\r\n\r\n")
    assert len(troubles(caplog)) == 1
    sock = await gateway()
    metrics = await answer(sock, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b'batchwire_connections_closed_total{reason="malformed"} 5.0' in metrics
    # They are in the access log, as every answered request is.
    assert sum(" 400 " in r.getMessage() for r in caplog.records
               if r.name == "batchwire.access") == 5


async def test_a_chunked_body_whose_framing_breaks_after_its_head_is_answered_at_once(
        gateway, caplog):
    """aiohttp queues a framing error that arrives after the head as the next request: the
    body being read waited out its deadline (60 s here), then two answers went out."""
    caplog.set_level(logging.INFO)
    head = (b"POST / HTTP/1.1\r\nHost: x\r\nX-Timeout-Ms: 60000\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    sock = await gateway()
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, head)
    # Wait until the handler is reading the body, then break its framing.
    await wait_for_async(lambda: any(s.handling for s in gateway.guard.states.values()), 5,
                         "the handler to read the body")
    await loop.sock_sendall(sock, b"zz\r\nworld\r\n0\r\n\r\n")
    received = await recv_until_closed(sock, 10)  # well before the body's 60 s deadline
    assert answers(received) == 1, received
    answer_head, _, body = received.partition(b"\r\n\r\n")
    assert answer_head.startswith(b"HTTP/1.1 400") and b"Connection: close" in answer_head
    error = orjson.loads(body)["error"]
    assert error["code"] == "malformed_request" and "chunk size" in error["message"]
    assert not troubles(caplog)


@pytest.mark.parametrize("body, says", [
    (gzip.compress(b'{"inputs": "x"}')[:10] + b"not deflate data at all",
     "does not decompress as its Content-Encoding says"),
    # aiohttp, inflating the body itself, took a cut stream for the text before the cut.
    (gzip.compress(b"a whole sentence, of which the model saw half")[:30], "stops before its end"),
], ids=["corrupt", "cut"])
async def test_a_body_that_does_not_decompress_whole_gets_400_not_what_it_held(gateway, caplog,
                                                                              body, says):
    caplog.set_level(logging.INFO)
    sock = await gateway()
    received = await answer(sock, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    head, _, answer_body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), received
    error = orjson.loads(answer_body)["error"]
    assert error["code"] == "malformed_request" and says in error["message"], error
    # The body's framing was whole: the connection takes the next request.
    assert (await answer(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(
        b"HTTP/1.1 200")
    assert not troubles(caplog)


async def test_an_empty_compressed_body_gets_the_routes_answer_for_an_empty_body(gateway):
    sock = await gateway()
    received = await answer(sock, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                                  b"Content-Length: 0\r\n\r\n")
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), received
    assert orjson.loads(body)["error"]["code"] == "bad_input"


@pytest.mark.parametrize("coding", ["compress", "br"])
async def test_a_body_in_a_coding_the_server_does_not_decode_is_refused_not_passed_on(
        gateway, monkeypatch, coding):
    monkeypatch.setattr(body_coding, "brotli", None)  # as where the library is not installed
    sock = await gateway()
    received = await answer(sock, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Encoding: %s\r\n"
                                  b"Content-Length: 3\r\n\r\nabc" % coding.encode())
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 415")
    error = orjson.loads(body)["error"]
    assert error["code"] == "unsupported_media_type" and repr(coding) in error["message"]
    # The framing was fine: the connection takes the next request.
    assert (await answer(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(
        b"HTTP/1.1 200")


async def test_garbage_behind_a_whole_body_does_not_fail_that_body():
    """A parse error fails only a body still arriving: a body that is all here but not yet
    read, with garbage arriving behind it, is read and answered, then the garbage gets its
    400."""
    async def handler(request: web.Request) -> web.Response:
        # The body waits, unread, until aiohttp has queued the garbage behind it (as the
        # connection's next message: aiohttp's own queue, read here only to sequence this).
        await wait_for_async(lambda: len(request.protocol._messages) > 0, 5,
                             "the garbage to be parsed")
        return web.Response(body=await request.read())

    guard = ConnectionGuard(4, idle_timeout_s=60)
    clients: list[socket.socket] = []
    async with listening(bare_app(handler, guard)) as port:
        sock = await connect_raw(port, clients)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        await wait_for_async(lambda: any(s.handling for s in guard.states.values()), 5,
                             "the handler to start")
        await loop.sock_sendall(sock, b"GARBAGE\r\n\r\n")
        received = await recv_until_closed(sock, 10)
        sock.close()
    assert answers(received) == 2, received
    first, second = re.split(rb"(?=HTTP/1\.[01] \d{3} )", received)[1:]
    assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"hello")
    assert second.startswith(b"HTTP/1.0 400") and b'"malformed_request"' in second
