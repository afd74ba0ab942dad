"""Gateway and workers of different releases (protocol/codec.py, NewerFields): a real
`batchwire worker` facing a gateway, played by a ROUTER socket in this test, that sends a
REQUEST with a field the worker does not know, as a newer gateway sends `prompt_name` to a
worker that predates it. The worker must answer that request at once, saying to upgrade
the workers, not drop it and leave its client to its deadline; and so must it answer a
REQUEST it refuses for what it holds."""

from __future__ import annotations

import asyncio

import msgpack
import zmq
import zmq.asyncio

from protocol import codec
from protocol.messages import (MAX_NESTING, PROTOCOL_VERSION, Error, MessageType, Ready, Request,
                               Result)
from tests.e2e.conftest import free_port, start_worker

WAIT_S = 120.0  # the worker loads torch and its model first


async def receive(router, kind: type, timeout: float = WAIT_S):
    """The next message of ``kind`` from the worker (heartbeats and the like skipped)."""
    async def next_of_kind():
        while True:
            identity, frame = await router.recv_multipart()
            message = codec.decode(frame)
            if isinstance(message, kind):
                return identity, message
    return await asyncio.wait_for(next_of_kind(), timeout)


async def test_a_worker_answers_a_request_it_cannot_read_instead_of_dropping_it(
        procs, tmp_path, tiny_model_dir):
    port = free_port()
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"tcp://127.0.0.1:{port}")
    try:
        worker = start_worker(procs, tmp_path, port, tiny_model_dir)
        identity, _ = await receive(router, Ready)
        newer = [PROTOCOL_VERSION, int(MessageType.REQUEST), 41, "a [MASK]", {}, 30_000.0, 0.0,
                 False, "", "a field from a later release"]
        for _ in range(2):
            await router.send_multipart([identity, msgpack.packb(newer)])
            _, error = await receive(router, Error, timeout=10)
            assert error.request_id == 41 and error.code == "protocol_error"
            assert "upgrade the workers" in error.message
        # A REQUEST it refuses for its content (nested past MAX_NESTING: a gateway of
        # another release, or a bug) is answered too, so its slot comes back at once.
        nested: list = []
        for _ in range(MAX_NESTING):
            nested = [nested]
        deep = [PROTOCOL_VERSION, int(MessageType.REQUEST), 43, "a [MASK]", {"x": nested},
                30_000.0, 0.0]
        await router.send_multipart([identity, msgpack.packb(deep)])
        _, error = await receive(router, Error, timeout=10)
        assert (error.request_id, error.code) == (43, "protocol_error")
        assert "cannot read this request" in error.message and "nest" in error.message
        # The worker goes on serving what it can read.
        await router.send_multipart([identity, codec.encode(
            Request(42, "a [MASK]", {}, 30_000.0, 0.0))])
        _, result = await receive(router, Result, timeout=30)
        assert result.request_id == 42
    finally:
        router.close()
        ctx.term()
    worker.stop()
    log = worker.log_text()
    assert log.count("the gateway sends Request that this worker cannot read") == 1, log
