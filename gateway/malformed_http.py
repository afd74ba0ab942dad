"""What a client gets for bytes that are not an HTTP/1.1 request, and what the log gets.

aiohttp answers a request it cannot parse (a bad request line, a header past 8,190 bytes,
TLS or HTTP/2 on this plain HTTP/1.1 port) from its own ``RequestHandler.handle_error``,
around the app and its middlewares: a plain-text body with the parser's internals in it, a
``Server`` header naming the Python and aiohttp versions, and a traceback logged at ERROR for
every one. Any client could fill the log at the rate it sends garbage. And a framing error in
a chunked body that arrives after its head (``zz`` as a chunk size) never reaches the handler
reading that body: aiohttp queues it as the next request, so the body waited out its deadline
and answered 504 "the body did not arrive", then the queued 400 followed.

:func:`json_errors` gives the guard a handler class whose errors have the JSON shape of every
route, at the status that says what went wrong (431 for a head too large), with one WARNING
a minute at most in the log (each at DEBUG), and whose framing errors fail the body in flight
at once. ``connections_closed_total{reason="malformed"}`` counts them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from gateway.answer_shape import ANSWER_HEADERS, error_body
from protocol.errors import BatchwireError, HeadTooLarge, MalformedRequest
from protocol.logs import Throttled

if TYPE_CHECKING:
    from gateway.connections import ConnectionGuard

log = logging.getLogger("batchwire.gateway.http")

#: At most one WARNING per this many seconds about malformed requests; the rest at DEBUG.
WARN_EVERY_S = 60.0


def error_for(exc: BaseException | None) -> BatchwireError:
    """What to tell the client whose request failed to parse with ``exc``: what was wrong,
    and what to send instead."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "8190"
        return HeadTooLarge(f"a line of the request head (its request line or a header) is "
                            f"longer than the {limit} bytes this server reads; send long "
                            "inputs in the body, not the URL or headers")
    why = reason(exc)
    if "Too many headers" in why:
        return HeadTooLarge("the request has more headers than this server reads; send fewer")
    if "HTTPS traffic" in why:
        return MalformedRequest("TLS arrived on this plain HTTP port: use http://, not https://")
    if "PRI/Upgrade" in why:
        return MalformedRequest("this server speaks HTTP/1.1; HTTP/2 with prior knowledge (h2c) "
                                "is not supported: send HTTP/1.1")
    return MalformedRequest(f"the request is not valid HTTP/1.1 ({why or 'unparsable'}); "
                            "check the request line, the headers, and the body's framing "
                            "(Content-Length, or chunked encoding)")


def reason(exc: BaseException | None) -> str:
    """An HTTP parser error's reason, without the bytes it quotes after it."""
    if not isinstance(exc, HttpProcessingError) and isinstance(
            getattr(exc, "__cause__", None), HttpProcessingError):
        exc = exc.__cause__  # aiohttp's RequestPayloadError, around the parser's error
    if isinstance(exc, HttpProcessingError):
        text = exc.message or ""
    else:
        text = str(exc or "")
    return text.split("\n", 1)[0].rstrip(": ").strip()


def body_error(exc: BaseException) -> MalformedRequest:
    """What to tell the client whose body failed to read with ``exc``: its framing. (Its
    compression is gateway/body_coding.py's to check.)"""
    why = reason(exc)
    return MalformedRequest(f"the body's framing is broken ({why}); check its Content-Length "
                            "or chunked encoding")


class MalformedLog:
    """One WARNING per :data:`WARN_EVERY_S` about malformed requests, with how many came
    since the last, so that a misconfigured client (https:// to this port) shows in the log,
    and a client sending garbage on purpose cannot fill it."""

    def __init__(self) -> None:
        self.count = 0
        self._warn = Throttled(log, logging.WARNING, WARN_EVERY_S)

    def note(self, remote: str | None, error: BatchwireError, exc: BaseException | None) -> None:
        self.count += 1
        log.debug("malformed request from %s: %s", remote, error.message, exc_info=exc)
        self._warn("answered a request that was not valid HTTP, from %s, with %d: %s; its "
                   "connection closed (each such request is logged at DEBUG)", remote,
                   error.status, error.message)


class _JsonErrorsHandler(RequestHandler):
    """aiohttp's connection handler, with the gateway's answers to requests it cannot parse.
    Subclassed per guard (:func:`json_errors`), which it reads as a class attribute: the
    handler aiohttp makes is switched to this class, so it may add no slots."""

    __slots__ = ()
    guard: "ConnectionGuard"

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of an answer is out: the connection is broken, as in aiohttp's own.
            raise ConnectionError("an answer was partly sent before its request failed")
        if status >= 500:
            # Only a bug gets here (the error middleware answers every handler's exception):
            # its traceback goes to the log, not to the client.
            log.error("unhandled error on a request from %s", request.remote, exc_info=exc)
            error = BatchwireError("internal server error; see the server log")
        else:
            error = error_for(exc)
            self.guard.malformed.note(request.remote, error, exc)
        response = web.Response(body=error_body(error), status=error.status,
                                content_type="application/json",
                                headers=ANSWER_HEADERS)
        response.force_close()
        return response

    def data_received(self, data: bytes) -> None:
        request = self._current_request
        queued = len(self._messages)
        super().data_received(data)
        if request is None or len(self._messages) <= queued:
            return
        # A parse error arriving while a request's body is read is queued by aiohttp as the
        # next request; the body would wait for more data until its deadline. Fail it now.
        exc = getattr(self._messages[-1][0], "exc", None)
        if isinstance(exc, HttpProcessingError) and not request.content.is_eof():
            request.content.set_exception(exc)

    def log_exception(self, *args, **kw) -> None:
        # aiohttp reads what is left of a body its handler refused; a body that failed to
        # parse fails that read again, and aiohttp logs it as unhandled. It was answered.
        exc = kw.get("exc_info")
        if isinstance(exc, (HttpProcessingError, web.RequestPayloadError)):
            log.debug("a malformed body after its answer", exc_info=exc)
            return
        super().log_exception(*args, **kw)


def json_errors(guard: "ConnectionGuard") -> type[RequestHandler]:
    """The handler class the guard switches aiohttp's handlers to."""
    return type("JsonErrorsHandler", (_JsonErrorsHandler,), {"__slots__": (), "guard": guard})
