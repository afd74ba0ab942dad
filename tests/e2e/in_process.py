"""The gateway's app served in the test's own event loop, listening as `batchwire serve`
listens (through its ConnectionGuard, over TLS when asked), and raw sockets to it: for tests
that need to see what the guard, aiohttp's connection handler or a transport does, which a
subprocess would hide."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from ssl import SSLContext
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

from aiohttp import web

from gateway.api_keys import ApiKeys
from gateway.app import API_KEYS, CONFIG, CONNECTIONS, error_middleware
from gateway.config import GatewayConfig
from gateway.connections import ConnectionGuard


def bare_app(handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
             guard: ConnectionGuard, extra: Mapping[web.AppKey, Any] | None = None
             ) -> web.Application:
    """``POST /`` answered by ``handler`` behind the gateway's error middleware and ``guard``,
    with the app keys the middleware reads, and ``extra``."""
    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = GatewayConfig()
    app[API_KEYS] = ApiKeys()
    app[CONNECTIONS] = guard
    for key, value in (extra or {}).items():
        app[key] = value
    app.router.add_post("/", handler)
    return app


@contextlib.asynccontextmanager
async def listening(app: web.Application, ssl: SSLContext | None = None,
                    **runner_settings) -> AsyncIterator[int]:
    """The port ``app`` listens on at 127.0.0.1 through its guard, until the block ends."""
    runner = web.AppRunner(app, **runner_settings)
    await runner.setup()
    listener = await app[CONNECTIONS].listen(runner, "127.0.0.1", 0, ssl=ssl)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        await runner.cleanup()


async def connect_raw(port: int, opened: list[socket.socket]) -> socket.socket:
    """A non-blocking client socket connected to ``port``, added to ``opened`` (to close)."""
    sock = socket.socket()
    sock.setblocking(False)
    opened.append(sock)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock
