"""HTTP routes of the gateway (aiohttp). The light work: parse, admit, await, encode.

Routes: ``POST /`` (the guide's raw-text form), ``POST /predict`` (JSON or msgpack),
``POST /v1/embeddings`` and ``GET /v1/models`` (OpenAI-compatible), ``GET /health``,
``GET /ready``, ``GET /info``, ``GET /metrics`` (Prometheus), ``GET /openapi.json``. Every
error leaves through :func:`error_middleware` as JSON ``{"error": {"code", "message"}}``
with the status :mod:`protocol.errors` gives it.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import itertools
import logging
import math
import os
import re
import time
import traceback
from typing import Any, Awaitable, TypeVar

import orjson
from aiohttp import HttpVersion11, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from gateway import body_coding, kserve
from gateway.answer_shape import ANSWER_HEADERS, error_payload
from gateway.api_keys import ApiKeys
from gateway.broker import CLIENT_GONE, LIST_ITEM_FAILED, Broker, PendingRequest
from gateway.config import GatewayConfig
from gateway.connections import ConnectionGuard, ConnectionState
from gateway.cors import Cors
from gateway.encoding import dump_json, json_pieces, msgpack_pieces
from gateway.held_memory import Claim
from gateway.malformed_http import body_error
from gateway.metrics import GatewayMetrics
from protocol import codec, eventloop
from protocol.errors import (
    AnswerTooLarge,
    BadInput,
    BatchwireError,
    BodyTooLarge,
    DeadlineExceeded,
    InputTooLong,
    MethodNotAllowed,
    ModelError,
    NotFound,
    Unauthorized,
    UnsupportedMediaType,
    WorkerCrashed,
)
from protocol.messages import MAX_PROMPT_NAME, PROTOCOL_VERSION, NDArray, Result
from protocol.version import package_version

log = logging.getLogger("batchwire.gateway")
T = TypeVar("T")

BROKER = web.AppKey("broker", Broker)
CONFIG = web.AppKey("config", GatewayConfig)
API_KEYS = web.AppKey("api_keys", ApiKeys)
#: Set with --cors-origins only.
CORS = web.AppKey("cors", Cors)
STARTED = web.AppKey("started", float)
#: The listening socket's protocol factory (gateway/connections.py); server.py listens with it.
CONNECTIONS = web.AppKey("connections", ConnectionGuard)
# Typed request/response storage keys where aiohttp has them (3.13+), plain strings before.
REQUEST_ID = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"
ERROR_CODE = web.ResponseKey("error_code", str) if hasattr(web, "ResponseKey") else "error_code"
#: The request's account in the held-memory budget, given back when its handler is done.
CLAIM = web.RequestKey("held_claim", Claim) if hasattr(web, "RequestKey") else "held_claim"

#: Bodies POST / reads as the input text itself, as the guide's server does. curl -d sends
#: application/x-www-form-urlencoded, so that is text here too.
TEXT_TYPES = frozenset({
    "text/plain", "application/x-www-form-urlencoded", "application/octet-stream", "",
})
JSON_TYPE = "application/json"
MSGPACK_TYPE = "application/msgpack"
#: Routes that answer without an API key: probes must work for orchestrators.
OPEN_ROUTES = frozenset({"/health", "/ready", "/v2/health/live", "/v2/health/ready"})
#: Routes polled by machines (orchestrators' probes, the metrics scraper): their successful
#: answers go to the access log at DEBUG. Two probes every 10 s and a scrape every 15 s made
#: most of a quiet gateway's log, burying the requests; a failed probe is still at INFO.
POLLED_ROUTES = OPEN_ROUTES | {"/metrics"}
#: Parameter names the gateway and worker use among themselves; clients may not send them.
RESERVED_PARAMETER_PREFIX = "batchwire:"
METRICS = web.AppKey("metrics", GatewayMetrics)
#: The local worker supervisor under `batchwire serve` (None for `batchwire gateway`).
SUPERVISOR = web.AppKey("supervisor", object)
_MAX_REQUEST_ID = 128
#: version-trace id-parent id-flags, lowercase hex (W3C Trace Context); version ff is invalid.
_TRACEPARENT = re.compile(r"^(?!ff)[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?$")
# Ids the gateway mints: a random per-process prefix and a counter, the shape of a uuid4 hex
# (32 hex digits) without its urandom call and UUID object on every request. Unique within
# the process; the prefix keeps them apart across restarts and gateways.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


# -- encoding ---------------------------------------------------------------------------
#: Answers that hold this much (gateway/held_memory.py) are written a piece at a time.
STREAM_ABOVE_BYTES = 1 << 20
#: Encoded bytes gathered before each write of a streamed answer.
PIECE_WRITE_BYTES = 1 << 20
#: Transports (asyncio's and uvloop's) buffer up to this much without making the writer
#: wait for the client: an answer written whole that is larger is a :class:`HeldAnswer`.
WRITTEN_AT_ONCE_BYTES = 1 << 16


def json_response(payload: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=dump_json(payload), status=status, headers=headers,
                        content_type=JSON_TYPE)


#: What an Accept header may call msgpack, and what it may call JSON (for its q-value).
MSGPACK_ACCEPTED = frozenset({MSGPACK_TYPE, "application/x-msgpack", "application/vnd.msgpack"})
JSON_ACCEPTED = frozenset({JSON_TYPE, "application/*", "*/*"})


def wants_msgpack(request: web.Request) -> bool:
    """Whether the client's Accept prefers msgpack to JSON: named with a q-value above 0
    and at least JSON's (a tie goes to msgpack, the type it named). Case and parameters as
    HTTP has them: "application/msgpack;q=0" refuses it, and q-values rank the two (only
    the header's mention of msgpack was looked for, so q=0 got msgpack, and "Application/
    MsgPack" JSON)."""
    accept = ",".join(request.headers.getall("Accept", ())).lower()
    if "msgpack" not in accept:
        return False
    msgpack_q = json_q = 0.0
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        if media in MSGPACK_ACCEPTED:
            msgpack_q = max(msgpack_q, q)
        elif media in JSON_ACCEPTED:
            json_q = max(json_q, q)
    return msgpack_q > 0 and msgpack_q >= json_q


async def answer_response(request: web.Request, payload: Any, headers: dict,
                          stream: tuple = (), json_only: bool = False) -> web.StreamResponse:
    """The answer, JSON or msgpack as the client's Accept asks. Answers holding more than
    :data:`STREAM_ABOVE_BYTES` are written a piece at a time (chunked), letting the event
    loop run between pieces and each item go once written. ``stream``: the keys down to the
    answer's list of items (see :func:`gateway.encoding.json_pieces`), which it empties.
    ``json_only``: JSON whatever the client's Accept says (KServe v2); msgpack keeps arrays
    as raw bytes."""
    claim = request.get(CLAIM)
    as_msgpack = not json_only and wants_msgpack(request)
    if not json_only:
        # The answer's format follows Accept: a cache must not hand one client's to another.
        headers = {**headers, "Vary": "Accept"}
    content_type = MSGPACK_TYPE if as_msgpack else JSON_TYPE
    if claim is None or claim.answers < STREAM_ABOVE_BYTES:
        body = codec.encode_client(payload) if as_msgpack else dump_json(payload)
        if claim is None or len(body) <= WRITTEN_AT_ONCE_BYTES:
            return web.Response(body=body, headers=headers, content_type=content_type)
        del request[CLAIM]  # the response gives it back once written
        return HeldAnswer(request, claim, body, headers, content_type)
    pieces = msgpack_pieces(payload, stream) if as_msgpack else json_pieces(payload, stream)
    response = web.StreamResponse(headers=headers)
    response.content_type = content_type
    await response.prepare(request)
    # A client that stops reading would hold its answers, and their share of the held-memory
    # budget, for as long as it keeps the connection: once it has taken nothing of what
    # waits for it for the request's own deadline, the connection is dropped.
    stall_s = _timeout_s(request)
    buffered: list[bytes] = []
    size = 0
    for piece in pieces:
        buffered.append(piece)
        size += len(piece)
        if size >= PIECE_WRITE_BYTES:
            if not await _write_within(request, response, b"".join(buffered), stall_s):
                return response  # dropped: aiohttp finds the connection closed, quietly
            buffered.clear()
            size = 0
            # write() returns without yielding while the client keeps up: yield here, or
            # the whole answer would be encoded in one stretch of the loop after all.
            await asyncio.sleep(0)
    await _write_within(request, response, b"".join(buffered), stall_s, eof=True)
    return response


async def _write_within(request: web.Request, response: web.StreamResponse, data: bytes,
                        stall_s: float, eof: bool = False) -> bool:
    """Write, or drop the client if it takes none of what waits for it for ``stall_s``
    (False)."""
    write = response.write_eof(data) if eof else response.write(data)
    if not await _taken_steadily(write, request.transport, stall_s):
        _drop_stalled(request[REQUEST_ID], request.transport, stall_s)
        return False
    return True


async def _taken_steadily(write: Awaitable[None], transport: asyncio.BaseTransport | None,
                          stall_s: float) -> bool:
    """Await ``write``; False as soon as the client has taken nothing of what is buffered
    for it for ``stall_s``. A client that keeps reading, however slowly, is not dropped:
    with the deadline on a whole 1 MiB piece, one reading 160 kB/s steadily was cut off
    mid-answer at X-Timeout-Ms 4000 (and any client slower than 35 kB/s at the default)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(write)
    try:
        left, progressed = None, loop.time()
        while True:
            done, _ = await asyncio.wait({task}, timeout=max(min(stall_s / 4, 1.0), 0.01))
            if done:
                task.result()
                return True
            waiting = transport.get_write_buffer_size() if transport is not None else 0
            now = loop.time()
            if left is None or waiting < left:
                progressed = now
            left = waiting
            if now - progressed >= stall_s:
                return False
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif not task.cancelled():
            # Failed as the handler was cancelled (the client left mid-answer): retrieved
            # here, or asyncio logs it as an ERROR with a traceback, one per dropped answer.
            task.exception()


async def _within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """``awaitable``, or asyncio.TimeoutError after ``timeout_s``. asyncio.timeout where there
    is one (3.11): wait_for's own task could swallow the handler's cancellation when a client
    disconnects, and the disconnect would then reach aiohttp as an error to log."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout_s):
            return await awaitable
    return await asyncio.wait_for(awaitable, timeout_s)


def _drop_stalled(request_id: str, transport: asyncio.BaseTransport | None,
                  stall_s: float) -> None:
    log.warning("request %s: the client did not take its answer within %.1f s; dropping the "
                "connection", request_id, stall_s)
    if transport is not None:
        transport.abort()  # and with it what is buffered for the client


class HeldAnswer(web.Response):
    """An answer written whole, too large for the socket to be sure to take at once.

    aiohttp writes a handler's response after the handler has returned, with no time limit:
    a client that never reads would keep such an answer in the gateway for as long as it
    kept the connection, after its claim in the held-memory budget was given back. So this
    answer keeps the claim until it is written, and a client that takes nothing of it for
    the request's own deadline is dropped, as a streamed answer's is. Until then its
    connection counts as handling a request, so the guard does not close it as idle."""

    _claim: Claim | None = None
    _connection: ConnectionState | None = None

    def __init__(self, request: web.Request, claim: Claim, body: bytes, headers: dict,
                 content_type: str):
        super().__init__(body=body, headers=headers, content_type=content_type)
        self._claim = claim
        self._stall_s = _timeout_s(request)
        self._request_id = request[REQUEST_ID]
        self._transport = request.transport
        self._connection = _connection(request)
        if self._connection is not None:
            self._connection.handling += 1

    async def write_eof(self, data: bytes = b"") -> None:
        try:
            if not await _taken_steadily(super().write_eof(data), self._transport,
                                         self._stall_s):
                _drop_stalled(self._request_id, self._transport, self._stall_s)
        finally:
            self._let_go()

    def _let_go(self) -> None:
        claim, self._claim = self._claim, None
        if claim is None:
            return
        claim.release()
        if self._connection is not None:
            self._connection.handling -= 1

    def __del__(self) -> None:
        # Never written (the connection went before aiohttp wrote it): give it back anyway.
        self._let_go()


def error_response(request: web.Request, error: BatchwireError, status: int | None = None,
                   debug_trace: str | None = None) -> web.Response:
    headers = {"X-Request-Id": request.get(REQUEST_ID, "")}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    response = json_response(error_payload(error, debug_trace), status=status or error.status,
                             headers=headers)
    if error.closes_connection:
        response.force_close()
    response[ERROR_CODE] = error.metrics_code  # read by the metrics middleware
    return response


# -- middleware -------------------------------------------------------------------------
def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    if 0 < len(given) <= _MAX_REQUEST_ID and given.isprintable() and given.isascii():
        return given
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def _connection(request: web.Request) -> ConnectionState | None:
    """What the connection guard knows of this request's connection; None for one no guard
    opened (an app served without ConnectionGuard.listen)."""
    guard = request.app.get(CONNECTIONS)
    return guard.state_of(request.transport) if guard is not None else None


def _check_api_key(request: web.Request) -> None:
    keys = request.app[API_KEYS]
    if not keys.required or request.path in OPEN_ROUTES:
        return
    if not keys.accepts(request.headers.get("Authorization", "")):
        raise Unauthorized("missing or wrong API key; send 'Authorization: Bearer <key>'")


#: The status a request is counted under when its client left before the answer (no answer
#: is sent): nginx's "client closed request".
CLIENT_CLOSED_REQUEST = 499


@web.middleware
async def metrics_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Outermost: counts every answer, errors included, by route template (not raw path,
    which would let clients mint unbounded label values)."""
    started = time.monotonic()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        # The client left first (aiohttp cancels its handler). Counted, as 499 after nginx's
        # "client closed request", so that requests by status add up to what came in.
        request.app[METRICS].observe_response(route, CLIENT_CLOSED_REQUEST,
                                              time.monotonic() - started, "cancelled")
        raise
    request.app[METRICS].observe_response(route, response.status, time.monotonic() - started,
                                          response.get(ERROR_CODE))
    return response


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    request[REQUEST_ID] = _request_id(request)
    connection = _connection(request)  # not idle while a request is handled
    if connection is not None:
        connection.started = True
        connection.handling += 1
    try:
        cors = request.app.get(CORS)
        if cors is not None and cors.is_preflight(request):
            return cors.answer_preflight(request)  # browsers send it without the API key
        _check_api_key(request)
        return await handler(request)
    except BatchwireError as exc:
        return error_response(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        mapped: BatchwireError
        if exc.status == 404:
            mapped = NotFound(f"no route {request.method} {request.path}; see GET /openapi.json "
                              "for every route")
        elif exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            mapped = MethodNotAllowed(f"{request.method} is not allowed on {request.path}; "
                                      f"use {allowed or 'another method'}")
        elif exc.status == 413:
            mapped = BodyTooLarge(f"the body is larger than the {request.app[CONFIG].max_body_bytes}"
                                  " bytes this server accepts")
        else:
            mapped = BadInput(exc.reason)
        response = error_response(request, mapped, status=exc.status)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:  # noqa: BLE001 - the client gets a clean 500, the log the details
        log.exception("internal error on %s %s (request %s)", request.method, request.path,
                      request[REQUEST_ID])
        error = BatchwireError(f"internal server error; see the server log for request "
                               f"{request[REQUEST_ID]}")
        trace = traceback.format_exc() if request.app[CONFIG].debug else None
        return error_response(request, error, debug_trace=trace)
    finally:
        # Answered, streamed out, or failed: the answers are the response's now, or gone.
        # (A HeldAnswer took the claim over, and gives it back once written.)
        claim = request.get(CLAIM)
        if claim is not None:
            claim.release()
        if connection is not None:
            connection.handling -= 1


# -- request parsing ----------------------------------------------------------------------
async def _read_body(request: web.Request) -> bytes:
    """The body, counted in the held-memory budget before it is read (a chunked one at the
    most it may be, until it is read), so that a flood of large bodies is refused with 503
    instead of read (gateway/held_memory.py). One still arriving gets the request's deadline
    to arrive in, or 504: a client sending it a byte at a time would otherwise hold its
    connection and its share of the budget for as long as it liked."""
    limit = request.app[CONFIG].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"the body is {request.content_length} bytes; this server accepts "
                           f"at most {limit} (--max-body-bytes)")
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    body_coding.check_coding(coding)
    claim = _claim(request)
    reserved = limit if request.content_length is None else request.content_length
    claim.hold_body(reserved)
    await _send_continue(request)
    timeout_s = 0.0
    try:
        if request.content.is_eof():  # all here already: nothing to wait for
            body = await request.read()
        else:
            timeout_s = _timeout_s(request)
            # aiohttp enforces client_max_size on chunked bodies
            body = await _within(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise DeadlineExceeded(
            f"the body did not arrive within the request's deadline ({timeout_s:g} s, "
            "X-Timeout-Ms or --timeout-ms); send it faster, or allow more time") from None
    except (web.RequestPayloadError, HttpProcessingError) as exc:
        # Chunked framing that broke (gateway/malformed_http.py fails it at once): the
        # client's, not a 500.
        raise body_error(exc) from None
    if getattr(request.content, "total_compressed_bytes", None) is None:  # not inflated yet
        body = body_coding.decode(body, coding, limit)
    claim.body_read(reserved, len(body))
    return body


async def expect_later(request: web.Request) -> None:
    """Every route's ``expect_handler``: nothing at the head. aiohttp's default answers
    ``Expect: 100-continue`` with 100 Continue before the handler runs, so a client that
    asked (curl does, for bodies over 1 MiB) sent its body even when it was about to be
    refused (413, 503) unread. :func:`_read_body` sends the 100 once the body is to be read;
    a request refused first, or one that reads no body, gets its final answer instead, and
    its client never sends the body. (An expectation other than 100-continue is ignored,
    as RFC 9110 allows, instead of aiohttp's plain-text 417.)"""
    return None


async def _send_continue(request: web.Request) -> None:
    if (request.version == HttpVersion11 and not request.content.is_eof()
            and request.headers.get("Expect", "").lower() == "100-continue"):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response's own size starts after it


def _claim(request: web.Request) -> Claim:
    """The request's account in the held-memory budget, opened on first use."""
    claim = request.get(CLAIM)
    if claim is None:
        claim = request[CLAIM] = request.app[BROKER].memory.claim()
    return claim


def _text_input(body: bytes, charset: str | None = None) -> str:
    """The raw body as text, in the charset its Content-Type declares (UTF-8 when none)."""
    encoding = charset or "utf-8"
    try:
        text = body.decode(encoding)
    except LookupError:  # unknown, or not a text encoding ("zlib")
        raise UnsupportedMediaType(f"unknown charset {charset!r} in Content-Type; send UTF-8 "
                                   "text, or declare a text charset") from None
    except UnicodeDecodeError as exc:
        raise BadInput(f"the body is not valid {encoding if charset else 'UTF-8'} "
                       f"(byte {exc.start}); send text in the charset its Content-Type "
                       "declares, UTF-8 when it declares none") from None
    except UnicodeError as exc:  # a codec that decodes nothing ("undefined")
        raise UnsupportedMediaType(f"charset {charset!r} in Content-Type does not decode text "
                                   f"({exc}); send UTF-8 text") from None
    if charset and codecs.lookup(encoding).name != "utf-8":
        # Some codecs (utf-7, unicode_escape) decode to lone surrogates, which are not text:
        # no model input can hold them, and no message to a worker either.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadInput(f"the body, decoded as {charset}, holds a lone surrogate at "
                           f"character {exc.start}, which is not Unicode text; send UTF-8 "
                           "text") from None
    if not text.strip():
        raise BadInput("the body is empty; send the text to run the model on, "
                       'e.g. curl -X POST -d "test [MASK]" http://localhost:8000/')
    return text


def load_json_body(body: bytes, example: str) -> Any:
    """A JSON body, or a 400 that shows ``example`` when it is empty."""
    if not body.strip():
        raise BadInput(f"the body is empty; send {example}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            # orjson says "str is not valid UTF-8: surrogates not allowed" for a 0xff byte.
            raise BadInput(f"the body is not valid UTF-8 (byte {bad.start}); JSON is UTF-8 "
                           "text") from None
        raise BadInput(f"the body is not valid JSON: {exc}") from None


def _structured_payload(body: bytes, content_type: str, config: GatewayConfig) -> tuple[Any, dict]:
    """``{"inputs", "parameters"}`` from a JSON or msgpack body, validated."""
    example = '{"inputs": "...", "parameters": {...}}'
    if content_type == MSGPACK_TYPE:
        if not body.strip():
            raise BadInput(f"the body is empty; send {example}")
        try:
            payload = codec.decode_client(body, config.max_body_bytes)
        except ValueError as exc:
            raise BadInput(f"the body is not valid msgpack: {exc}") from None
    else:
        payload = load_json_body(body, example)
    if not isinstance(payload, dict):
        raise BadInput('the body must be a JSON object like {"inputs": "...", "parameters": {}}')
    unknown = sorted(set(payload) - {"inputs", "parameters"})
    if unknown:
        raise BadInput(f"unknown field(s) {unknown}; the body takes 'inputs' and 'parameters'")
    if "inputs" not in payload:
        raise BadInput('the body needs "inputs": a string, an object, or a list of them')
    inputs = payload["inputs"]
    parameters = payload.get("parameters")
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, dict):
        raise BadInput(f'"parameters" must be a JSON object of pipeline arguments, not '
                       f"{json_type(parameters)}")
    reserved = sorted(k for k in parameters if k.startswith(RESERVED_PARAMETER_PREFIX))
    if reserved:
        raise BadInput(f"parameter names starting with {RESERVED_PARAMETER_PREFIX!r} are "
                       f"reserved: {reserved}")
    items = inputs if isinstance(inputs, list) else [inputs]
    if not items:
        raise BadInput('"inputs" is an empty list; send at least one input')
    if len(items) > config.max_inputs:
        raise BadInput(f'"inputs" holds {len(items)} items; this server takes at most '
                       f"{config.max_inputs} per request (--max-inputs)")
    for i, item in enumerate(items):
        where = f'"inputs"[{i}]' if isinstance(inputs, list) else '"inputs"'
        if isinstance(item, str):
            if not item.strip():
                raise BadInput(f"{where} is an empty string; send text to run the model on")
        elif not isinstance(item, dict):
            raise BadInput(f"{where} must be a string or an object, not {json_type(item)}")
    return inputs, parameters


def json_type(value: Any) -> str:
    """How a client would name this JSON value's type, for error messages."""
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(value),
                                                                        type(value).__name__)


def _timeout_s(request: web.Request) -> float:
    raw = request.headers.get("X-Timeout-Ms")
    if raw is None:
        return request.app[CONFIG].timeout_ms / 1000.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise BadInput(f"X-Timeout-Ms must be a positive number of milliseconds, got {raw!r}")
    return value / 1000.0


# -- inference ----------------------------------------------------------------------------
#: Failures that belong to one item of a list, so a list's answer says which one.
ITEM_ERRORS = (BadInput, InputTooLong, AnswerTooLarge, ModelError, WorkerCrashed)


async def _run(request: web.Request, items: list, parameters: dict, embed: bool = False,
               where: str = '"inputs"', prompt_name: str = "",
               ) -> tuple[list[Result], dict[str, str]]:
    """Admit the items, await every result, and build the timing headers. ``where``: how the
    client's body names the items, for an error that belongs to one of several."""
    started = time.monotonic()
    broker = request.app[BROKER]
    claim = _claim(request)
    pendings = broker.submit_many(items, parameters, _timeout_s(request), embed=embed,
                                  prompt_name=prompt_name, claim=claim)
    try:
        results: list[Result] = await asyncio.gather(*(p.future for p in pendings))
    except BaseException as exc:
        # The client left (CancelledError) or one item failed: nobody wants the others.
        reason = CLIENT_GONE if isinstance(exc, asyncio.CancelledError) else LIST_ITEM_FAILED
        for pending in pendings:
            broker.cancel(pending, reason)
        if len(pendings) > 1 and isinstance(exc, ITEM_ERRORS):
            index = next((i for i, p in enumerate(pendings) if p.future.done()
                          and not p.future.cancelled() and p.future.exception() is exc), None)
            if index is not None:
                raise type(exc)(f"{where}[{index}]: {exc.message}") from None
        raise
    total_ms = (time.monotonic() - started) * 1000.0
    batch = max(r.batch_size for r in results)
    batch_tokens = max(r.batch_tokens for r in results)
    queue_ms = max(r.queue_ms for r in results)
    inference_ms = max(r.inference_ms for r in results)
    headers = {
        "X-Request-Id": request[REQUEST_ID],
        "X-Batch-Size": str(batch),
        "X-Batch-Tokens": str(batch_tokens),
        "X-Queue-Time-Ms": f"{queue_ms:.3f}",
        "X-Inference-Time-Ms": f"{inference_ms:.3f}",
        "Server-Timing": f"queue;dur={queue_ms:.3f}, inference;dur={inference_ms:.3f}, "
                         f"total;dur={total_ms:.3f}",
    }
    return results, headers


async def _infer(request: web.Request, inputs: Any, parameters: dict) -> web.Response:
    single = not isinstance(inputs, list)
    results, headers = await _run(request, [inputs] if single else inputs, parameters)
    payload = results[0].output if single else [r.output for r in results]
    del results  # the payload is all that holds the answers now, and it lets them go
    return await answer_response(request, payload, headers)


async def handle_root(request: web.Request) -> web.Response:
    body = await _read_body(request)
    if request.content_type in (JSON_TYPE, MSGPACK_TYPE):
        inputs, parameters = _structured_payload(body, request.content_type, request.app[CONFIG])
    elif request.content_type in TEXT_TYPES:
        inputs, parameters = _text_input(body, request.charset), {}
    else:
        raise UnsupportedMediaType(
            f"POST / reads text/plain (the raw text), application/json or application/msgpack, "
            f"not {request.content_type}")
    return await _infer(request, inputs, parameters)


async def handle_predict(request: web.Request) -> web.Response:
    body = await _read_body(request)
    if request.content_type not in (JSON_TYPE, MSGPACK_TYPE, "application/octet-stream", ""):
        raise UnsupportedMediaType(f"POST /predict reads application/json or application/msgpack,"
                                   f" not {request.content_type}")
    inputs, parameters = _structured_payload(body, request.content_type, request.app[CONFIG])
    return await _infer(request, inputs, parameters)


#: What a /v1/embeddings body may hold: OpenAI's fields, and sentence-transformers'
#: prompt_name (as Hugging Face's text-embeddings-inference takes it), which the OpenAI
#: client sends with extra_body.
EMBEDDINGS_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user",
                               "prompt_name"})


async def handle_embeddings(request: web.Request) -> web.Response:
    """OpenAI-compatible ``POST /v1/embeddings`` with the pooling the model declares."""
    body = await _read_body(request)
    if request.content_type not in (JSON_TYPE, "application/octet-stream", ""):
        raise UnsupportedMediaType(f"POST /v1/embeddings reads application/json, not "
                                   f"{request.content_type}")
    payload = load_json_body(body, '{"input": "text" or ["text", ...]}')
    if not isinstance(payload, dict) or "input" not in payload:
        raise BadInput('the body must be a JSON object with "input": a string or a list of them')
    unknown = sorted(set(payload) - EMBEDDINGS_FIELDS)
    if unknown:
        raise BadInput(f"unknown field(s) {unknown}; /v1/embeddings takes "
                       f"{', '.join(sorted(EMBEDDINGS_FIELDS))}")
    for name in ("model", "user", "prompt_name"):
        if name in payload and not isinstance(payload[name], (str, type(None))):
            raise BadInput(f'"{name}" must be a string, not {json_type(payload[name])}')
    # The official OpenAI Python client asks for base64 unless its caller names a format.
    encoding = payload.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if not isinstance(encoding, str) or encoding not in ("float", "base64"):
        raise BadInput(f'"encoding_format" must be "float" or "base64", not {encoding!r}')
    dimensions = payload.get("dimensions")
    if dimensions is not None and not (_is_token_id(dimensions) and dimensions >= 1):
        got = (dimensions if isinstance(dimensions, (int, float))
               and not isinstance(dimensions, bool) else json_type(dimensions))
        raise BadInput(f'"dimensions" must be a whole number of at least 1, not {got}')
    texts = payload["input"]
    items = texts if isinstance(texts, list) else [texts]
    config = request.app[CONFIG]
    if items and all(_is_token_id(t) or (isinstance(t, list) and t and all(
            _is_token_id(i) for i in t)) for t in items):
        # OpenAI's API also takes token ids; clients that count with tiktoken send them
        # (LangChain's OpenAIEmbeddings does by default). They are not this model's ids.
        raise BadInput('"input" holds token ids; this server embeds text only, and ids from '
                       "another tokenizer (tiktoken's) are not its model's tokens: send the "
                       "text (LangChain's OpenAIEmbeddings: check_embedding_ctx_length=False)")
    if not items or not all(isinstance(t, str) and t.strip() for t in items):
        raise BadInput('"input" must be text or a non-empty list of texts, each with more '
                       "than whitespace in it")
    if len(items) > config.max_embedding_inputs:
        raise BadInput(f'"input" holds {len(items)} items; this server takes at most '
                       f"{config.max_embedding_inputs} per request (--max-embedding-inputs)")
    broker = request.app[BROKER]
    worker = next(iter(broker.workers.values()), None)
    if worker is not None and not worker.info.pooling:
        raise BadInput(f"this server runs a {worker.info.task} model, which has no sentence "
                       "embeddings; /v1/embeddings needs a feature-extraction model")
    prompt_name = payload.get("prompt_name") or ""
    if len(prompt_name) > MAX_PROMPT_NAME:
        raise BadInput(f'"prompt_name" is {len(prompt_name)} characters long; a prompt\'s '
                       f"name is at most {MAX_PROMPT_NAME}")
    results, headers = await _run(request, items, {}, embed=True, where='"input"',
                                  prompt_name=prompt_name)
    tokens = sum(r.tokens for r in results)
    vectors = [r.output for r in results]
    if dimensions is not None:
        vectors = shortened(vectors, dimensions, worker is not None
                            and worker.info.pooling.endswith("+normalize"))
    as_base64 = encoding == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": base64_floats(vector) if as_base64 else vector}
            for i, vector in enumerate(vectors)]
    model = payload.get("model") or (worker.info.model if worker else None)
    body_out = {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    del results, vectors, data
    return await answer_response(request, body_out, headers, stream=("data",))


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _vector(vector: Any) -> Any:
    """An embedding from a worker's answer as a numpy array."""
    import numpy as np

    return vector.to_numpy() if isinstance(vector, NDArray) else np.asarray(vector)


def base64_floats(vector: Any) -> str:
    """An embedding as OpenAI's ``encoding_format: "base64"`` has it: the base64 of its
    little-endian float32 bytes (a float16 model's vector is widened first)."""
    array = _vector(vector)
    return base64.b64encode(array.astype("<f4", copy=False).tobytes()).decode("ascii")


def shortened(vectors: list, dimensions: int, normalized: bool) -> list:
    """Each embedding's first ``dimensions`` values, as OpenAI's ``dimensions`` and
    sentence-transformers' ``truncate_dim`` give them (Matryoshka models are trained for
    it), L2-normalised again when the model's embeddings are normalised, so they stay unit
    vectors (sentence-transformers' ``normalize_embeddings=True``; OpenAI's own)."""
    import numpy as np

    out = []
    for vector in vectors:
        array = _vector(vector)
        if dimensions > array.shape[-1]:
            raise BadInput(f'"dimensions" is {dimensions}, but this model\'s embeddings have '
                           f"{array.shape[-1]}; ask for at most that many")
        cut = array[:dimensions].astype(np.float32)
        if normalized:
            cut /= max(float(np.sqrt(np.dot(cut, cut))), 1e-12)
        out.append(NDArray.from_array(cut))
    return out


def _model_card(request: web.Request, name: str) -> dict:
    # OpenAI's Model object; "created" is when this server started, in Unix seconds.
    started = time.time() - (time.monotonic() - request.app[STARTED])
    return {"id": name, "object": "model", "created": int(started), "owned_by": "batchwire"}


async def handle_models(request: web.Request) -> web.Response:
    """OpenAI-compatible ``GET /v1/models``: the one model this server runs. Clients list
    models before they use one (Open WebUI, LiteLLM's health check, ``openai models list``)."""
    primary, _ = kserve.known_model_names(request)
    return json_response({"object": "list", "data": [_model_card(request, primary)]})


async def handle_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: the model under any name it answers to, else 404."""
    primary, accepted = kserve.known_model_names(request)
    name = request.match_info["name"]
    if name not in accepted:
        raise NotFound(f"unknown model {name!r}; this server runs {primary!r} "
                       "(GET /v1/models)")
    return json_response(_model_card(request, primary))


async def handle_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    return web.Response(body=metrics.scrape(), headers={"Content-Type": metrics.content_type})


async def handle_health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def handle_ready(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    workers = len(broker.workers)
    if broker.draining:
        return json_response({"ready": False, "reason": "draining", "workers": workers},
                             status=503, headers={"Retry-After": "1"})
    if not workers:
        return json_response({"ready": False, "reason": "no_workers", "workers": 0},
                             status=503, headers={"Retry-After": "1"})
    return json_response({"ready": True, "workers": workers})


async def handle_info(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    config = request.app[CONFIG]
    now = time.monotonic()
    workers = [
        {
            "id": w.info.worker_id,
            "pid": w.info.pid,
            "device": w.info.device,
            "dtype": w.info.dtype,
            "model": w.info.model,
            "task": w.info.task,
            "state": broker.worker_state(w),
            "capacity": w.info.capacity,
            "max_batch_size": w.info.max_batch_size,
            "max_batch_tokens": w.info.max_batch_tokens,
            "in_flight": len(w.in_flight),
            "answered": w.answered,
            "skipped": w.skipped,
            "uptime_s": round(now - w.joined_at, 3),
            "host": w.info.host,
            "batches": w.batches,
            "pooling": w.info.pooling,
            "max_seq_length": w.info.max_seq_length,
            "prompts": list(w.info.prompts),
        }
        for w in broker.workers.values()
    ]
    first = next(iter(broker.workers.values()), None)
    return json_response({
        "model": first.info.model if first else None,
        "task": first.info.task if first else None,
        "version": package_version(),
        "protocol_version": PROTOCOL_VERSION,
        "event_loop": eventloop.loop_name(),
        "uptime_s": round(now - request.app[STARTED], 3),
        "queue_depth": broker.queue_depth,
        "in_flight": broker.in_flight,
        "requeued": broker.requeued,
        "deadline_missed": dict(broker.deadline_missed),
        "poison": {"remembered": broker.poison.remembered(broker.clock()),
                   "refused": broker.poison.refused,
                   "suspected": broker.suspected.remembered(broker.clock())},
        "held_bytes": broker.memory.held,
        "connections": request.app[CONNECTIONS].open,
        "api_keys": request.app[API_KEYS].count,
        "zmq_endpoint": broker.endpoint,
        "draining": broker.draining,
        "workers": workers,
        "local_workers": (request.app[SUPERVISOR].describe()
                          if request.app.get(SUPERVISOR) is not None else []),
        "config": {k: ("***" if k == "api_key" and v else v) for k, v in vars(config).items()},
    })


class AccessLogger(AbstractAccessLogger):
    """One line per request: id, route, status, batch size, queue/inference/total times."""

    @property
    def enabled(self) -> bool:
        # aiohttp reads this once per connection; a logger above INFO then costs nothing,
        # not a formatted line per request that is thrown away.
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        headers = response.headers
        fields = {
            "request_id": headers.get("X-Request-Id") or request.get(REQUEST_ID, "-"),
            "remote": request.remote,
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "batch_size": int(headers.get("X-Batch-Size", 0) or 0),
            "queue_ms": float(headers.get("X-Queue-Time-Ms", 0) or 0),
            "inference_ms": float(headers.get("X-Inference-Time-Ms", 0) or 0),
            "total_ms": round(time * 1000.0, 3),
            "bytes": response.body_length,
        }
        # The path is percent-decoded: a client's %0a would start a forged line of its own
        # in a text log (the JSON format escapes it by itself).
        path = fields["path"]
        printable = path if path.isprintable() else path.encode("unicode_escape").decode()
        line = ("%(remote)s %(method)s %(path)s %(status)d %(total_ms).1fms "
                "batch=%(batch_size)d queue=%(queue_ms).1fms inference=%(inference_ms).1fms "
                "id=%(request_id)s" % {**fields, "path": printable})
        trace = trace_id(request.headers.get("traceparent", ""))
        if trace:
            fields["trace_id"] = trace
            line += " trace=" + trace
        polled = request.path in POLLED_ROUTES and response.status < 400
        self.logger.log(logging.DEBUG if polled else logging.INFO, line,
                        extra={"fields": fields})


def trace_id(traceparent: str) -> str | None:
    """The trace id of a W3C ``traceparent`` header (what OpenTelemetry, Envoy and most
    proxies send), so that a log pipeline can join the access log to the trace; None for a
    header that is absent or not one."""
    match = _TRACEPARENT.match(traceparent.strip())
    if match is None or match.group(1) == "0" * 32 or match.group(2) == "0" * 16:
        return None
    return match.group(1)


async def _answer_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(ANSWER_HEADERS)


def runner_settings() -> dict[str, Any]:
    """How the gateway's app is served (``web.AppRunner(app, **runner_settings())``)."""
    return {
        # A client that disconnects cancels its handler, which withdraws the request from
        # the broker and tells the worker to skip it.
        "handler_cancellation": True,
        "access_log_class": AccessLogger,
        "access_log": logging.getLogger("batchwire.access"),
        # Bodies come as sent; _read_body decodes them whole (gateway/body_coding.py).
        "auto_decompress": False,
    }


def create_app(config: GatewayConfig, broker: Broker,
               api_keys: ApiKeys | None = None) -> web.Application:
    """The gateway's app; ``api_keys`` as read from the config's unless given (serve reads
    them before it starts anything, so that a bad keys file stops it first)."""
    # client_max_size bounds chunked bodies too; Content-Length is checked before reading.
    app = web.Application(middlewares=[metrics_middleware, error_middleware],
                          client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[API_KEYS] = api_keys if api_keys is not None else ApiKeys(config.api_key,
                                                                  config.api_keys_file)
    app[BROKER] = broker
    app[METRICS] = broker.metrics
    app[STARTED] = time.monotonic()
    app[CONNECTIONS] = ConnectionGuard(config.max_connections, config.idle_timeout_s)
    broker.metrics.watch_connections(app[CONNECTIONS])
    app.on_response_prepare.append(_answer_headers)
    if config.cors_origins:
        app[CORS] = cors = Cors(config.cors_origins)
        app.on_response_prepare.append(cors.on_prepare)
    app.router.add_post("/", handle_root, expect_handler=expect_later)
    app.router.add_post("/predict", handle_predict, expect_handler=expect_later)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/ready", handle_ready)
    app.router.add_get("/info", handle_info)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_post("/v1/embeddings", handle_embeddings, expect_handler=expect_later)
    app.router.add_get("/v1/models", handle_models)
    # [\s\S]+: a model's full name may be a path or an org/name hub id.
    app.router.add_get("/v1/models/{name:[\\s\\S]+}", handle_model)
    from gateway.openapi import make_openapi_handler  # reads this module's tables

    app.router.add_get("/openapi.json", make_openapi_handler(config))
    # Last: the v2 routes take every method under /v2/ (so a wrong one gets a v2-shaped 405).
    kserve.register(app, model_name=config.model_name)
    return app


__all__ = ["create_app", "PendingRequest"]
