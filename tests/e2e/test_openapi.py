"""GET /openapi.json is true: a valid OpenAPI 3 document, every route the gateway serves is in
it and answers as it says, and schemathesis fuzzing the running server from the served
document finds no 5xx and no answer the document does not describe.

The fuzzed operations come from the served document itself, so a route added to the
document is fuzzed without touching this file; a route served but not documented fails
``test_every_served_route_is_documented``.
"""

from __future__ import annotations

from types import SimpleNamespace

import hypothesis
import msgpack
import orjson
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.app import OPEN_ROUTES, create_app
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.openapi import openapi_document

#: Every (method, path) the gateway serves (HEAD on GET routes is aiohttp's, implied). The
#: KServe v2 routes take every method (a wrong one is their 405): "*" here, one documented.
SERVED_ROUTES = {
    ("POST", "/"), ("POST", "/predict"), ("POST", "/v1/embeddings"), ("GET", "/v1/models"),
    ("GET", "/v1/models/{name}"), ("GET", "/health"),
    ("GET", "/ready"), ("GET", "/info"), ("GET", "/metrics"), ("GET", "/openapi.json"),
    ("*", "/v2"), ("*", "/v2/"), ("*", "/v2/health/live"), ("*", "/v2/health/ready"),
    ("*", "/v2/models/{name}"), ("*", "/v2/models/{name}/ready"),
    ("*", "/v2/models/{name}/infer"), ("*", "/v2/models/{name}/versions/{version}"),
    ("*", "/v2/models/{name}/versions/{version}/ready"),
    ("*", "/v2/models/{name}/versions/{version}/infer"),
    ("*", "/v2/{tail}"),  # the v2-shaped 404 for every other /v2/ path: not an operation
}
CATCH_ALL = {"/v2/{tail}"}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
API_KEY = "sekrit-key"
#: Hypothesis examples per operation in schemathesis's fuzzing phase (positive and negative
#: together), on top of its coverage phase (boundary values, wrong types and media types,
#: unsupported methods). Bounded so this module takes well under a minute on two cores.
FUZZ_EXAMPLES = 150
#: Fixed, so a run is reproducible; change it (or raise FUZZ_EXAMPLES) to explore further.
FUZZ_SEED = 4


# -- msgpack for schemathesis ------------------------------------------------------------------
@schemathesis.serializer("application/msgpack")
def _msgpack_body(ctx, value):
    return msgpack.packb(_msgpack_safe(value), use_bin_type=True)


@schemathesis.deserializer("application/msgpack")
def _msgpack_answer(ctx, response):
    return msgpack.unpackb(response.content, raw=False)


def _msgpack_safe(value):
    """JSON integers are unbounded, msgpack's are 64-bit: send the others as floats."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return float(value)
    if isinstance(value, list):
        return [_msgpack_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _msgpack_safe(v) for k, v in value.items()}
    return value


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(fill_mask_server):
    """The session's shared tiny fill-mask server: the document does not depend on how many
    workers serve it, and nothing here reads counters another module's requests move."""
    return fill_mask_server


@pytest.fixture(scope="module")
def model_name(server, tiny_model_dir) -> str:
    """The name the v2 routes answer to: the model directory's basename."""
    return tiny_model_dir.name


@pytest.fixture(scope="module")
def document(server) -> dict:
    response = requests.get(server.url + "/openapi.json", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()


@pytest.fixture(scope="module")
def loaded(server, document):
    """The served document as schemathesis reads it, to validate probe answers with."""
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=server.url)
    return schema


def operations(document: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items()
            for method in item if method in HTTP_METHODS}


def refs(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def resolve(document: dict, ref: str):
    assert ref.startswith("#/"), f"only local references are used: {ref}"
    node = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"dangling $ref {ref}"
        node = node[part]
    return node


# -- (a) the document itself ------------------------------------------------------------------
def test_document_is_valid_openapi(document):
    # The official OpenAPI 3.0 JSON Schema, as schemathesis ships it.
    from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR

    assert document["openapi"].startswith("3.0.")
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}"
              for e in OPENAPI_30_VALIDATOR.iter_errors(document)]
    assert not errors, "\n".join(errors[:20])
    for ref in refs(document):
        resolve(document, ref)
    ids = [op["operationId"] for item in document["paths"].values()
           for method, op in item.items() if method in HTTP_METHODS]
    assert len(ids) == len(set(ids)), f"duplicate operationIds: {ids}"
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            assert op.get("responses"), f"{method} {path} documents no response"
            for status, response in op["responses"].items():
                response = resolve(document, response["$ref"]) if "$ref" in response else response
                if not status.startswith(("4", "5")) or (status == "503"
                                                         and path.endswith("ready")):
                    continue  # readiness probes answer 503 with their own body
                # batchwire's error shape, or on /v2 the protocol's (but for the 401, which
                # the middleware answers before any route runs).
                shape = "V2Error" if path.startswith("/v2") and status != "401" else "Error"
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": f"#/components/schemas/{shape}"}, (method, path,
                                                                             status)


def test_document_matches_the_served_config(document):
    """--max-inputs and --max-embedding-inputs bound the lists; no --api-key, no security
    scheme."""
    config = GatewayConfig()
    assert document == openapi_document(config)
    inputs = document["components"]["schemas"]["PredictRequest"]["properties"]["inputs"]
    assert inputs["oneOf"][2]["maxItems"] == config.max_inputs == 256
    texts = document["components"]["schemas"]["EmbeddingsRequest"]["properties"]["input"]
    assert texts["oneOf"][1]["maxItems"] == config.max_embedding_inputs == 2048
    assert "security" not in document and "securitySchemes" not in document["components"]


def test_every_served_route_is_documented(document):
    """The app's router, as create_app builds it, and the document name the same routes."""
    app = create_app(GatewayConfig(), SimpleNamespace(metrics=GatewayMetrics()))
    served = {(route.method, route.resource.canonical) for route in app.router.routes()
              if route.method != "HEAD"}
    assert served == SERVED_ROUTES, "update SERVED_ROUTES and gateway/openapi.py together"
    documented = operations(document)
    for method, path in served - {("*", p) for p in CATCH_ALL}:
        if method == "*":
            assert len(document["paths"].get(path, {})) == 1, f"{path}: document its method"
        else:
            assert (method, path) in documented, f"{method} {path} is not documented"
    assert {p for _, p in documented} == {p for _, p in served} - CATCH_ALL


def test_api_key_document():
    document = openapi_document(GatewayConfig(api_key=API_KEY))
    assert API_KEY not in str(document)
    assert document["security"] == [{"bearerAuth": []}]
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for method, path in operations(document):
        op = document["paths"][path][method.lower()]
        if path in OPEN_ROUTES:
            assert op["security"] == [] and "401" not in op["responses"], path
        else:
            assert "security" not in op, path  # the document-wide requirement applies
            assert op["responses"]["401"] == {"$ref": "#/components/responses/Unauthorized"}


# -- (a) every route answers as documented ----------------------------------------------------
MASKED = "paris is the [MASK] of france"
DEFAULTS = GatewayConfig()  # the served config: serve's defaults
V2_INFER = "/v2/models/{name}/infer"


def v2_body(data, shape=None, **extra):
    shape = [len(data)] if shape is None else shape
    return {"json": {"inputs": [{"name": "text", "shape": shape, "datatype": "BYTES",
                                 "data": data}], **extra}}


PROBES = [
    # (method, path as documented ({name}: the served model's), request kwargs, status)
    ("GET", "/health", {}, 200),
    ("GET", "/ready", {}, 200),
    ("GET", "/info", {}, 200),
    ("GET", "/metrics", {}, 200),
    ("GET", "/openapi.json", {}, 200),
    ("POST", "/", {"data": MASKED.encode()}, 200),  # curl -d: x-www-form-urlencoded
    ("POST", "/", {"data": MASKED.encode(), "headers": {"Content-Type": "text/plain"}}, 200),
    ("POST", "/", {"json": {"inputs": MASKED, "parameters": {"top_k": 2}}}, 200),
    ("POST", "/", {"data": msgpack.packb({"inputs": [MASKED]}),
                   "headers": {"Content-Type": "application/msgpack",
                               "Accept": "application/msgpack"}}, 200),
    ("POST", "/", {"data": b"no mask here", "headers": {"Content-Type": "text/plain"}}, 400),
    ("POST", "/", {"data": b"\xff\xfe", "headers": {"Content-Type": "text/plain"}}, 400),
    ("POST", "/", {"data": b" \n", "headers": {"Content-Type": "text/plain"}}, 400),
    ("POST", "/", {"data": b"x [MASK]", "headers": {"Content-Type": "image/png"}}, 415),
    ("POST", "/", {"data": MASKED.encode(), "headers": {"X-Timeout-Ms": "-5"}}, 400),
    ("POST", "/", {"data": MASKED.encode(), "headers": {"X-Timeout-Ms": "0.001"}}, 504),
    ("POST", "/", {"data": b"a [MASK]" * (DEFAULTS.max_body_bytes // 8 + 1)}, 413),
    ("POST", "/predict", {"json": {"inputs": [MASKED, "the [MASK] sat"]}}, 200),
    ("POST", "/predict", {"json": {"inputs": MASKED, "parameters": None}}, 200),
    ("POST", "/predict", {"json": {"inputs": MASKED, "parameters": {"no_such": 1}}}, 422),
    ("POST", "/predict", {"json": {"inputs": MASKED, "parameters": []}}, 400),
    ("POST", "/predict", {"json": {"inputs": MASKED, "extra": 1}}, 400),
    ("POST", "/predict", {"json": {"inputs": []}}, 400),
    ("POST", "/predict", {"json": {"inputs": ["x [MASK]"] * (DEFAULTS.max_inputs + 1)}}, 400),
    ("POST", "/predict", {"data": b"x [MASK]", "headers": {"Content-Type": "text/plain"}}, 415),
    ("POST", "/v1/embeddings", {"json": {"input": ["a cat", "a dog"]}}, 400),  # fill-mask model
    ("POST", "/v1/embeddings", {"json": {"input": "a", "encoding_format": "int8"}}, 400),
    ("POST", "/v1/embeddings", {"json": {}}, 400),
    ("GET", "/v1/models", {}, 200),
    ("GET", "/v1/models/{name}", {}, 200),
    ("GET", "/v2", {}, 200),
    ("GET", "/v2/", {}, 200),
    ("GET", "/v2/health/live", {}, 200),
    ("GET", "/v2/health/ready", {}, 200),
    ("GET", "/v2/models/{name}", {}, 200),
    ("GET", "/v2/models/{name}/ready", {}, 200),
    ("POST", V2_INFER, v2_body([MASKED, "the [MASK] sat"]), 200),
    ("POST", V2_INFER, v2_body([[MASKED]], [1, 1], parameters={"top_k": 2}), 200),
    ("POST", V2_INFER, v2_body([MASKED], [2]), 400),
    ("POST", V2_INFER, v2_body(["no mask"]), 400),
    ("POST", V2_INFER, v2_body([MASKED], parameters={"no_such": 1}), 422),
    ("POST", V2_INFER, {"data": b"x", "headers": {"Content-Type": "text/plain"}}, 415),
    ("POST", V2_INFER, {**v2_body([MASKED]), "headers": {"X-Timeout-Ms": "0.001"}}, 504),
    ("GET", "/v2/models/{name}/versions/{version}", {}, 404),
    ("GET", "/v2/models/{name}/versions/{version}/ready", {}, 404),
    ("POST", "/v2/models/{name}/versions/{version}/infer", v2_body([MASKED]), 404),
]


@pytest.mark.parametrize("method,path,kwargs,status", PROBES,
                         ids=[f"{m} {p} {s} #{i}" for i, (m, p, _, s) in enumerate(PROBES)])
def test_route_answers_as_documented(server, loaded, model_name, method, path, kwargs,
                                     status):
    url = server.url + path.format(name=model_name, version="1")
    response = requests.request(method, url, timeout=30, **kwargs)
    assert response.status_code == status, response.text[:500]
    # Status, content type, body and headers all as the document says.
    loaded[path][method].validate_response(response)
    if status >= 400:
        assert set(response.json()) == {"error"} and response.headers["X-Request-Id"]


def test_an_unknown_model_name_is_a_documented_404(server, loaded):
    response = requests.get(server.url + "/v1/models/no-such-model", timeout=30)
    assert response.status_code == 404, response.text
    assert "unknown model 'no-such-model'" in response.json()["error"]["message"]
    loaded["/v1/models/{name}"]["GET"].validate_response(response)


#: Pipeline parameters of the wrong type or range, as the fuzzer found them: the client's
#: mistake, so 400/422 as documented, never the 500 of a model that failed.
BAD_PARAMETERS = [
    {"tokenizer_kwargs": ["abcd"]},     # not an object
    {"top_k": -1},                      # out of range
    {"top_k": 10**9},
    {"targets": "a", "top_k": "2"},     # not an integer, with targets
]


@pytest.mark.parametrize("parameters", BAD_PARAMETERS, ids=lambda p: str(p))
def test_bad_pipeline_parameters_are_client_errors(server, loaded, parameters):
    response = requests.post(server.url + "/predict", timeout=30,
                             json={"inputs": MASKED, "parameters": parameters})
    assert response.status_code in (400, 422), response.text
    loaded["/predict"]["POST"].validate_response(response)


def test_unknown_model_is_404(server, loaded):
    for method, path in (("GET", "/v2/models/{name}"), ("GET", "/v2/models/{name}/ready"),
                         ("POST", V2_INFER)):
        response = requests.request(method, server.url + path.format(name="no-such-model"),
                                    timeout=10, **v2_body([MASKED]))
        assert response.status_code == 404, response.text
        loaded[path][method].validate_response(response)


@pytest.mark.parametrize("method,path", [
    ("GET", "/nope"), ("DELETE", "/predict"), ("GET", "/predict"), ("POST", "/health"),
    ("GET", "/v2/nope"), ("POST", "/v2/health/live"), ("PUT", "/v2/models/x/infer")])
def test_undocumented_method_or_path_is_a_json_error(server, document, method, path):
    response = requests.request(method, server.url + path, timeout=10)
    documented = document["paths"].get(path.replace("/x/", "/{name}/"), {})
    expected = 405 if documented else 404
    assert response.status_code == expected
    error = response.json()["error"]
    if path.startswith("/v2"):
        assert isinstance(error, str)  # the protocol's shape
    else:
        assert error["code"] == ("method_not_allowed" if documented else "not_found")
    if expected == 405:
        allowed = {m.strip().lower() for m in response.headers["Allow"].split(",")}
        assert set(documented) <= allowed


def test_api_key_server_answers_as_documented(start_server, tiny_model_dir):
    server = start_server(["--model", str(tiny_model_dir), "--api-key", API_KEY])
    key = {"Authorization": f"Bearer {API_KEY}"}
    assert requests.get(server.url + "/openapi.json", timeout=10).status_code == 401
    document = requests.get(server.url + "/openapi.json", headers=key, timeout=10).json()
    assert document == openapi_document(GatewayConfig(api_key=API_KEY))
    schema = schemathesis.openapi.from_dict(document)
    bodies = {"/": {"data": MASKED.encode()}, "/predict": {"json": {"inputs": MASKED}},
              "/v1/embeddings": {"json": {"input": "a"}}, V2_INFER: v2_body([MASKED])}
    for method, path in sorted(operations(document)):
        url = server.url + path.format(name=tiny_model_dir.name, version="1")
        for headers in ({}, {"Authorization": "Bearer wrong"}, key):
            response = requests.request(method, url, headers=headers, timeout=30,
                                        **bodies.get(path, {}))
            if headers is key or path in OPEN_ROUTES:
                assert response.status_code != 401, (method, path)
            else:
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["WWW-Authenticate"] == "Bearer"
            schema[path][method].validate_response(response)


# -- (b) fuzzing from the served document -----------------------------------------------------
def no_server_error(ctx, response, case):
    """not_a_server_error, except a 504 for a deadline the request itself set (X-Timeout-Ms)
    once that much time really passed: that 504 is the documented answer, not a fault."""
    if response.status_code == 504:
        try:
            chosen_ms = float(response.request.headers.get("X-Timeout-Ms", "nan"))
        except ValueError:
            chosen_ms = float("nan")
        # Within a millisecond: a 504 for X-Timeout-Ms 1.0 came back to the client in under
        # 0.99 ms once, on a clean-clone run (the client's clock and the gateway's are not
        # the same measure of a request that short). Early by more is a fault.
        if response.elapsed * 1000.0 >= chosen_ms * 0.99 - 1.0:  # False for nan
            error = orjson.loads(response.content)["error"]
            if isinstance(error, str):  # the /v2 routes' error shape: the message alone
                assert "time budget" in error or "deadline" in error, error
            else:
                assert error["code"] == "deadline_exceeded", error
            return None
    return not_a_server_error(ctx, response, case)


FUZZ_CHECKS = [no_server_error, status_code_conformance, content_type_conformance,
               response_headers_conformance, response_schema_conformance,
               negative_data_rejection]


def _with_mask(value):
    """The same body with " [MASK]" after its non-blank texts (in "inputs", and in a v2
    tensor's "data"): the tiny model is fill-mask, and a text without a mask never gets past
    the pipeline's own check (400)."""
    if isinstance(value, str):
        return value + " [MASK]" if value.strip() else value
    if isinstance(value, list):
        return [_with_mask(v) for v in value]
    if isinstance(value, dict):
        return {k: _with_mask(v) if k in ("inputs", "data") else v for k, v in value.items()}
    return value


def _count_strings(data) -> int:
    return sum(_count_strings(d) for d in data) if isinstance(data, list) else 1


def _with_matching_shape(body):
    """A v2 request whose tensor shape, valid as it is, is replaced by the one its data
    have ([n]): random shapes and data almost never agree, and then it is 400 at once."""
    try:
        tensor = body["inputs"][0]
        valid = (isinstance(tensor["shape"], list) and 1 <= len(tensor["shape"]) <= 2
                 and all(type(d) is int and d >= 0 for d in tensor["shape"]))
        count = _count_strings(tensor["data"]) if isinstance(tensor["data"], list) else None
    except (KeyError, IndexError, TypeError):
        return body
    if not valid or count is None:
        return body
    return {**body, "inputs": [{**tensor, "shape": [count]}, *body["inputs"][1:]]}


#: Names the fill-mask pipeline (and the worker's token-length check) read, with any JSON
#: values: random names alone only ever reach the 422 for unknown parameters.
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=3),
    max_leaves=6)
_FILL_MASK_PARAMETERS = st.dictionaries(
    st.sampled_from(["top_k", "targets", "tokenizer_kwargs", "truncation"]), _JSON, max_size=2)


def _body_variants(body):
    """The body as generated; with masks added; or, when it has inputs and its parameters
    are valid as they are, with masks and fill-mask parameters of any value. None of these
    changes whether the body is valid, so negative cases stay negative."""
    masked = _with_matching_shape(_with_mask(body))
    variants = [st.just(body), st.just(masked)]
    if (isinstance(body, dict) and "inputs" in body
            and isinstance(body.get("parameters"), (dict, type(None)))):
        variants.append(_FILL_MASK_PARAMETERS.map(
            lambda parameters: {**masked, "parameters": parameters}))
    return st.one_of(variants)


def _with_longer_deadline(headers):
    """The same headers with a tiny positive X-Timeout-Ms raised by a second: the fuzzer
    favours tiny numbers, and those all end in 504 before a worker sees the request."""
    raw = headers.get("X-Timeout-Ms")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return headers
    if not 0 < value < 1000:
        return headers
    longer = value + 1000
    return {**headers, "X-Timeout-Ms": repr(longer) if isinstance(raw, str) else longer}


@pytest.fixture
def served_schema(server, model_name):
    # from_dict, not from_url: schemathesis skips the operation that served the document.
    schema = schemathesis.openapi.from_dict(
        requests.get(server.url + "/openapi.json", timeout=10).json())
    schema.config.update(base_url=server.url, request_timeout=30)
    schema.config.seed = FUZZ_SEED
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=FUZZ_EXAMPLES)

    # Each generated body, header set and model name goes out as is or tweaked as above, so
    # the fuzzer reaches the model about as often as it stops at the gateway's checks.
    @schema.hook
    def flatmap_body(ctx, body):
        return _body_variants(body)

    @schema.hook
    def flatmap_headers(ctx, headers):
        return st.sampled_from([headers, _with_longer_deadline(headers or {})])

    @schema.hook
    def flatmap_path_parameters(ctx, parameters):
        # The served model's name, or the generated one (404 unknown model).
        if not parameters or "name" not in parameters:
            return st.just(parameters)
        return st.sampled_from([parameters, {**parameters, "name": model_name}])

    return schema


fuzzed = schemathesis.pytest.from_fixture("served_schema")


@fuzzed.parametrize()
@hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_fuzz_from_served_document(case):
    case.call_and_validate(checks=FUZZ_CHECKS)
