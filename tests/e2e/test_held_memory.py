"""What the gateway holds for requests, on a real server: large answers written a piece at
a time (equal to the same answers written whole), and bodies and answers together bounded by
--max-held-bytes."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket

import aiohttp
import msgpack
import numpy as np
import orjson
import pytest

from tests.e2e.conftest import info_async, post, wait_for, wait_for_async

#: About 110 tokens each: the tiny model's token-level answers are 110 x 32 float32, 14 kB.
TEXTS = [f"text {i} " + "hello world " * 54 for i in range(96)]


def arrays_of(answer: list) -> list[np.ndarray]:
    return [np.asarray(item, dtype=np.float32) for item in answer]


async def answers_in_small_requests(session, url: str) -> list[np.ndarray]:
    answers = []
    for start in range(0, len(TEXTS), 8):
        status, headers, body = await post(session, url + "/predict",
                                           json={"inputs": TEXTS[start:start + 8]})
        assert status == 200 and "Content-Length" in headers  # written whole
        answers += arrays_of(body)
    return answers


async def held_goes_back_to_zero(session, url: str) -> None:
    async def released() -> bool:
        return (await info_async(session, url))["held_bytes"] == 0
    await wait_for_async(released, 10, "the answers' bytes to be given back")


async def test_a_large_answer_is_streamed_and_equals_the_answer_written_whole(
        features_server, tiny_model_dir):
    url = features_server.url
    async with aiohttp.ClientSession() as session:
        expected = await answers_in_small_requests(session, url)
        # 96 answers of 14 kB: over the 1 MiB that is streamed, in JSON and msgpack.
        status, headers, body = await post(session, url + "/predict", json={"inputs": TEXTS})
        assert status == 200, body
        assert headers.get("Transfer-Encoding") == "chunked"
        assert "X-Request-Id" in headers and int(headers["X-Batch-Size"]) >= 1
        got = arrays_of(body)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

        async with session.post(url + "/predict", json={"inputs": TEXTS},
                                headers={"Accept": "application/msgpack"}) as resp:
            assert resp.status == 200 and resp.content_type == "application/msgpack"
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            packed = msgpack.unpackb(await resp.read())
        for item, b in zip(packed, expected):
            array = np.frombuffer(item["data"], dtype=item["dtype"]).reshape(item["shape"])
            np.testing.assert_allclose(array, b, rtol=1e-5, atol=1e-6)

        # KServe v2: one tensor of all the answers (they have one shape), streamed flat.
        same_length = [f"text {i:02d} " + "hello world " * 54 for i in range(96)]
        status, headers, v2 = await post(
            session, f"{url}/v2/models/{tiny_model_dir.name}/infer",
            json={"inputs": [{"name": "text", "shape": [96], "datatype": "BYTES",
                              "data": same_length}]})
        assert status == 200, v2
        assert headers.get("Transfer-Encoding") == "chunked"
        [output] = v2["outputs"]
        status, _, whole = await post(session, url + "/predict", json={"inputs": same_length})
        stacked = np.stack(arrays_of(whole))
        assert output["shape"] == list(stacked.shape) and output["datatype"] == "FP32"
        np.testing.assert_allclose(np.asarray(output["data"], np.float32), stacked.reshape(-1),
                                   rtol=1e-5, atol=1e-6)
        await held_goes_back_to_zero(session, url)


@pytest.fixture(scope="module")
def small_budget_server(start_server, tiny_model_dir):
    """Room for about 40 of the tiny model's token-level answers of TEXTS."""
    return start_server(["--model", str(tiny_model_dir), "--task", "feature-extraction",
                         "--workers", "1", "--max-held-bytes", "600000",
                         "--max-body-bytes", "200000"])


async def test_a_request_whose_answers_pass_the_budget_is_422_and_smaller_ones_are_served(
        small_budget_server):
    url = small_budget_server.url
    async with aiohttp.ClientSession() as session:
        status, _, body = await post(session, url + "/predict", json={"inputs": TEXTS})
        assert status == 422, body
        assert body["error"]["code"] == "answers_too_large"
        message = body["error"]["message"]
        assert "--max-held-bytes" in message and "fewer inputs" in message
        assert "inputs\"[" not in message  # the whole request's, not one item's
        status, _, body = await post(session, url + "/predict", json={"inputs": TEXTS[:16]})
        assert status == 200 and len(body) == 16
        # The refused request's answers were let go; its items' slots on the worker too.
        await held_goes_back_to_zero(session, url)

        async def slots_back() -> bool:
            info = await info_async(session, url)
            return info["workers"] and all(w["in_flight"] == 0 for w in info["workers"])
        await wait_for_async(slots_back, 10, "the worker's slots to come back")
        info = await info_async(session, url)
        assert info["config"]["max_held_bytes"] == 600000
        async with session.get(url + "/metrics") as resp:
            assert "batchwire_held_bytes 0.0" in await resp.text()


async def test_a_body_that_would_pass_the_budget_is_refused_503_before_it_is_read(
        small_budget_server):
    """A body is counted (twice: the bytes and the inputs parsed from them) from its
    Content-Length before it is read: a flood of large bodies is shed, not read."""
    url = small_budget_server.url
    uploader = socket.create_connection(("127.0.0.1", small_budget_server.port))
    # 200,000 bytes announced, 10 sent: the gateway waits for the rest, holding 400,000.
    uploader.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 200000\r\n\r\n" + b'{"inputs":')
    try:
        async with aiohttp.ClientSession() as session:
            async def uploading() -> bool:
                return (await info_async(session, url))["held_bytes"] == 400_000
            await wait_for_async(uploading, 10, "the announced body to be held")
            large = {"inputs": [text[:600] for text in TEXTS[:160]]}  # about 100 kB
            status, headers, body = await post(session, url + "/predict", json=large)
            assert status == 503, body
            assert body["error"]["code"] == "overloaded" and headers["Retry-After"] == "1"
            assert "bodies and answers" in body["error"]["message"]
            assert "--max-held-bytes" in body["error"]["message"]
            status, _, body = await post(session, url + "/predict", json={"inputs": TEXTS[:2]})
            assert status == 200 and len(body) == 2
            # The same 503 as a full queue's to the client; not to the operator.
            async with session.get(url + "/metrics") as resp:
                scrape = await resp.text()
            assert 'batchwire_rejected_total{reason="memory"} 1.0' in scrape
            assert 'batchwire_rejected_total{reason="overload"} 0.0' in scrape
            uploader.close()  # the upload fails; what it held is given back
            await held_goes_back_to_zero(session, url)
    finally:
        uploader.close()


async def test_a_compressed_body_is_counted_at_its_inflated_size(small_budget_server):
    """The gateway inflates a gzip body (up to --max-body-bytes): 2 kB on the wire can be 2 MB
    once read. Counted at its Content-Length alone, a flood of them would hold about a
    thousand times what the budget shows."""
    url = small_budget_server.url
    # 150 kB of JSON (the padding is whitespace) in a few hundred bytes of gzip.
    inflated = b'{"inputs": ["hello world"]' + b" " * 150_000 + b"}"
    packed = gzip.compress(inflated)
    assert len(packed) < 1000
    gz = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with aiohttp.ClientSession() as session:
        status, _, body = await post(session, url + "/predict", data=packed, headers=gz)
        assert status == 200 and len(body) == 1  # room for 2 x 150 kB: served

        uploader = socket.create_connection(("127.0.0.1", small_budget_server.port))
        try:
            uploader.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
                             b"application/json\r\nContent-Length: 200000\r\n\r\n{")
            async def uploading() -> bool:
                return (await info_async(session, url))["held_bytes"] == 400_000
            await wait_for_async(uploading, 10, "the announced body to be held")
            # 400 kB held: 2 x 150 kB more would pass 600 kB, though 2 x 1 kB would not.
            status, headers, body = await post(session, url + "/predict", data=packed,
                                               headers=gz)
            assert status == 503, body
            assert body["error"]["code"] == "overloaded" and headers["Retry-After"] == "1"
            assert "this body would take it past" in body["error"]["message"]
        finally:
            uploader.close()
        await held_goes_back_to_zero(session, url)


async def test_a_client_that_stops_reading_its_answer_is_dropped_and_its_answers_let_go(
        features_server):
    """It would otherwise hold its answers, and their share of --max-held-bytes, for as
    long as it kept the connection open."""
    url = features_server.url
    # ~10 MB of JSON: loopback's socket buffers take nearly 3 MB of it unread.
    texts = [f"text {i} " + "hello world " * 57 for i in range(256)]
    body = json.dumps({"inputs": texts}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window
    sock.connect(("127.0.0.1", features_server.port))
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"X-Timeout-Ms: 5000\r\nX-Request-Id: never-reads\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        async with aiohttp.ClientSession() as session:
            async def holding() -> bool:
                return (await info_async(session, url))["held_bytes"] > 0
            await wait_for_async(holding, 30, "the answers to be held while being written")
            await held_goes_back_to_zero(session, url)
        # 5 s: computing it (under half a second here) must fit in the deadline on a loaded
        # machine too, or a small 504 goes out whole and nothing is dropped.
        wait_for(lambda: "never-reads: the client did not take its answer within 5.0 s"
                 in features_server.log_text(), 10, "the gateway to log the dropped client")
        # Its one line: the client's doing, not the gateway's error to log with a traceback.
        assert "Error handling request" not in features_server.log_text()
        # The connection was dropped: what reading finds now ends short of the answer.
        sock.settimeout(10)
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 16):
                received += len(chunk)
        assert received < 5_000_000
    finally:
        sock.close()


# -- in process: an answer written whole, to a socket that takes little ---------------------
async def test_an_answer_written_whole_keeps_its_claim_until_the_client_takes_it(caplog):
    """aiohttp writes a handler's response after the handler returns, with no time limit.
    Over loopback the kernel takes a few MB at once; over a real network it can take far
    less, so the gateway's socket is given a small send buffer here. The answer must stay
    counted in the budget while it waits for the client, and a client that never takes it
    is dropped at the request's deadline. (Before, the claim was given back when the handler
    returned, and the answer waited uncounted for as long as the client kept the line.)
    The connection guard, closing idle connections after 0.4 s, leaves it alone meanwhile:
    the connection is still answering a request."""
    from types import SimpleNamespace

    from aiohttp import web

    from gateway.app import BROKER, WRITTEN_AT_ONCE_BYTES, _claim, answer_response
    from gateway.connections import ConnectionGuard
    from gateway.held_memory import HeldMemory
    from tests.e2e.in_process import bare_app, listening

    memory = HeldMemory(1 << 30)
    answered = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        _claim(request).hold_answer(200_000)
        answer = [{"token_str": "x" * 1000, "score": 0.5}] * 600  # ~640 kB of JSON
        response = await answer_response(request, answer, {})
        answered.set()
        return response

    app = bare_app(handler, ConnectionGuard(16, idle_timeout_s=0.4),
                   {BROKER: SimpleNamespace(memory=memory)})
    async with listening(app) as port:
        def request(request_id: str, rcvbuf: int | None) -> socket.socket:
            sock = socket.socket()
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Timeout-Ms: 1500\r\n"
                         b"X-Request-Id: " + request_id.encode() + b"\r\n"
                         b"Content-Length: 0\r\n\r\n")
            return sock

        reader = request("reads", None)
        try:
            await asyncio.wait_for(answered.wait(), 10)
            reader.setblocking(False)
            received = b""
            while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) \
                    < int(received.partition(b"Content-Length: ")[2].split(b"\r\n")[0]):
                received += await asyncio.get_running_loop().sock_recv(reader, 1 << 16)
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head
            assert len(body) > WRITTEN_AT_ONCE_BYTES and orjson.loads(body)[0]["score"] == 0.5
            await wait_for_async(lambda: asyncio.sleep(0, memory.held == 0), 5,
                                 "a client that reads to give its answer's bytes back")
        finally:
            reader.close()

        answered.clear()
        stalled = request("never-reads", 4096)
        try:
            await asyncio.wait_for(answered.wait(), 10)
            # The handler has returned; the answer is still being written, and still held.
            assert memory.held == 200_000
            await wait_for_async(lambda: asyncio.sleep(0, memory.held == 0), 10,
                                 "the stalled client's answer to be given back")
            assert "never-reads: the client did not take its answer within 1.5 s" \
                in caplog.text
            stalled.settimeout(5)
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := stalled.recv(1 << 16):
                    received += chunk
            assert received.startswith(b"HTTP/1.1 200") and len(received) < 600_000
        finally:
            stalled.close()


@pytest.mark.parametrize("held", [300_000, 3_000_000], ids=["written-whole", "streamed"])
async def test_a_client_that_reads_slowly_but_steadily_gets_its_whole_answer(held):
    """The deadline is on the client taking nothing at all, not on its speed. With it on a
    whole piece of the answer (1 MiB streamed, all of it written whole), a client reading
    160 kB/s without a pause was cut off mid-answer at X-Timeout-Ms 4000. Here the gateway's
    socket takes little at a time, the client reads 32 kB every 100 ms (320 kB/s, so the
    answer, about 1 MB, takes longer than its 2 s deadline), and the whole answer arrives.
    (At 1 s and 40 ms, a test process stalled for most of a second had the deadline fire
    before the client's next read.)"""
    from types import SimpleNamespace

    from aiohttp import web

    from gateway.app import BROKER, _claim, answer_response
    from gateway.connections import ConnectionGuard
    from gateway.held_memory import HeldMemory
    from tests.e2e.in_process import bare_app, listening

    memory = HeldMemory(1 << 30)
    items = 1400 if held > 1_000_000 else 900

    async def handler(request: web.Request) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        _claim(request).hold_answer(held)
        answer = [{"token_str": f"{i:05d}" + "x" * 1000, "score": 0.5} for i in range(items)]
        return await answer_response(request, answer, {})

    app = bare_app(handler, ConnectionGuard(16, idle_timeout_s=30),
                   {BROKER: SimpleNamespace(memory=memory)})
    async with listening(app) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Timeout-Ms: 2000\r\n"
                     b"Connection: close\r\nContent-Length: 0\r\n\r\n")
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        received = b""
        try:
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 32768), 10):
                received += chunk
                await asyncio.sleep(0.1)  # the client's pace, not a wait on the server
        finally:
            sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    if b"chunked" in head:
        chunks, rest = [], body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            chunks.append(rest[:int(size, 16)])
            rest = rest[int(size, 16) + 2:]
        body = b"".join(chunks)
    assert (b"chunked" in head) == (held > 1_000_000)
    answer = orjson.loads(body)
    assert len(answer) == items and answer[-1]["token_str"].startswith(f"{items - 1:05d}")


def test_an_answer_never_written_gives_its_claim_back_when_dropped():
    """aiohttp writes nothing when the connection went before the handler returned: the
    answer's claim must come back with the response object all the same."""
    from aiohttp.test_utils import make_mocked_request

    from gateway.app import REQUEST_ID, HeldAnswer
    from gateway.held_memory import HeldMemory

    memory = HeldMemory(1 << 20)
    claim = memory.claim()
    claim.hold_answer(1000)
    request = make_mocked_request("POST", "/", headers={"X-Timeout-Ms": "1000"})
    request[REQUEST_ID] = "gone"
    answer = HeldAnswer(request, claim, b"[1]", {}, "application/json")
    assert memory.held == 1000
    del answer
    assert memory.held == 0
