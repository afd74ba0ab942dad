"""Every error batchwire reports, and the one table that maps it to HTTP.

Who raises what::

    BatchwireError                      code              status
    ├── ProtocolError                   protocol_error     500  a peer sent a malformed frame; a client sees it only
    │                                                          from a worker older than the gateway that cannot read its request
    ├── ClientError                                       4xx  the request is wrong; the message says what to fix
    │   ├── BadInput                    bad_input          400  gateway (body) or worker (the pipeline rejects the input)
    │   ├── MalformedRequest            malformed_request  400  gateway: not valid HTTP/1.1
    │   │   ├── HeadTooLarge            head_too_large     431  gateway: a request line or header past aiohttp's limits, or too many headers
    │   │   └── UndecodableBody         malformed_request  400  gateway: a body its Content-Encoding does not decode whole
    │   ├── Unauthorized                unauthorized       401  gateway: --api-key set, bearer token missing or wrong
    │   ├── OriginNotAllowed            origin_not_allowed 403  gateway: a browser's preflight from an origin not in --cors-origins
    │   ├── NotFound                    not_found          404  gateway routing
    │   ├── MethodNotAllowed            method_not_allowed 405  gateway routing
    │   ├── BodyTooLarge                body_too_large     413  gateway, before the body is read in full
    │   ├── UnsupportedMediaType        unsupported_media_type 415 gateway
    │   ├── InvalidParameters           invalid_parameters 422  worker: the pipeline refuses the parameters
    │   ├── InputTooLong                input_too_long     422  worker: more tokens than the model takes, no truncation asked
    │   ├── AnswerTooLarge              answer_too_large   422  worker: the answer would not fit in one message (MAX_FRAME_BYTES)
    │   └── AnswersTooLarge             answers_too_large  422  gateway: a request's answers together pass --max-held-bytes
    └── ServerError                                       5xx  batchwire or the model failed; details go to the log
        ├── ModelError                  model_error        500  worker: the pipeline raised on a valid request
        ├── WorkerCrashed               worker_crashed     500  gateway: the worker died holding the request
        ├── Overloaded                  overloaded         503  gateway: the queue is full (Retry-After)
        │   └── HeldMemoryFull          overloaded         503  gateway: --max-held-bytes is full (Retry-After)
        ├── NoWorkers                   no_workers         503  gateway: no worker is ready (Retry-After)
        ├── Draining                    draining           503  gateway: shutting down (Retry-After)
        ├── DeadlineExceeded            deadline_exceeded  504  gateway or worker: the request's time budget ran out
        └── Cancelled                   cancelled          499  worker: the gateway withdrew the request

Workers send only the code and message in an ERROR frame; the gateway rebuilds the
exception with :func:`error_from_code`, so status codes live here and nowhere else.
``metrics_code`` tells apart, in the gateway's metrics only, refusals that clients see as
one code. ``closes_connection`` marks errors after which the connection cannot carry another
request (its framing is lost, or the server is going): the answer says ``Connection: close``.
"""

from __future__ import annotations


class BatchwireError(Exception):
    code = "internal_error"
    status = 500
    #: Seconds a client should wait before retrying; only set on 503s.
    retry_after: int | None = None
    closes_connection = False

    def __init__(self, message: str = ""):
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()

    @property
    def metrics_code(self) -> str:
        return self.code


class ProtocolError(BatchwireError):
    """A message on the wire was malformed, oversized or of another protocol version."""

    code = "protocol_error"


class ClientError(BatchwireError):
    status = 400


class BadInput(ClientError):
    """The input cannot be processed."""

    code = "bad_input"
    status = 400


class MalformedRequest(ClientError):
    """The request is not valid HTTP/1.1."""

    code = "malformed_request"
    status = 400
    closes_connection = True


class HeadTooLarge(MalformedRequest):
    """The request line or headers are larger than the server reads."""

    code = "head_too_large"
    # Go's net/http answers a head past its limit, request line included, with 431 too.
    status = 431


class UndecodableBody(MalformedRequest):
    """The body does not decode as its Content-Encoding says.

    Its framing is whole (it was read to its end), so the connection carries the next
    request; to clients it is one more malformed request."""

    closes_connection = False


class Unauthorized(ClientError):
    """A valid API key is required."""

    code = "unauthorized"
    status = 401


class OriginNotAllowed(ClientError):
    """Browsers on this page's origin may not call this server."""

    code = "origin_not_allowed"
    status = 403


class NotFound(ClientError):
    """No such route, or no such model (``GET /v1/models/{model}``)."""

    code = "not_found"
    status = 404


class MethodNotAllowed(ClientError):
    """This route does not take that method."""

    code = "method_not_allowed"
    status = 405


class BodyTooLarge(ClientError):
    """The request body is larger than the server accepts."""

    code = "body_too_large"
    status = 413


class UnsupportedMediaType(ClientError):
    """The request's Content-Type is not one the server reads."""

    code = "unsupported_media_type"
    status = 415


class InvalidParameters(ClientError):
    """The pipeline rejected the parameters."""

    code = "invalid_parameters"
    status = 422


class InputTooLong(ClientError):
    """The input has more tokens than the model takes, and truncation was not asked for."""

    code = "input_too_long"
    status = 422


class AnswerTooLarge(ClientError):
    """The answer to this input is larger than a worker can send in one message."""

    code = "answer_too_large"
    status = 422


class AnswersTooLarge(ClientError):
    """The answers to this request together are more than the gateway holds at once."""

    code = "answers_too_large"
    status = 422


class ServerError(BatchwireError):
    status = 500


class ModelError(ServerError):
    """The model failed on this input."""

    code = "model_error"
    status = 500


class WorkerCrashed(ServerError):
    """The worker running this request died."""

    code = "worker_crashed"
    status = 500


class Overloaded(ServerError):
    """The server is at capacity; retry shortly."""

    code = "overloaded"
    status = 503
    retry_after = 1


class HeldMemoryFull(Overloaded):
    """The server holds as much for requests as it may (--max-held-bytes); retry shortly.

    The same 503 to clients as a full queue; an operator tells them apart in the metrics,
    since one calls for more workers and the other for a larger budget or smaller requests."""

    metrics_code = "held_memory_full"


class NoWorkers(ServerError):
    """No model worker is ready yet; retry shortly."""

    code = "no_workers"
    status = 503
    retry_after = 1


class Draining(ServerError):
    """The server is shutting down; retry on another instance."""

    code = "draining"
    status = 503
    retry_after = 1
    # The connection has no server left behind it: a keep-alive client that sent its next
    # request on it got a reset, not this answer.
    closes_connection = True


class DeadlineExceeded(ServerError):
    """The request did not finish within its time budget."""

    code = "deadline_exceeded"
    status = 504


class Cancelled(ServerError):
    """The request was withdrawn before it ran."""

    code = "cancelled"
    # 499 is nginx's "client closed request": only ever seen in logs, since the client is gone.
    status = 499


_BY_CODE: dict[str, type[BatchwireError]] = {
    cls.code: cls
    for cls in (
        ProtocolError, BadInput, MalformedRequest, HeadTooLarge, Unauthorized, OriginNotAllowed,
        NotFound, MethodNotAllowed, BodyTooLarge,
        UnsupportedMediaType, InvalidParameters, InputTooLong, AnswerTooLarge, AnswersTooLarge,
        ModelError, WorkerCrashed,
        Overloaded, NoWorkers, Draining, DeadlineExceeded, Cancelled,
    )
}


def error_from_code(code: str, message: str) -> BatchwireError:
    """Rebuild the exception a worker reported; unknown codes become a plain 500."""
    cls = _BY_CODE.get(code)
    if cls is None:
        err = BatchwireError(message)
        err.code = code
        return err
    return cls(message)
