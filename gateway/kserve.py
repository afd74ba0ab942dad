"""The KServe Open Inference Protocol (v2, REST) beside batchwire's own routes.

:func:`register` adds, to the app :func:`gateway.app.create_app` builds::

    GET  /v2                          server metadata {"name", "version", "extensions": []}
    GET  /v2/health/live              200 {"live": true}
    GET  /v2/health/ready             200 {"ready": true}; 503 {"ready": false} with no worker
                                      or while draining
    GET  /v2/models/{name}            model metadata
    GET  /v2/models/{name}/ready      200 {"name", "ready": true}; 503 {"name", "ready": false}
    POST /v2/models/{name}/infer      inference

Spec: https://github.com/kserve/open-inference-protocol (inference_rest.md and
open_inference_rest.yaml). Each infer item goes through the same broker, batching, deadlines
(``X-Timeout-Ms``) and timing headers as ``POST /predict``: this module only translates.

Model name. batchwire serves one model, so ``{name}`` is a check, not a lookup. The name is
the basename of the model the workers announce (``--model /models/bert-base-uncased`` is
``bert-base-uncased``); the full model string is accepted too (a path or ``org/name`` hub id:
percent-encode its slashes, or send them as they are). ``register(app, model_name=...)``
makes another name the one answered and accepted, which is what KServe's clients expect: they
call ``/v2/models/<InferenceService name>/infer``. An unknown name is 404. Versions: none;
``/v2/models/{name}/versions/{v}/...`` is 404 saying so, and ``model_version`` is never set.

Inputs. Exactly one input tensor (any name; the metadata calls it ``text``) of datatype
``BYTES`` and shape ``[n]`` or ``[n, 1]``, whose data are the n strings, flat (or, for
``[n, 1]``, rows of one). Each string is one pipeline input, like one element of
``/predict``'s ``"inputs"`` list. The request's ``"parameters"`` are the pipeline's keyword
arguments (``{"top_k": 3}``), less ``content_type`` and ``headers``, which are
protocol-level codec hints (MLServer, KServe) and never pipeline arguments. Input-level
``"parameters"`` may hold only those two hints; any other name (a ``top_k`` put there by
mistake) is 400, not silently dropped. The binary tensor data extension is not supported
(``"extensions": []``): a body carrying it, or asking for it, is 400.

Outputs. How the n pipeline outputs become output tensors:

* arrays (feature-extraction's ``[1, tokens, hidden]`` per item): when every item has the
  same shape and dtype, one tensor ``"output"`` of shape ``[n, *item_shape]`` with the
  matching datatype (FP32 for float32, FP16, INT64, ...); otherwise (inputs of different
  token lengths) one tensor per item, ``"output_0"`` ... ``"output_{n-1}"``, each of its
  item's own shape. Values are exactly the ones ``/predict`` answers: no padding, no
  re-pooling.
* anything else (fill-mask's list of candidate dicts, text-classification's labels, ...):
  one ``BYTES`` tensor ``"output"`` of shape ``[n]`` whose i-th element is item i's output
  **encoded as a JSON string**, exactly the JSON ``/predict`` would answer for it. The
  protocol has no type for nested records, and BYTES of JSON keeps them whole: decode each
  element with ``json.loads``.

``"outputs"`` in the request selects among these by name (``"output"`` selects every
``output_i`` too). The response's ``"id"`` is the request's ``"id"``, or batchwire's
``X-Request-Id`` when the request gave none.

Errors. Every v2 route answers errors in the protocol's shape, ``{"error": "<message>"}``,
with the status :mod:`protocol.errors` gives the exception (400 bad input, 404 unknown
model or route, 405, 413, 415, 422 parameters the pipeline rejects, 503 no worker or
draining with Retry-After, 504 deadline), not batchwire's ``{"error": {"code",
"message"}}``. One exception, raised before any route runs: 401 for a missing API key (every
v2 route but the health ones, which stay open like ``/health`` and ``/ready``: see
``gateway.app.OPEN_ROUTES``) comes in batchwire's shape from
:func:`gateway.app.error_middleware`.

Register last: the v2 routes take every method on their paths (to answer 405 in the v2
shape) and ``/v2/{tail}`` catches the rest of ``/v2/`` (404 in the v2 shape), so a ``/v2/``
route added after :func:`register` would never be reached.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any

from aiohttp import web

# Module import, attributes read at request time: create_app may import this module while
# gateway.app is still being executed.
from gateway import app as bw
from gateway.encoding import Flat
from protocol.errors import (
    BadInput,
    BatchwireError,
    MethodNotAllowed,
    NotFound,
    NoWorkers,
    UnsupportedMediaType,
)
from protocol.messages import NDArray, Result

log = logging.getLogger("batchwire.gateway.kserve")

SERVER_NAME = "batchwire"
try:
    SERVER_VERSION = metadata.version("batchwire")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    SERVER_VERSION = "unknown"
PLATFORM = "huggingface-transformers"
#: The name /v2/models/{name} answers to besides the model's own (register's model_name).
MODEL_NAME = web.AppKey("kserve_model_name", str)
#: Request parameters that are protocol-level codec hints, never pipeline arguments.
PROTOCOL_PARAMETERS = frozenset({"content_type", "headers"})
INPUT_NAME = "text"
OUTPUT_NAME = "output"
_OUTPUT_NAME = re.compile(r"output(_\d+)?")
_REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_FIELDS = frozenset({"name", "shape", "datatype", "parameters", "data"})
#: numpy dtype (kind + itemsize) -> the protocol's tensor datatype.
_DATATYPES = {
    "b1": "BOOL", "u1": "UINT8", "u2": "UINT16", "u4": "UINT32", "u8": "UINT64",
    "i1": "INT8", "i2": "INT16", "i4": "INT32", "i8": "INT64",
    "f2": "FP16", "f4": "FP32", "f8": "FP64",
}

Handler = Callable[..., Awaitable[web.StreamResponse]]


# -- errors in the v2 shape -------------------------------------------------------------
def _error(request: web.Request, message: str, status: int, code: str,
           headers: dict[str, str] | None = None) -> web.Response:
    headers = {"X-Request-Id": request.get(bw.REQUEST_ID, ""), **(headers or {})}
    response = bw.json_response({"error": message}, status=status, headers=headers)
    # Read by the metrics middleware, as for batchwire's own errors: gateway.app's key (a
    # typed ResponseKey where aiohttp has them, else the plain string).
    response[getattr(bw, "ERROR_CODE", "error_code")] = code
    return response


def _v2_route(method: str, handler: Handler) -> Handler:
    """Run handler for method ("*": any; GET also answers HEAD); every error answers in
    the v2 shape."""
    allowed = {"GET", "HEAD"} if method == "GET" else {method}

    @functools.wraps(handler)
    async def route(request: web.Request) -> web.StreamResponse:
        try:
            if method != "*" and request.method not in allowed:
                raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}; "
                                       f"use {method}")
            return await handler(request, **request.match_info)
        except BatchwireError as exc:
            headers = {}
            if exc.retry_after is not None:
                headers["Retry-After"] = str(exc.retry_after)
            if isinstance(exc, MethodNotAllowed):
                headers["Allow"] = ", ".join(sorted(allowed))
            return _error(request, exc.message, exc.status, exc.metrics_code, headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # aiohttp's own refusals while reading the body (413 on a chunked body).
            if exc.status == 413:
                limit = request.app[bw.CONFIG].max_body_bytes
                return _error(request, f"the body is larger than the {limit} bytes this server "
                              "accepts (--max-body-bytes)", 413, "body_too_large")
            return _error(request, exc.text or exc.reason, exc.status, "bad_input")
        except Exception:  # a clean 500 for the client, the details to the log
            request_id = request.get(bw.REQUEST_ID, "")
            log.exception("internal error on %s %s (request %s)", request.method,
                          request.path, request_id)
            return _error(request, "internal server error; see the server log for request "
                          f"{request_id}", 500, "internal_error")

    return route


# -- the model's names ----------------------------------------------------------------------
def _basename(model: str) -> str:
    return os.path.basename(model.rstrip("/")) or model


def model_names(request: web.Request) -> tuple[str | None, set[str]]:
    """(the name answered, every name accepted); (None, empty) while nothing is known."""
    app = request.app
    models = [w.info.model for w in app[bw.BROKER].workers.values()]
    supervisor = app.get(bw.SUPERVISOR)
    launch = getattr(supervisor, "launch", None)
    if getattr(launch, "model", None):
        # `batchwire serve` knows its model before any worker has loaded it.
        models.append(launch.model)
    accepted = {name for model in models for name in (model, _basename(model))}
    primary = _basename(models[0]) if models else None
    if app.get(MODEL_NAME):
        primary = app[MODEL_NAME]
        accepted.add(primary)
    return primary, accepted


def known_model_names(request: web.Request) -> tuple[str, set[str]]:
    """:func:`model_names`, or 503 while no model is known at all."""
    primary, accepted = model_names(request)
    if primary is None:
        raise NoWorkers("no model worker is ready yet, so no model is known; retry shortly")
    return primary, accepted


def _resolve(request: web.Request, name: str) -> str:
    """The name answered for name, or 404; 503 while no model is known at all."""
    primary, accepted = known_model_names(request)
    if name not in accepted:
        raise _unknown_model(name, primary)
    return primary


def _unknown_model(name: str, primary: str) -> NotFound:
    return NotFound(f"unknown model {name!r}; this server serves {primary!r} "
                    f"(GET /v2/models/{primary})")


def _is_ready(request: web.Request) -> bool:
    broker = request.app[bw.BROKER]
    return bool(broker.workers) and not broker.draining


# -- health and metadata ------------------------------------------------------------------
async def server_live(request: web.Request) -> web.Response:
    return bw.json_response({"live": True})


async def server_ready(request: web.Request) -> web.Response:
    if _is_ready(request):
        return bw.json_response({"ready": True})
    return bw.json_response({"ready": False}, status=503, headers={"Retry-After": "1"})


async def server_metadata(request: web.Request) -> web.Response:
    return bw.json_response({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": []})


async def model_ready(request: web.Request, name: str) -> web.Response:
    primary, accepted = model_names(request)
    if primary is not None and name not in accepted:
        raise _unknown_model(name, primary)
    # Nothing known yet (no worker has announced a model): not ready, whatever the name.
    body = {"name": primary or name, "ready": _is_ready(request)}
    if body["ready"]:
        return bw.json_response(body)
    return bw.json_response(body, status=503, headers={"Retry-After": "1"})


async def model_metadata(request: web.Request, name: str) -> web.Response:
    primary = _resolve(request, name)
    worker = next(iter(request.app[bw.BROKER].workers.values()), None)
    if worker is None:
        raise NoWorkers(f"model {primary!r} has no ready worker yet; retry shortly")
    if worker.info.task == "feature-extraction" or worker.info.pooling:
        # [n, 1, tokens, hidden]: hidden is the model's, tokens the input's. A float16 model
        # answers float16; every other dtype travels as float32 (bfloat16 has no numpy type).
        datatype = "FP16" if worker.info.dtype == "float16" else "FP32"
        output = {"name": OUTPUT_NAME, "datatype": datatype, "shape": [-1, 1, -1, -1]}
    else:
        output = {"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [-1]}
    return bw.json_response({
        "name": primary,
        "versions": [],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [output],
    })


async def versioned(request: web.Request, name: str, version: str) -> web.Response:
    primary = _resolve(request, name)
    rest = request.path.split(f"/versions/{version}", 1)[-1]
    raise NotFound(f"model {primary!r} has no version {version!r}: batchwire serves one "
                   f"unversioned model; use /v2/models/{primary}{rest}")


async def unknown_route(request: web.Request, tail: str) -> web.Response:
    raise NotFound(f"no route {request.method} {request.path}; the v2 routes are GET /v2, "
                   "/v2/health/live, /v2/health/ready, /v2/models/{name}, "
                   "/v2/models/{name}/ready and POST /v2/models/{name}/infer")


# -- inference -----------------------------------------------------------------------------
def _flat(data: Any, shape: list, where: str) -> list:
    """The data of a tensor of shape [n] or [n, 1], flat: given flat, or nested as its shape
    says (n rows of one). Nesting that contradicts the shape is refused: [["x"], ["y"]] for
    shape [2], or [[[]], "x"], whose empty lists vanished when flattened whatever the depth."""
    if not isinstance(data, list):
        raise BadInput(f"{where} must be a list of strings, not {bw.json_type(data)}")
    if not any(isinstance(item, list) for item in data):
        return data
    if len(shape) == 2 and all(isinstance(row, list) and len(row) == 1
                               and not isinstance(row[0], list) for row in data):
        return [row[0] for row in data]
    raise BadInput(f"{where} nests otherwise than the shape {shape} says; send the strings "
                   'flat, ["a", "b"], or for shape [n, 1] as rows of one, [["a"], ["b"]]')


def _parse_input(tensor: Any, max_inputs: int) -> list[str]:
    if not isinstance(tensor, dict):
        raise BadInput(f'"inputs"[0] must be an object {{"name", "shape", "datatype", "data"}},'
                       f" not {bw.json_type(tensor)}")
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in tensor]
    if missing:
        raise BadInput(f'"inputs"[0] lacks {missing}; send {{"name": "{INPUT_NAME}", '
                       '"shape": [n], "datatype": "BYTES", "data": ["text", ...]}')
    unknown = sorted(set(tensor) - _INPUT_FIELDS)
    if unknown:
        raise BadInput(f'"inputs"[0] has unknown field(s) {unknown}; an input takes '
                       f"{sorted(_INPUT_FIELDS)}")
    name = tensor["name"]
    if not isinstance(name, str):
        raise BadInput(f'"inputs"[0]["name"] must be a string, not {bw.json_type(name)}')
    where = f"input {name!r}"
    if tensor["datatype"] != "BYTES":
        raise BadInput(f"{where} has datatype {tensor['datatype']!r}; this model takes text: "
                       'send it as datatype "BYTES" with one string per element')
    parameters = tensor.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise BadInput(f'{where}: "parameters" must be an object, not {bw.json_type(parameters)}')
    if parameters and "binary_data_size" in parameters:
        raise BadInput(f"{where} uses the binary tensor data extension, which this server "
                       'does not support; send the strings in "data" as JSON')
    unused = sorted(set(parameters or ()) - PROTOCOL_PARAMETERS)
    if unused:
        # An input's parameters are codec hints; {"top_k": 1} here would change nothing.
        raise BadInput(f'{where}: "parameters" {unused} would be ignored: an input takes only '
                       f"the codec hints {sorted(PROTOCOL_PARAMETERS)}; pipeline arguments go "
                       'in the request\'s own "parameters"')
    shape = tensor["shape"]
    if not (isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise BadInput(f"{where} has shape {shape!r}; a shape is a list of non-negative "
                       "integers, here [n] for n strings")
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise BadInput(f"{where} has shape {shape}; send the n strings as shape [n] "
                       "(or [n, 1])")
    data = _flat(tensor["data"], shape, f'{where}: "data"')
    if len(data) != math.prod(shape):
        raise BadInput(f"{where} has shape {shape} but {len(data)} data element(s); the "
                       f"shape must match the data: [{len(data)}]")
    if not data:
        raise BadInput(f"{where} is empty; send at least one string")
    if len(data) > max_inputs:
        raise BadInput(f"{where} holds {len(data)} strings; this server takes at most "
                       f"{max_inputs} per request (--max-inputs)")
    for i, text in enumerate(data):
        if not isinstance(text, str):
            raise BadInput(f'{where}: "data"[{i}] is {bw.json_type(text)}; BYTES data are strings, '
                           "one text per element")
        if not text.strip():
            raise BadInput(f'{where}: "data"[{i}] is an empty string; send text to run the '
                           "model on")
    return data


def _parse_outputs(outputs: Any) -> set[str] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise BadInput(f'"outputs" must be a list of {{"name": ...}} objects, not '
                       f"{bw.json_type(outputs)}")
    names = set()
    for i, output in enumerate(outputs):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise BadInput(f'"outputs"[{i}] must be an object with a string "name", e.g. '
                           f'{{"name": "{OUTPUT_NAME}"}}')
        if not _OUTPUT_NAME.fullmatch(output["name"]):
            raise BadInput(f'"outputs"[{i}] asks for {output["name"]!r}; this model\'s output '
                           f'is "{OUTPUT_NAME}" (or "{OUTPUT_NAME}_<i>" per item)')
        parameters = output.get("parameters")
        parameters = {} if parameters is None else parameters
        if not isinstance(parameters, dict):
            raise BadInput(f'"outputs"[{i}]["parameters"] must be an object')
        for extension in ("binary_data", "classification"):
            if parameters.get(extension):
                raise BadInput(f'"outputs"[{i}] asks for the {extension!r} extension, which '
                               "this server does not support (GET /v2 lists none)")
        names.add(output["name"])
    return names


def _parse_request(request: web.Request, body: bytes,
                   max_inputs: int) -> tuple[str | None, list[str], dict, set[str] | None]:
    """-> (id, the input strings, pipeline parameters, requested output names or None)."""
    if "Inference-Header-Content-Length" in request.headers:
        raise BadInput("the binary tensor data extension is not supported; send the whole "
                       "request as JSON")
    payload = bw.load_json_body(body, '{"inputs": [{"name": "text", "shape": [1], '
                                      '"datatype": "BYTES", "data": ["..."]}]}')
    if not isinstance(payload, dict):
        raise BadInput(f"the body must be a JSON object (an inference request), not "
                       f"{bw.json_type(payload)}")
    unknown = sorted(set(payload) - _REQUEST_FIELDS)
    if unknown:
        raise BadInput(f"unknown field(s) {unknown}; an inference request takes "
                       f"{sorted(_REQUEST_FIELDS)}")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadInput(f'"id" must be a string, not {bw.json_type(request_id)}')
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadInput('"inputs" must be a list holding one input tensor: [{"name": "text", '
                       '"shape": [n], "datatype": "BYTES", "data": ["...", ...]}]')
    if len(inputs) != 1:
        raise BadInput(f'"inputs" holds {len(inputs)} tensors; this model takes exactly one '
                       "BYTES tensor of n strings")
    texts = _parse_input(inputs[0], max_inputs)
    parameters = payload.get("parameters")
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, dict):
        raise BadInput(f'"parameters" must be an object of pipeline arguments, not '
                       f"{bw.json_type(parameters)}")
    if parameters.get("binary_data_output"):
        raise BadInput('"binary_data_output" asks for the binary tensor data extension, which '
                       "this server does not support")
    parameters = {k: v for k, v in parameters.items()
                  if k not in PROTOCOL_PARAMETERS and k != "binary_data_output"}
    reserved = sorted(k for k in parameters if k.startswith(bw.RESERVED_PARAMETER_PREFIX))
    if reserved:
        raise BadInput(f"parameter names starting with {bw.RESERVED_PARAMETER_PREFIX!r} are "
                       f"reserved: {reserved}")
    return request_id, texts, parameters, _parse_outputs(payload.get("outputs"))


def _tensor_outputs(results: list[Result]) -> list[dict] | None:
    """Array outputs as FP32/... tensors, or None when the outputs are not all arrays."""
    if not all(isinstance(r.output, NDArray) for r in results):
        return None
    arrays = [r.output.to_numpy() for r in results]
    datatypes = [_DATATYPES.get(f"{a.dtype.kind}{a.dtype.itemsize}") for a in arrays]
    if None in datatypes:
        return None
    # Flat: written as one list without stacking, which copied every answer once more.
    if len({a.shape for a in arrays}) == 1 and len({a.dtype for a in arrays}) == 1:
        return [{"name": OUTPUT_NAME, "datatype": datatypes[0],
                 "shape": [len(arrays), *arrays[0].shape], "data": Flat(arrays)}]
    return [{"name": f"{OUTPUT_NAME}_{i}", "datatype": datatype, "shape": list(a.shape),
             "data": Flat([a])} for i, (a, datatype) in enumerate(zip(arrays, datatypes))]


def _outputs(results: list[Result]) -> list[dict]:
    tensors = _tensor_outputs(results)
    if tensors is not None:
        return tensors
    # Nested records have no tensor type: each item's /predict JSON, as one string.
    return [{"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [len(results)],
             "data": [bw.dump_json(r.output).decode() for r in results]}]


def _select(outputs: list[dict], wanted: set[str] | None) -> list[dict]:
    if wanted is None:
        return outputs
    produced = {o["name"] for o in outputs}
    absent = sorted(wanted - produced - {OUTPUT_NAME})
    if absent:
        raise BadInput(f'"outputs" asks for {absent}; this answer has {sorted(produced)}')
    return [o for o in outputs if o["name"] in wanted
            or (OUTPUT_NAME in wanted and o["name"].startswith(OUTPUT_NAME + "_"))]


async def infer(request: web.Request, name: str) -> web.Response:
    primary = _resolve(request, name)
    if request.content_type not in (bw.JSON_TYPE, "application/octet-stream", ""):
        raise UnsupportedMediaType(f"POST {request.path} reads application/json, not "
                                   f"{request.content_type}")
    body = await bw._read_body(request)
    request_id, texts, parameters, wanted = _parse_request(
        request, body, request.app[bw.CONFIG].max_inputs)
    results, headers = await bw._run(request, texts, parameters, where='"data"')
    payload = {
        "model_name": primary,
        "id": request_id if request_id is not None else request[bw.REQUEST_ID],
        "outputs": _select(_outputs(results), wanted),
    }
    del results
    return await bw.answer_response(request, payload, headers, stream=("outputs",),
                                    json_only=True)


# -- wiring ----------------------------------------------------------------------------------
def register(app: web.Application, *, model_name: str | None = None) -> None:
    """Add the v2 routes to app. Call it after every other route (see the module docstring).

    model_name: answer /v2/models/{model_name} (and report that name) besides the model's
    own basename and full string; for KServe, the InferenceService's name.
    """
    if model_name:
        app[MODEL_NAME] = model_name
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/v2", server_metadata),
        ("GET", "/v2/", server_metadata),
        ("GET", "/v2/health/live", server_live),
        ("GET", "/v2/health/ready", server_ready),
        # Versioned paths first: the name pattern below would otherwise take "x/versions/1".
        # [\s\S] rather than ".": a name holding a newline must still get a v2-shaped 404.
        ("GET", "/v2/models/{name:[\\s\\S]+}/versions/{version}/ready", versioned),
        ("POST", "/v2/models/{name:[\\s\\S]+}/versions/{version}/infer", versioned),
        ("GET", "/v2/models/{name:[\\s\\S]+}/versions/{version}", versioned),
        # .+ : a full model string may hold slashes (a path, an org/name hub id).
        ("GET", "/v2/models/{name:[\\s\\S]+}/ready", model_ready),
        ("POST", "/v2/models/{name:[\\s\\S]+}/infer", infer),
        ("GET", "/v2/models/{name:[\\s\\S]+}", model_metadata),
    ]
    for method, path, handler in routes:
        # Every method: a wrong one is answered 405 in the v2 shape by _v2_route.
        app.router.add_route("*", path, _v2_route(method, handler),
                             expect_handler=bw.expect_later)
    app.router.add_route("*", "/v2/{tail:[\\s\\S]*}", _v2_route("*", unknown_route),
                         expect_handler=bw.expect_later)


__all__ = ["MODEL_NAME", "register"]
