"""The gateway's OpenAPI 3.0.3 document, served at ``GET /openapi.json``.

:func:`openapi_document` describes every route of :mod:`gateway.app` as it really behaves
for one :class:`~gateway.config.GatewayConfig` (``--max-inputs`` bounds the input lists,
``--api-key`` adds the bearer scheme), and ``tests/e2e/test_openapi.py`` fuzzes a running
server from the served document with schemathesis, so the two cannot drift apart quietly.

This module imports nothing from :mod:`gateway.app` (which wires the handler in); the
handler is a closure over the config: ``make_openapi_handler(config)``.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from gateway.broker import MISSED_WHERE
from gateway.config import GatewayConfig
from protocol.errors import (
    AnswersTooLarge,
    AnswerTooLarge,
    BadInput,
    BodyTooLarge,
    DeadlineExceeded,
    Draining,
    HeadTooLarge,
    InputTooLong,
    InvalidParameters,
    MalformedRequest,
    MethodNotAllowed,
    ModelError,
    NotFound,
    NoWorkers,
    OriginNotAllowed,
    Overloaded,
    ProtocolError,
    Unauthorized,
    UnsupportedMediaType,
    WorkerCrashed,
)
from protocol.messages import MAX_PROMPT_NAME
from protocol.version import package_version

OPENAPI_VERSION = "3.0.3"
#: Errors a client can see, in the order the docs list them (Cancelled only reaches logs).
CLIENT_VISIBLE_ERRORS = (BadInput, MalformedRequest, HeadTooLarge, Unauthorized,
                         OriginNotAllowed, NotFound, MethodNotAllowed, BodyTooLarge, UnsupportedMediaType, InvalidParameters,
                         InputTooLong, AnswerTooLarge, AnswersTooLarge, ModelError, WorkerCrashed,
                         ProtocolError, Overloaded, NoWorkers, Draining, DeadlineExceeded)
_REF = "#/components/"


_RESPONSE_HEADERS = {
    "X-Request-Id": ({"type": "string"}, "The request's id: the client's X-Request-Id if sane "
                     "(printable ASCII, 1-128 characters), else a fresh one."),
    "X-Batch-Size": ({"type": "integer", "minimum": 1},
                     "Items in the largest pipeline call this request rode in."),
    "X-Batch-Tokens": ({"type": "integer", "minimum": 0},
                       "Padded tokens (longest input x items) of the largest pipeline call "
                       "this request rode in; 0 when the inputs are not text."),
    "X-Queue-Time-Ms": ({"type": "number", "minimum": 0},
                        "Milliseconds from admission until the batch started."),
    "X-Inference-Time-Ms": ({"type": "number", "minimum": 0},
                            "Milliseconds the batch's pipeline call took."),
    "Server-Timing": ({"type": "string"},
                      "queue;dur=..., inference;dur=..., total;dur=... (milliseconds)."),
    "Retry-After": ({"type": "integer", "minimum": 0}, "Seconds to wait before retrying."),
    "WWW-Authenticate": ({"type": "string"}, "Bearer"),
}

#: What every answered inference carries (gateway.app._run).
TIMING_HEADERS = ("X-Request-Id", "X-Batch-Size", "X-Batch-Tokens", "X-Queue-Time-Ms",
                  "X-Inference-Time-Ms", "Server-Timing")


def response_header(name: str, required: bool = True) -> dict:
    """A Header Object, inline: OpenAPI 3.0 ignores siblings of $ref such as required."""
    schema, description = _RESPONSE_HEADERS[name]
    return {"description": description, "required": required, "schema": dict(schema)}


def open_paths() -> frozenset[str]:
    """The routes that answer without an API key: gateway.app's own list, read at call time
    (gateway.app imports this module; by the time a document is built it is loaded)."""
    from gateway.app import OPEN_ROUTES

    return frozenset(OPEN_ROUTES)


def _with_security(config: GatewayConfig, path: str, operation: dict, responses: dict) -> dict:
    """With --api-key, every route but the open ones needs the bearer token (401 without)."""
    if config.requires_key:
        if path in open_paths():
            operation["security"] = []
        else:
            responses["401"] = _ref("responses", "Unauthorized")
    operation["responses"] = dict(sorted(responses.items()))
    return operation


def _ref(kind: str, name: str) -> dict:
    return {"$ref": f"{_REF}{kind}/{name}"}


def _error_codes_table() -> str:
    rows = "\n".join(f"| `{cls.code}` | {cls.status} | {(cls.__doc__ or '').strip()} |"
                     for cls in CLIENT_VISIBLE_ERRORS)
    return ("| code | status | meaning |\n| --- | --- | --- |\n" + rows +
            "\n| `internal_error` | 500 | an unexpected gateway error (see the server log) |")


def _components(config: GatewayConfig) -> dict:
    text = {
        "type": "string", "minLength": 1, "pattern": r"\S",
        "description": "Text to run the model on; not empty or only whitespace.",
    }
    item = {"oneOf": [text, {"type": "object", "description": "A structured input, e.g. "
                             '{"question": ..., "context": ...} for question-answering.'}]}
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string", "description": "Machine-readable code; "
                                 "see the table in the API description."},
                        "message": {"type": "string", "description": "What went wrong and, for "
                                    "4xx, what to change."},
                        "traceback": {"type": "string", "description": "Only with --debug, on "
                                      "internal errors."},
                    },
                },
            },
        },
        "Text": text,
        "Input": item,
        "PredictRequest": {
            "type": "object",
            "required": ["inputs"],
            "additionalProperties": False,
            "properties": {
                "inputs": {
                    "description": "One input (answered with its output) or a list (answered "
                                   "with a list of outputs in the same order; admitted all or "
                                   "nothing).",
                    "oneOf": [
                        text,
                        {"type": "object"},
                        {"type": "array", "minItems": 1, "maxItems": config.max_inputs,
                         "items": item},
                    ],
                },
                "parameters": {
                    "type": "object", "nullable": True,
                    "description": "Keyword arguments of the pipeline call (e.g. top_k for "
                                   "fill-mask); ones the pipeline refuses, or would "
                                   "ignore, give 422. Names "
                                   "starting with 'batchwire:' are reserved (400).",
                },
            },
        },
        "PipelineOutput": {
            "description": "The pipeline's output as JSON (for a list of inputs, a list of "
                           "outputs in order). Arrays (embeddings, logits) are nested lists of "
                           "numbers.",
        },
        "EmbeddingsRequest": {
            "type": "object",
            "required": ["input"],
            "additionalProperties": False,
            "properties": {
                "input": {"oneOf": [
                    text,
                    {"type": "array", "minItems": 1, "maxItems": config.max_embedding_inputs,
                     "items": text},
                ]},
                "model": {"type": "string", "description": "Echoed in the answer; the server "
                          "runs its one model whatever this says."},
                "encoding_format": {"type": "string", "enum": ["float", "base64"],
                                    "nullable": True,
                                    "description": "float (the default): a list of numbers; "
                                    "base64: the base64 of the vector's little-endian float32 "
                                    "bytes, which the OpenAI Python client asks for by "
                                    "default"},
                "user": {"type": "string", "description": "Accepted and ignored."},
                "dimensions": {"type": "integer", "minimum": 1, "nullable": True,
                               "description": "Answer each embedding's first this-many "
                               "values (Matryoshka models are trained for it), L2-normalised "
                               "again when the model's embeddings are normalised; more than "
                               "the model has: 400."},
                "prompt_name": {"type": "string", "maxLength": MAX_PROMPT_NAME,
                                "nullable": True,
                                "description": "Not OpenAI's: the name of one of the "
                                "model's sentence-transformers prompts "
                                "(config_sentence_transformers.json \"prompts\", e.g. "
                                "\"query\"), put before every input as sentence-transformers' "
                                "encode(prompt_name=...) puts it, instead of the model's "
                                "default prompt; a name the model does not have: 400, listing "
                                "those it has. The OpenAI client sends it with "
                                "extra_body={\"prompt_name\": ...}."},
            },
        },
        "EmbeddingsResponse": {
            "type": "object",
            "required": ["object", "data", "model", "usage"],
            "properties": {
                "object": {"type": "string", "enum": ["list"]},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["object", "index", "embedding"],
                        "properties": {
                            "object": {"type": "string", "enum": ["embedding"]},
                            "index": {"type": "integer", "minimum": 0},
                            "embedding": {"oneOf": [
                                {"type": "array", "items": {"type": "number"}},
                                {"type": "string", "format": "byte",
                                 "description": "with encoding_format base64"},
                            ]},
                        },
                    },
                },
                "model": {"type": "string", "nullable": True},
                "usage": {
                    "type": "object",
                    "required": ["prompt_tokens", "total_tokens"],
                    "properties": {
                        "prompt_tokens": {"type": "integer", "minimum": 0},
                        "total_tokens": {"type": "integer", "minimum": 0},
                    },
                },
            },
        },
        "Health": {
            "type": "object", "required": ["status"],
            "properties": {"status": {"type": "string", "enum": ["ok"]}},
        },
        "Ready": {
            "type": "object", "required": ["ready", "workers"],
            "properties": {
                "ready": {"type": "boolean", "enum": [True]},
                "workers": {"type": "integer", "minimum": 1},
            },
        },
        "NotReady": {
            "type": "object", "required": ["ready", "reason", "workers"],
            "properties": {
                "ready": {"type": "boolean", "enum": [False]},
                "reason": {"type": "string", "enum": ["draining", "no_workers"]},
                "workers": {"type": "integer", "minimum": 0},
            },
        },
        "Model": {
            "type": "object",
            "required": ["id", "object", "created", "owned_by"],
            "properties": {
                "id": {"type": "string", "description": "--model-name, else the basename of "
                       "the model's path or hub id"},
                "object": {"type": "string", "enum": ["model"]},
                "created": {"type": "integer", "description": "when this server started "
                            "(Unix seconds)"},
                "owned_by": {"type": "string"},
            },
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"type": "string", "enum": ["list"]},
                "data": {"type": "array", "minItems": 1, "maxItems": 1,
                         "items": _ref("schemas", "Model")},
            },
        },
        "Info": {
            "type": "object",
            "required": ["model", "task", "protocol_version", "workers", "config"],
            "properties": {
                "model": {"type": "string", "nullable": True},
                "task": {"type": "string", "nullable": True},
                "version": {"type": "string", "description": "batchwire's version, as "
                            "`batchwire --version` prints it."},
                "protocol_version": {"type": "integer"},
                "uptime_s": {"type": "number"},
                "queue_depth": {"type": "integer", "minimum": 0},
                "in_flight": {"type": "integer", "minimum": 0},
                "requeued": {"type": "integer", "minimum": 0},
                "deadline_missed": {
                    "type": "object",
                    "description": "Inputs answered 504 for their deadline since start, by "
                                   "where they were: in the gateway's queue, refused by the "
                                   "worker (past it, or its batch would finish too late), or "
                                   "sent to a worker whose answer had not come.",
                    "properties": {where: {"type": "integer", "minimum": 0}
                                   for where in MISSED_WHERE}},
                "poison": {
                    "type": "object",
                    "description": "Inputs that killed the two workers that ran them, "
                                   "remembered (refused at admission for --poison-memory-s); "
                                   "the requests refused for holding one since start; and "
                                   "inputs a worker died holding once (run alone if sent "
                                   "again).",
                    "properties": {"remembered": {"type": "integer", "minimum": 0},
                                   "refused": {"type": "integer", "minimum": 0},
                                   "suspected": {"type": "integer", "minimum": 0}}},
                "held_bytes": {"type": "integer", "minimum": 0},
                "connections": {"type": "integer", "minimum": 0,
                                "description": "Client connections open now "
                                               "(at most --max-connections)."},
                "api_keys": {"type": "integer", "minimum": 0,
                             "description": "API keys accepted now: --api-key's and those of "
                                            "--api-keys-file as last read (0: none needed)."},
                "zmq_endpoint": {"type": "string"},
                "draining": {"type": "boolean"},
                "workers": {"type": "array", "items": {
                    "type": "object",
                    "description": "A connected worker: id, pid, host, device, dtype, model, task, "
                                   "state, capacity, in_flight, answered, batches, uptime_s.",
                    "required": ["id", "pid", "device", "state"],
                    "properties": {
                        "id": {"type": "string"},
                        "pid": {"type": "integer"},
                        "host": {"type": "string"},
                        "device": {"type": "string"},
                        "dtype": {"type": "string", "description": "the model weights' dtype, "
                                  "e.g. float32 or bfloat16 (--dtype)"},
                        "model": {"type": "string"},
                        "task": {"type": "string"},
                        "state": {"type": "string", "enum": ["ready", "suspect", "drained"],
                                  "description": "ready: takes requests; suspect: runs a "
                                  "request whose worker died, alone; drained: takes no new "
                                  "request until it is idle, for such a request that waits"},
                        "capacity": {"type": "integer"},
                        "max_batch_size": {"type": "integer"},
                        "max_batch_tokens": {"type": "integer", "minimum": 0,
                                             "description": "padded-token budget of one batch "
                                             "(0: none)"},
                        "in_flight": {"type": "integer", "minimum": 0},
                        "answered": {"type": "integer", "minimum": 0},
                        "skipped": {"type": "integer", "minimum": 0},
                        "batches": {"type": "integer", "minimum": 0},
                        "uptime_s": {"type": "number"},
                        "pooling": {"type": "string"},
                        "max_seq_length": {"type": "integer", "minimum": 0,
                                           "description": "sentence embeddings are of an "
                                           "input's first this-many tokens, as "
                                           "sentence-transformers computes them (0: not "
                                           "truncated; a longer input is a 422)"},
                        "prompts": {"type": "array", "items": {"type": "string"},
                                    "description": "the prompts the model declares, by the "
                                    "name /v1/embeddings' prompt_name takes"},
                    },
                }},
                "local_workers": {"type": "array", "items": {"type": "object"},
                                  "description": "The worker processes `batchwire serve` "
                                                 "supervises (empty under `batchwire gateway`)."},
                "config": {"type": "object", "description": "The effective gateway config; "
                           "api_key shows as \"***\" when set."},
            },
        },
    }

    def error(description: str, *extra_headers: str) -> dict:
        return {
            "description": description,
            "headers": {name: response_header(name) for name in ("X-Request-Id", *extra_headers)},
            "content": {"application/json": {"schema": _ref("schemas", "Error")}},
        }

    responses = {
        "BadInput": error("bad_input: the body, an input or X-Timeout-Ms is invalid, or the "
                          "pipeline rejects the input (e.g. too many tokens). Or "
                          "malformed_request: the body does not decompress whole as its "
                          "Content-Encoding says, or its chunked framing broke (the "
                          "connection is closed after that)."),
        "Unauthorized": error("unauthorized: the Authorization: Bearer key is missing or "
                              "wrong.", "WWW-Authenticate"),
        "BodyTooLarge": error(f"body_too_large: the body, or what it inflates to, is over "
                              f"--max-body-bytes ({config.max_body_bytes} bytes)."),
        "UnsupportedMediaType": error("unsupported_media_type: this route does not read that "
                                      "Content-Type, or the gateway does not decode that "
                                      "Content-Encoding."),
        "Unprocessable": error("invalid_parameters (the pipeline refuses the parameters), "
                               "input_too_long (more tokens than the model takes) or "
                               "answer_too_large (the answer is more than a worker can send "
                               "in one message) or answers_too_large (the request's answers "
                               "together pass --max-held-bytes: send fewer inputs)."),
        "ServerError": error("model_error (the pipeline raised on a valid request), "
                             "worker_crashed (the worker died holding it), protocol_error "
                             "(the worker runs an older release than the gateway and cannot "
                             "read the request) or internal_error."),
        "Unavailable": error("overloaded (queue full, bodies and answers held near "
                             "--max-held-bytes, or --max-connections open: a new "
                             "connection's only answer), "
                             "no_workers (no worker ready yet) or "
                             "draining (shutting down).", "Retry-After"),
        "DeadlineExceeded": error("deadline_exceeded: the request's deadline (X-Timeout-Ms or "
                                  "--timeout-ms) passed, or its body did not arrive within "
                                  "it."),
        "NotFound": error("not_found: no such route, or no such model."),
    }

    parameters = {
        "X-Timeout-Ms": {
            "name": "X-Timeout-Ms", "in": "header", "required": False,
            "description": "This request's deadline in milliseconds from arrival, instead of "
                           f"--timeout-ms ({config.timeout_ms:g}); past it the answer is 504. "
                           "Not a positive finite number: 400.",
            "schema": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
        },
        "X-Request-Id": {
            "name": "X-Request-Id", "in": "header", "required": False,
            "description": "Echoed in the answer and the access log when it is 1-128 "
                           "printable ASCII characters; otherwise a fresh id replaces it.",
            "schema": {"type": "string"},
        },
    }
    components: dict[str, Any] = {"schemas": schemas, "responses": responses,
                                  "parameters": parameters}
    if config.requires_key:
        components["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer",
                           "description": "The key given to --api-key (BATCHWIRE_API_KEY), "
                                          "or one of the lines of --api-keys-file; compared "
                                          "in constant time."},
        }
    return components


def _inference_operation(config: GatewayConfig, *, operation_id: str, summary: str,
                         description: str, request_body: dict, ok: dict) -> dict:
    timing = {name: response_header(name) for name in TIMING_HEADERS}
    responses: dict[str, Any] = {
        "200": {**ok, "headers": timing},
        "400": _ref("responses", "BadInput"),
        "413": _ref("responses", "BodyTooLarge"),
        "415": _ref("responses", "UnsupportedMediaType"),
        "422": _ref("responses", "Unprocessable"),
        "500": _ref("responses", "ServerError"),
        "503": _ref("responses", "Unavailable"),
        "504": _ref("responses", "DeadlineExceeded"),
    }
    if config.requires_key:
        responses["401"] = _ref("responses", "Unauthorized")
    return {
        "operationId": operation_id,
        "summary": summary,
        "description": description,
        "parameters": [_ref("parameters", "X-Timeout-Ms"), _ref("parameters", "X-Request-Id")],
        "requestBody": request_body,
        "responses": dict(sorted(responses.items())),
    }


def _simple_get(config: GatewayConfig, path: str, *, operation_id: str, summary: str,
                description: str, responses: dict, parameters: list | None = None) -> dict:
    responses = dict(responses)
    operation: dict[str, Any] = {"operationId": operation_id, "summary": summary,
                                 "description": description}
    if parameters:
        operation["parameters"] = parameters
    return _with_security(config, path, operation, responses)


# -- KServe Open Inference Protocol v2 (gateway/kserve.py) -----------------------------------
def _v2_error(description: str, *extra_headers: str) -> dict:
    return {
        "description": description,
        "headers": {name: response_header(name) for name in ("X-Request-Id", *extra_headers)},
        "content": {"application/json": {"schema": _ref("schemas", "V2Error")}},
    }


def _v2_components(config: GatewayConfig) -> tuple[dict, dict]:
    """(schemas, responses) of the v2 routes."""
    tensor_fields = {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
    }
    schemas = {
        "V2Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "string"}},
            "description": "The protocol's error shape (not batchwire's).",
        },
        "V2ServerMetadata": {
            "type": "object", "required": ["name", "version", "extensions"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                           "extensions": {"type": "array", "items": {"type": "string"}}},
        },
        "V2Live": {"type": "object", "required": ["live"],
                   "properties": {"live": {"type": "boolean", "enum": [True]}}},
        "V2Ready": {"type": "object", "required": ["ready"],
                    "properties": {"ready": {"type": "boolean"}}},
        "V2ModelReady": {"type": "object", "required": ["name", "ready"],
                         "properties": {"name": {"type": "string"},
                                        "ready": {"type": "boolean"}}},
        "V2ModelMetadata": {
            "type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}, "maxItems": 0},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": {
                    "type": "object", "required": ["name", "datatype", "shape"],
                    "properties": tensor_fields}},
                "outputs": {"type": "array", "items": {
                    "type": "object", "required": ["name", "datatype", "shape"],
                    "properties": tensor_fields}},
            },
        },
        "V2Data": {
            "type": "array",
            "description": "The strings, flat or nested row-major.",
            "items": {"oneOf": [{"type": "string"}, {"$ref": f"{_REF}schemas/V2Data"}]},
        },
        "V2InferRequest": {
            "type": "object",
            "required": ["inputs"],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "string", "nullable": True,
                       "description": "Echoed as the answer's id (else X-Request-Id)."},
                "parameters": {"type": "object", "nullable": True,
                               "description": "The pipeline's keyword arguments, less the "
                                              "codec hints content_type and headers."},
                "inputs": {
                    "type": "array", "minItems": 1, "maxItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "shape", "datatype", "data"],
                        "additionalProperties": False,
                        "description": "One BYTES tensor of n strings: shape [n] or [n, 1], "
                                       f"1 <= n <= --max-inputs ({config.max_inputs}), each "
                                       "string not blank.",
                        "properties": {
                            "name": {"type": "string"},
                            "shape": {"type": "array", "minItems": 1, "maxItems": 2,
                                      "items": {"type": "integer", "minimum": 0}},
                            "datatype": {"type": "string", "enum": ["BYTES"]},
                            "parameters": {
                                "type": "object", "nullable": True,
                                "additionalProperties": False,
                                "description": "Codec hints only; pipeline arguments go in "
                                               "the request's parameters.",
                                "properties": {"content_type": {}, "headers": {}}},
                            "data": _ref("schemas", "V2Data"),
                        },
                    },
                },
                "outputs": {
                    "type": "array", "nullable": True,
                    "items": {
                        "type": "object", "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "pattern": r"^output(_[0-9]+)?$"},
                            "parameters": {"type": "object", "nullable": True},
                        },
                    },
                },
            },
        },
        "V2InferResponse": {
            "type": "object", "required": ["model_name", "id", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "id": {"type": "string"},
                "outputs": {"type": "array", "items": {
                    "type": "object", "required": ["name", "datatype", "shape", "data"],
                    "properties": {**tensor_fields, "data": {"type": "array"}},
                    "description": "Arrays: one FP32/... tensor \"output\" [n, *item_shape] "
                                   "(or \"output_i\" per item when shapes differ). Anything "
                                   "else: one BYTES tensor \"output\" [n], each element the "
                                   "item's /predict JSON as a string.",
                }},
            },
        },
    }
    responses = {
        "V2BadInput": _v2_error("The request is malformed, or the pipeline rejects an input."),
        "V2NotFound": _v2_error("No such model (or version: there are none)."),
        "V2BodyTooLarge": _v2_error("The body is over --max-body-bytes."),
        "V2UnsupportedMediaType": _v2_error("Not application/json."),
        "V2InvalidParameters": _v2_error("The pipeline refuses the parameters, the input "
                                         "has more tokens than the model takes, the "
                                         "answer is more than a worker sends in one "
                                         "message, or the request's answers together pass "
                                         "--max-held-bytes."),
        "V2ServerError": _v2_error("The model or the gateway failed."),
        "V2Unavailable": _v2_error("No worker ready (no model known yet), queue full, "
                                   "bodies and answers held near --max-held-bytes, or "
                                   "draining.", "Retry-After"),
        "V2DeadlineExceeded": _v2_error("The request's deadline passed, or its body did not "
                                        "arrive within it."),
    }
    return schemas, responses


def _v2_operation(config: GatewayConfig, path: str, *, operation_id: str, summary: str,
                  responses: dict, description: str = "", request_body: dict | None = None,
                  parameters: list | None = None) -> dict:
    operation: dict[str, Any] = {"operationId": operation_id, "summary": summary,
                                 "tags": ["KServe v2"]}
    if description:
        operation["description"] = description
    if parameters:
        operation["parameters"] = parameters
    if request_body:
        operation["requestBody"] = request_body
    responses = dict(responses)
    return _with_security(config, path, operation, responses)


def _v2_paths(config: GatewayConfig) -> dict:
    model_name = getattr(config, "model_name", None)
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "The model's name: the basename of --model, the full model "
                           "string, or --model-name" +
                           (f" ({model_name})" if model_name else "") + "."}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}

    def json_ok(description: str, schema: str) -> dict:
        return {"description": description,
                "content": {"application/json": {"schema": _ref("schemas", schema)}}}

    def not_ready(schema: str) -> dict:
        return {"description": "Not ready: no worker yet, or draining.",
                "headers": {"Retry-After": response_header("Retry-After")},
                "content": {"application/json": {"schema": _ref("schemas", schema)}}}

    metadata = _v2_operation(
        config, "/v2", operation_id="v2_server_metadata", summary="Server metadata",
        responses={"200": json_ok("Server name, version, extensions (none).",
                                  "V2ServerMetadata")})
    unversioned = ("batchwire serves one unversioned model: every versioned path answers "
                   "404 naming the unversioned one.")
    unavailable = _ref("responses", "V2Unavailable")
    not_found = _ref("responses", "V2NotFound")
    timing = {name: response_header(name) for name in TIMING_HEADERS}
    return {
        "/v2": {"get": metadata},
        "/v2/": {"get": {**metadata, "operationId": "v2_server_metadata_slash"}},
        "/v2/health/live": {"get": _v2_operation(
            config, "/v2/health/live", operation_id="v2_live", summary="Server liveness",
            responses={"200": json_ok("Alive.", "V2Live")})},
        "/v2/health/ready": {"get": _v2_operation(
            config, "/v2/health/ready", operation_id="v2_ready", summary="Server readiness",
            responses={"200": json_ok("Ready.", "V2Ready"), "503": not_ready("V2Ready")})},
        "/v2/models/{name}": {"get": _v2_operation(
            config, "/v2/models/{name}", operation_id="v2_model_metadata",
            summary="Model metadata", parameters=[name],
            responses={"200": json_ok("The model's name, platform, input and output tensors.",
                                      "V2ModelMetadata"),
                       "404": not_found, "503": unavailable})},
        "/v2/models/{name}/ready": {"get": _v2_operation(
            config, "/v2/models/{name}/ready", operation_id="v2_model_ready",
            summary="Model readiness", parameters=[name],
            responses={"200": json_ok("Ready.", "V2ModelReady"),
                       "404": not_found, "503": not_ready("V2ModelReady")})},
        "/v2/models/{name}/infer": {"post": _v2_operation(
            config, "/v2/models/{name}/infer", operation_id="v2_infer", summary="Inference",
            description="One BYTES tensor of n strings in; each string is one pipeline input "
                        "(batched like /predict's list), with the same deadlines "
                        "(X-Timeout-Ms) and timing headers. Errors in the v2 shape.",
            parameters=[name, _ref("parameters", "X-Timeout-Ms"),
                        _ref("parameters", "X-Request-Id")],
            request_body={"required": True, "content": {
                "application/json": {"schema": _ref("schemas", "V2InferRequest")}}},
            responses={
                "200": {**json_ok("One output tensor (or one per item).", "V2InferResponse"),
                        "headers": timing},
                "400": _ref("responses", "V2BadInput"), "404": not_found,
                "413": _ref("responses", "V2BodyTooLarge"),
                "415": _ref("responses", "V2UnsupportedMediaType"),
                "422": _ref("responses", "V2InvalidParameters"),
                "500": _ref("responses", "V2ServerError"), "503": unavailable,
                "504": _ref("responses", "V2DeadlineExceeded"),
            })},
        "/v2/models/{name}/versions/{version}": {"get": _v2_operation(
            config, "/v2/models/{name}/versions/{version}",
            operation_id="v2_model_version_metadata", summary="Versioned metadata (none)",
            description=unversioned, parameters=[name, version],
            responses={"404": not_found, "503": unavailable})},
        "/v2/models/{name}/versions/{version}/ready": {"get": _v2_operation(
            config, "/v2/models/{name}/versions/{version}/ready",
            operation_id="v2_model_version_ready", summary="Versioned readiness (none)",
            description=unversioned, parameters=[name, version],
            responses={"404": not_found, "503": unavailable})},
        "/v2/models/{name}/versions/{version}/infer": {"post": _v2_operation(
            config, "/v2/models/{name}/versions/{version}/infer",
            operation_id="v2_model_version_infer", summary="Versioned inference (none)",
            description=unversioned, parameters=[name, version],
            responses={"404": not_found, "503": unavailable})},
    }


def openapi_document(config: GatewayConfig) -> dict:
    """The OpenAPI 3.0.3 document of every route this gateway serves, for this config."""
    structured = {"schema": _ref("schemas", "PredictRequest")}
    any_json = {"schema": _ref("schemas", "PipelineOutput")}
    pipeline_ok = {
        "description": "The pipeline's output: JSON, or msgpack when Accept asks for "
                       "application/msgpack (arrays then travel as raw bytes).",
        "content": {"application/json": any_json, "application/msgpack": any_json},
    }
    root = _inference_operation(
        config, operation_id="infer", summary="Run the model on the raw body text",
        description=(
            "The guide's contract: `curl -X POST -d \"test [MASK]\" http://host:port/`. A "
            "text/plain or application/x-www-form-urlencoded body (what `curl -d` sends), or "
            "one without a Content-Type, is the input text itself (not blank; in the "
            "Content-Type's charset, UTF-8 when it names none). "
            "application/json and application/msgpack bodies are read as on /predict. Any "
            "other Content-Type: 415."
        ),
        request_body={
            "required": True,
            "content": {
                "text/plain": {"schema": _ref("schemas", "Text")},
                "application/x-www-form-urlencoded": {"schema": _ref("schemas", "Text")},
                "application/json": structured,
                "application/msgpack": structured,
            },
        },
        ok=pipeline_ok,
    )
    predict = _inference_operation(
        config, operation_id="predict", summary="Run the model on one input or a list",
        description=(
            '`{"inputs": ..., "parameters": {...}}` as JSON or msgpack. A list of inputs is '
            "batched item by item and answered as a list in order; at most --max-inputs "
            f"({config.max_inputs}) items."
        ),
        request_body={"required": True, "content": {"application/json": structured,
                                                   "application/msgpack": structured}},
        ok=pipeline_ok,
    )
    embeddings = _inference_operation(
        config, operation_id="create_embeddings", summary="OpenAI-compatible sentence "
        "embeddings",
        description=(
            "For feature-extraction models: token embeddings pooled as the model declares "
            "(sentence-transformers modules.json / 1_Pooling/config.json) or as --pooling "
            "says, L2-normalised where declared. An input longer than the model's "
            "max_seq_length (sentence_bert_config.json, or --max-seq-length; /info shows it) "
            "is embedded from its first max_seq_length tokens, as sentence-transformers "
            "does; usage counts the tokens embedded. Other tasks answer 400."
        ),
        request_body={"required": True, "content": {
            "application/json": {"schema": _ref("schemas", "EmbeddingsRequest")}}},
        ok={"description": "One embedding per input, in order.",
            "content": {"application/json": {"schema": _ref("schemas", "EmbeddingsResponse")},
                        "application/msgpack": {"schema": _ref("schemas",
                                                               "EmbeddingsResponse")}}},
    )

    paths = {
        "/": {"post": root},
        "/predict": {"post": predict},
        "/v1/embeddings": {"post": embeddings},
        "/v1/models": {"get": _simple_get(
            config, "/v1/models", operation_id="list_models", summary="OpenAI-compatible "
            "model list",
            description="The one model this server runs, as OpenAI's GET /v1/models lists "
                        "models. 503 until a worker has announced it (under `batchwire "
                        "gateway`).",
            responses={"200": {"description": "One model.", "content": {
                "application/json": {"schema": _ref("schemas", "ModelList")}}},
                "503": _ref("responses", "Unavailable")})},
        "/v1/models/{name}": {"get": _simple_get(
            config, "/v1/models/{name}", operation_id="retrieve_model", summary="OpenAI-"
            "compatible model lookup",
            description="The model, under any name it answers to: its id, its full path or "
                        "hub id, or --model-name. Any other name: 404.",
            parameters=[{"name": "name", "in": "path", "required": True,
                         "schema": {"type": "string", "minLength": 1}}],
            responses={"200": {"description": "The model.", "content": {
                "application/json": {"schema": _ref("schemas", "Model")}}},
                "404": _ref("responses", "NotFound"),
                "503": _ref("responses", "Unavailable")})},
        "/health": {"get": _simple_get(
            config, "/health", operation_id="health", summary="Liveness",
            description="200 while the gateway process is alive. Never needs an API key.",
            responses={"200": {"description": "Alive.", "content": {
                "application/json": {"schema": _ref("schemas", "Health")}}}})},
        "/ready": {"get": _simple_get(
            config, "/ready", operation_id="ready", summary="Readiness",
            description="200 once at least one worker is ready; 503 before that and while "
                        "draining. Never needs an API key.",
            responses={
                "200": {"description": "Ready to serve.", "content": {
                    "application/json": {"schema": _ref("schemas", "Ready")}}},
                "503": {"description": "Not ready: no worker yet, or draining.",
                        "headers": {"Retry-After": response_header("Retry-After")},
                        "content": {"application/json": {"schema": _ref("schemas",
                                                                         "NotReady")}}},
            })},
        "/info": {"get": _simple_get(
            config, "/info", operation_id="info", summary="Model, workers and effective config",
            description="Model, task, protocol version, queue, each connected worker and the "
                        "effective config (the API key masked).",
            responses={"200": {"description": "What this server runs.", "content": {
                "application/json": {"schema": _ref("schemas", "Info")}}}})},
        "/metrics": {"get": _simple_get(
            config, "/metrics", operation_id="metrics", summary="Prometheus metrics",
            description="The Prometheus text exposition format (prometheus_client).",
            responses={"200": {"description": "batchwire_* metrics.", "content": {
                "text/plain": {"schema": {"type": "string"}}}}})},
        "/openapi.json": {"get": _simple_get(
            config, "/openapi.json", operation_id="openapi", summary="This document",
            description="The OpenAPI document of this server, for its config.",
            responses={"200": {"description": "OpenAPI 3.0.3.", "content": {
                "application/json": {"schema": {"type": "object"}}}}})},
    }

    components = _components(config)
    v2_schemas, v2_responses = _v2_components(config)
    components["schemas"].update(v2_schemas)
    components["responses"].update(v2_responses)
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "batchwire",
            "version": package_version(),
            "description": (
                "A Hugging Face transformers pipeline behind HTTP with deadline-bounded "
                "dynamic batching.\n\nEvery error is JSON "
                '`{"error": {"code": "...", "message": "..."}}`. Codes:\n\n'
                + _error_codes_table() +
                "\n\nAny route also answers 404 (not_found) for an unknown path and 405 "
                "(method_not_allowed, with Allow) for a method it does not take; GET routes "
                "answer HEAD too.\n\nThe /v2 routes (tag \"KServe v2\") are KServe's Open "
                "Inference Protocol; they answer errors in that protocol's shape "
                '`{"error": "message"}`, 404 for any other /v2 path and 405 for a wrong '
                "method, except the 401 of a missing API key, which comes in batchwire's."
            ),
        },
        "paths": {**paths, **_v2_paths(config)},
        "components": components,
    }
    if config.requires_key:
        document["security"] = [{"bearerAuth": []}]
    return document


def make_openapi_handler(config: GatewayConfig) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``GET /openapi.json``: the document for this config, built once and served as is."""
    body = orjson.dumps(openapi_document(config))

    async def handle_openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return handle_openapi


__all__ = ["OPENAPI_VERSION", "make_openapi_handler", "openapi_document"]
