"""How many of the gateway's connections clients may hold, and for how long without a request.

aiohttp keeps a connection for as long as its client wants, and takes as many as come.
Measured with aiohttp 3.14: a connection that sends nothing, and one that sends half a
request head, were both still open after 100 s. Each costs a file descriptor and memory
(measured on the gateway: 4,000 idle connections 22 MB, 4,000 with half-sent bodies 57 MB).
Enough of them exhaust the descriptors, and the gateway stops taking connections, or its
memory, and it is killed with every request on it. So the listening socket's protocol
factory is a :class:`ConnectionGuard`:

- past ``--max-connections`` a new connection gets a 503 ``overloaded`` and is closed, without
  its request being read or aiohttp being involved;
- a connection that, for a whole ``--idle-timeout-s``, starts no request while none of its
  requests is being handled (an answer still being written counts) is closed: an idle
  keep-alive connection, or one sending a head too slowly. (A body that is slow to arrive is bounded by its request's own deadline, in
  :func:`gateway.app._read_body`.) So it is closed between one and two timeouts after its
  last request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

from aiohttp import web

from gateway.answer_shape import ANSWER_HEADERS, error_body
from gateway.malformed_http import MalformedLog, json_errors
from protocol.errors import Overloaded

if TYPE_CHECKING:
    from ssl import SSLContext

log = logging.getLogger("batchwire.gateway.connections")

#: How long a refused connection may take to close its side after its 503 was sent.
REFUSED_LINGER_S = 1.0
#: Refused connections lingering at once, at most. Past it, one is closed as soon as its 503
#: is written (its client may then see a reset instead): a flood of new connections past
#: --max-connections, each holding a descriptor for its linger, would otherwise take the
#: descriptors kept for everything else (OTHER_DESCRIPTORS), and the listener, out of them,
#: would stop accepting even the probes' connections.
MAX_LINGERING = 64
#: Connections the kernel may queue before the gateway accepts them (aiohttp's site: 128, too
#: few for a burst of clients connecting at once).
LISTEN_BACKLOG = 1024


#: Descriptors the gateway needs besides its clients' connections: the worker link, local
#: workers' pipes, logs, the listening socket, a margin.
OTHER_DESCRIPTORS = 256


def make_room_for(max_connections: int) -> tuple[int, str] | None:
    """Raise this process's open-files limit (the soft one, up to the hard one) so that
    ``max_connections`` fit; what to log about it (level, message), if anything. Many hosts start processes
    at 1,024 descriptors: the guard would then never see its limit, and past the descriptors
    new connections are reset in the kernel's backlog with nothing in any log."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + OTHER_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        except (ValueError, OSError):
            raised = soft
        if raised < wanted:
            return logging.WARNING, (f"the open-files limit is {raised} (hard limit {hard}), under the "
                    f"{wanted} that --max-connections {max_connections} needs: past "
                    f"{raised - OTHER_DESCRIPTORS} clients, connections are reset unanswered; "
                    "raise the hard limit (ulimit -Hn, or the container's nofile) or lower "
                    "--max-connections")
        return logging.INFO, (f"raised the open-files limit from {soft} to {raised} for "
                              "--max-connections")
    return None


def refusal(limit: int) -> bytes:
    """The whole 503 a connection past the limit gets: the error shape and headers of every
    route's answers."""
    error = Overloaded(f"the server holds as many connections as it takes ({limit}, "
                       "--max-connections); retry shortly, or reuse a connection")
    body = error_body(error)
    headers = {**ANSWER_HEADERS, "Content-Type": "application/json",
               "Retry-After": str(error.retry_after), "Connection": "close",
               "Content-Length": str(len(body))}
    return (b"HTTP/1.1 503 Service Unavailable\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()
            + b"\r\n" + body)


class ConnectionState:
    """What the request handlers tell the guard about one connection."""

    __slots__ = ("started", "handling")

    def __init__(self) -> None:
        #: A request started since the last check.
        self.started = False
        #: Requests being handled now.
        self.handling = 0


class ConnectionGuard:
    """The protocol factory of the gateway's listening socket, around aiohttp's own."""

    def __init__(self, max_connections: int, idle_timeout_s: float):
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        #: aiohttp's protocol factory (the runner's server), set when the site starts.
        self.inner: Callable[[], asyncio.Protocol] | None = None
        #: Keyed by transport: what a request handler finds as ``request.transport``.
        self.states: dict[asyncio.BaseTransport, ConnectionState] = {}
        self.refused = 0
        self.idle_closed = 0
        #: Refused connections lingering now (at most max_lingering).
        self.lingering = 0
        self.max_lingering = MAX_LINGERING
        self.refusal = refusal(max_connections)
        #: Requests that were not HTTP, answered with a JSON error and closed.
        self.malformed = MalformedLog()
        self._handler_class = json_errors(self)

    @property
    def open(self) -> int:
        return len(self.states)

    async def listen(self, runner: web.AppRunner, host: str, port: int,
                     ssl: "SSLContext | None" = None) -> asyncio.AbstractServer:
        """Listen on host:port, aiohttp's protocol behind this guard (in place of its
        TCPSite), over TLS with ``ssl``. Close the returned server before
        ``runner.cleanup()``, which closes the connections still open."""
        self.inner = runner.server
        # A connection is the guard's once its TLS handshake is done; until then the
        # handshake timeout bounds it, as the idle timeout bounds one that sends nothing.
        handshake = {"ssl_handshake_timeout": self.idle_timeout_s} if ssl is not None else {}
        return await asyncio.get_running_loop().create_server(
            self, host, port, backlog=LISTEN_BACKLOG, ssl=ssl, **handshake)

    def __call__(self) -> asyncio.Protocol:
        if self.inner is None:
            raise RuntimeError("ConnectionGuard used before its site started")
        if len(self.states) >= self.max_connections:
            return _Refused(self)
        handler = self.inner()
        # aiohttp builds its handler itself: switched to a subclass that only overrides
        # methods, whose errors are JSON (gateway/malformed_http.py).
        handler.__class__ = self._handler_class
        return _Guarded(self, handler)

    def state_of(self, transport: asyncio.BaseTransport | None) -> ConnectionState | None:
        return self.states.get(transport) if transport is not None else None


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted, and closed once idle too long."""

    __slots__ = ("guard", "inner", "state", "transport", "timer")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol):
        self.guard = guard
        self.inner = inner
        self.state = ConnectionState()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.guard.states[transport] = self.state
        self.timer = asyncio.get_running_loop().call_later(self.guard.idle_timeout_s,
                                                           self._check)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.states.pop(self.transport, None)
        if self.timer is not None:
            self.timer.cancel()
        self.inner.connection_lost(exc)

    def _check(self) -> None:
        state = self.state
        if state.started or state.handling:
            state.started = False
            self.timer = asyncio.get_running_loop().call_later(self.guard.idle_timeout_s,
                                                               self._check)
            return
        self.timer = None
        self.guard.idle_closed += 1
        transport = self.transport
        log.debug("closing a connection that started no request in %.1f s",
                  self.guard.idle_timeout_s)
        if transport is not None:
            # What is still buffered for a client that does not read would keep a graceful
            # close waiting on it.
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()


class _Refused(asyncio.Protocol):
    """A connection past the limit: its 503, then closed. Whatever it sends is read and
    dropped until it closes its side (or :data:`REFUSED_LINGER_S` passes), so that its
    request arriving on a closed socket cannot reset the connection before the client has
    read the 503; past :data:`MAX_LINGERING` of them at once, closed at once."""

    def __init__(self, guard: ConnectionGuard):
        self.guard = guard
        self.linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        guard = self.guard
        guard.refused += 1
        transport.write(guard.refusal)
        if guard.lingering >= guard.max_lingering:
            transport.close()  # after the 503 is written
            return
        guard.lingering += 1
        if transport.can_write_eof():
            transport.write_eof()
        self.linger = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client closed its side: the transport closes ours

    def connection_lost(self, exc: Exception | None) -> None:
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
            self.guard.lingering -= 1
