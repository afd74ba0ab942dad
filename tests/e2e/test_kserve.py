"""The KServe Open Inference Protocol (v2) routes (gateway/kserve.py) and deploy/kserve/.

The routes are checked on real `batchwire serve` processes (the tiny fill-mask BERT, and the
same model served as feature-extraction) against JSON schemas written from the protocol's
REST spec (kserve/open-inference-protocol: inference_rest.md, open_inference_rest.yaml),
and their answers against batchwire's own /predict for the same inputs. What needs a
server with no worker, or register()'s model_name, runs in process on a stub broker.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import aiohttp
import jsonschema
import numpy as np
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from gateway import kserve
from protocol.messages import Ready

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kserve"

# -- the protocol's JSON schemas -----------------------------------------------------------
# Written from the spec's $-definitions. additionalProperties: false on what the spec fully
# enumerates, so a stray field in an answer fails here.
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES"]
PARAMETERS = {"type": "object", "additionalProperties": {
    "type": ["string", "number", "boolean"]}}
# Row-major, flat or nested: an array of numbers, strings, booleans or such arrays.
TENSOR_DATA = {"type": "array", "items": {
    "anyOf": [{"$ref": "#/$defs/tensor_data"}, {"type": ["number", "string", "boolean"]}]}}
METADATA_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "datatype": {"enum": DATATYPES},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
    },
}
SERVER_METADATA = {
    "type": "object",
    "required": ["name", "version", "extensions"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "string"},
        "extensions": {"type": "array", "items": {"type": "string"}},
    },
}
MODEL_METADATA = {
    "type": "object",
    "required": ["name", "platform", "inputs", "outputs"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": METADATA_TENSOR},
        "outputs": {"type": "array", "items": METADATA_TENSOR},
    },
}
INFERENCE_RESPONSE = {
    "$defs": {"tensor_data": TENSOR_DATA},
    "type": "object",
    "required": ["model_name", "outputs"],
    "additionalProperties": False,
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "parameters": PARAMETERS,
        "outputs": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["name", "shape", "datatype", "data"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "datatype": {"enum": DATATYPES},
                "parameters": PARAMETERS,
                "data": {"$ref": "#/$defs/tensor_data"},
            },
        }},
    },
}
ERROR = {"type": "object", "required": ["error"], "additionalProperties": False,
         "properties": {"error": {"type": "string", "minLength": 1}}}
SERVER_LIVE = {"type": "object", "required": ["live"], "additionalProperties": False,
               "properties": {"live": {"type": "boolean"}}}
SERVER_READY = {"type": "object", "required": ["ready"], "additionalProperties": False,
                "properties": {"ready": {"type": "boolean"}}}
MODEL_READY = {"type": "object", "required": ["name", "ready"], "additionalProperties": False,
               "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}}


def check(schema: dict, body: Any) -> Any:
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)
    return body


def check_tensor(output: dict) -> np.ndarray:
    """The output's data as an array of its shape (which must hold exactly that much)."""
    data = np.asarray(output["data"], dtype=np.float64 if output["datatype"] != "BYTES"
                      else object).reshape(-1)
    assert data.size == math.prod(output["shape"]), output["shape"]
    return data.reshape(output["shape"])


# -- HTTP ------------------------------------------------------------------------------------
async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as resp:
        return resp.status, json.loads(await resp.read())


async def post(session: aiohttp.ClientSession, url: str, **kwargs) -> tuple[int, Any]:
    async with session.post(url, **kwargs) as resp:
        return resp.status, json.loads(await resp.read())


def bytes_input(texts: list, shape: list[int] | None = None, **extra) -> dict:
    return {"name": "text", "shape": shape or [len(texts)], "datatype": "BYTES",
            "data": texts, **extra}


FILL_MASK_TEXTS = ["paris is the [MASK] of france", "the cat sat on the [MASK]",
                   "i would like a cup of [MASK] please"]


@pytest.fixture(scope="module")
def fill_mask(fill_mask_server):
    return fill_mask_server


@pytest.fixture(scope="module")
def features(features_server):
    return features_server


# -- health and metadata ---------------------------------------------------------------------
async def test_health_and_server_metadata(fill_mask):
    from importlib.metadata import version

    async with aiohttp.ClientSession() as session:
        status, body = await get(session, fill_mask.url + "/v2/health/live")
        assert (status, check(SERVER_LIVE, body)) == (200, {"live": True})
        status, body = await get(session, fill_mask.url + "/v2/health/ready")
        assert (status, check(SERVER_READY, body)) == (200, {"ready": True})
        for path in ("/v2", "/v2/"):
            status, body = await get(session, fill_mask.url + path)
            assert status == 200, body
            assert check(SERVER_METADATA, body) == {
                "name": "batchwire", "version": version("batchwire"), "extensions": []}


async def test_model_metadata_and_ready(fill_mask, tiny_model_dir):
    name = tiny_model_dir.name
    async with aiohttp.ClientSession() as session:
        # The basename, and the full model string (a path: its slashes percent-encoded).
        for alias in (name, quote(str(tiny_model_dir), safe="")):
            status, body = await get(session, f"{fill_mask.url}/v2/models/{alias}")
            assert status == 200, body
            assert check(MODEL_METADATA, body) == {
                "name": name, "versions": [], "platform": "huggingface-transformers",
                "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": "output", "datatype": "BYTES", "shape": [-1]}],
            }
            status, body = await get(session, f"{fill_mask.url}/v2/models/{alias}/ready")
            assert (status, check(MODEL_READY, body)) == (200, {"name": name, "ready": True})
        for path in ("/v2/models/no-such-model", "/v2/models/no-such-model/ready"):
            status, body = await get(session, fill_mask.url + path)
            assert status == 404, body
            assert name in check(ERROR, body)["error"]
        status, body = await get(session, f"{fill_mask.url}/v2/models/{name}/versions/1")
        assert status == 404 and "unversioned" in check(ERROR, body)["error"]


# -- inference -------------------------------------------------------------------------------
async def test_fill_mask_infer_matches_predict(fill_mask, tiny_model_dir):
    name = tiny_model_dir.name
    url = f"{fill_mask.url}/v2/models/{name}/infer"
    async with aiohttp.ClientSession() as session:
        status, body = await post(session, url, json={
            "id": "req-42", "inputs": [bytes_input(FILL_MASK_TEXTS)]})
        assert status == 200, body
        check(INFERENCE_RESPONSE, body)
        assert body["model_name"] == name and body["id"] == "req-42"
        assert "model_version" not in body
        [output] = body["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("output", "BYTES", [3])
        answers = [json.loads(item) for item in check_tensor(output)]
        status, expected = await post(session, fill_mask.url + "/predict",
                                      json={"inputs": FILL_MASK_TEXTS})
        assert status == 200, expected
        for text, candidates, want in zip(FILL_MASK_TEXTS, answers, expected):
            assert len(candidates) == 5
            for candidate in candidates:
                assert all(word in candidate["sequence"]
                           for word in text.split() if word != "[MASK]"), (text, candidate)
            assert [c["sequence"] for c in candidates] == [w["sequence"] for w in want]
            assert [c["token_str"] for c in candidates] == [w["token_str"] for w in want]
            for c, w in zip(candidates, want):
                assert c["score"] == pytest.approx(w["score"], rel=1e-5, abs=1e-7)

        # Request parameters are pipeline arguments; [n, 1] and nested data are the same
        # n strings; no "id" answers batchwire's request id; "outputs" may name "output".
        status, body = await post(session, url, headers={"X-Request-Id": "kserve-test-1"}, json={
            # MLServer's codecs put their content_type hint on the input too.
            "inputs": [bytes_input([[t] for t in FILL_MASK_TEXTS[:2]], shape=[2, 1],
                                   parameters={"content_type": "str"})],
            "parameters": {"top_k": 2, "content_type": "str"},
            "outputs": [{"name": "output"}]})
        assert status == 200, body
        assert check(INFERENCE_RESPONSE, body)["id"] == "kserve-test-1"
        assert [len(json.loads(item)) for item in body["outputs"][0]["data"]] == [2, 2]


async def test_feature_extraction_infer_matches_predict(features, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    name = tiny_model_dir.name
    url = f"{features.url}/v2/models/{name}/infer"
    same = ["red apple", "blue sky", "green tea"]
    ragged = ["hello", "the quick brown fox jumps", "a cup of tea"]
    lengths = {t: len(tokenizer(t)["input_ids"]) for t in same + ragged}
    assert len({lengths[t] for t in same}) == 1 and len({lengths[t] for t in ragged}) == 3
    async with aiohttp.ClientSession() as session:
        status, body = await get(session, f"{features.url}/v2/models/{name}")
        assert status == 200, body
        assert check(MODEL_METADATA, body)["outputs"] == [
            {"name": "output", "datatype": "FP32", "shape": [-1, 1, -1, -1]}]

        # One length: one [n, 1, tokens, hidden] FP32 tensor.
        status, body = await post(session, url, json={"inputs": [bytes_input(same)]})
        assert status == 200, body
        [output] = check(INFERENCE_RESPONSE, body)["outputs"]
        assert output["name"] == "output" and output["datatype"] == "FP32"
        assert output["shape"] == [3, 1, lengths["red apple"], 32]
        status, expected = await post(session, features.url + "/predict", json={"inputs": same})
        assert status == 200, expected
        np.testing.assert_allclose(check_tensor(output), np.asarray(expected), rtol=0,
                                   atol=1e-6)

        # Different lengths: one tensor per item, each of its own shape, padding trimmed.
        status, body = await post(session, url, json={"id": "ragged",
                                                      "inputs": [bytes_input(ragged)]})
        assert status == 200, body
        outputs = check(INFERENCE_RESPONSE, body)["outputs"]
        assert [o["name"] for o in outputs] == ["output_0", "output_1", "output_2"]
        status, expected = await post(session, features.url + "/predict",
                                      json={"inputs": ragged})
        assert status == 200, expected
        for text, output, want in zip(ragged, outputs, expected):
            assert output["datatype"] == "FP32"
            assert output["shape"] == [1, lengths[text], 32]
            np.testing.assert_allclose(check_tensor(output), np.asarray(want), rtol=0,
                                       atol=1e-6)


BAD_REQUESTS = {
    "wrong datatype": ({"inputs": [{**bytes_input(["a [MASK]"]), "datatype": "FP32"}]},
                       "BYTES"),
    "shape/data mismatch": ({"inputs": [bytes_input(["a [MASK]", "b [MASK]"], shape=[3])]},
                            "shape"),
    "no inputs": ({"inputs": []}, "inputs"),
    "inputs missing": ({"id": "x"}, "inputs"),
    "two inputs": ({"inputs": [bytes_input(["a [MASK]"]), bytes_input(["b [MASK]"])]},
                   "exactly one"),
    "non-string data": ({"inputs": [bytes_input(["a [MASK]", 7])]}, "string"),
    "empty string": ({"inputs": [bytes_input(["  "])]}, "empty"),
    "2-d shape": ({"inputs": [bytes_input(["a", "b", "c", "d"], shape=[2, 2])]}, "[n]"),
    "unknown output": ({"inputs": [bytes_input(["a [MASK]"])],
                        "outputs": [{"name": "logits"}]}, "output"),
    "binary extension": ({"inputs": [bytes_input(["a [MASK]"])],
                          "outputs": [{"name": "output", "parameters": {"binary_data": True}}]},
                         "binary_data"),
    "non-string id": ({"id": 5, "inputs": [bytes_input(["a [MASK]"])]}, "id"),
    # Nesting that contradicts the shape (both were taken, flattened).
    "rows for shape [n]": ({"inputs": [bytes_input([["a [MASK]"], ["b [MASK]"]], shape=[2])]},
                           "nests otherwise than the shape [2]"),
    "empty lists nested": ({"inputs": [bytes_input([[[]], "a [MASK]"], shape=[1])]},
                           "nests otherwise than the shape [1]"),
    "pipeline argument on the input": (
        {"inputs": [bytes_input(["a [MASK]"], parameters={"top_k": 1})]},
        "request's own \"parameters\""),
}


async def test_infer_errors_answer_the_v2_error_shape(fill_mask, tiny_model_dir):
    url = f"{fill_mask.url}/v2/models/{tiny_model_dir.name}/infer"
    async with aiohttp.ClientSession() as session:
        for case, (payload, hint) in BAD_REQUESTS.items():
            status, body = await post(session, url, json=payload)
            assert status == 400, (case, body)
            assert hint in check(ERROR, body)["error"], (case, body)
        status, body = await post(session, url, data=b"{not json",
                                  headers={"Content-Type": "application/json"})
        assert status == 400 and "JSON" in check(ERROR, body)["error"]
        # One string of several the pipeline cannot take: the error says which.
        status, body = await post(session, url, json={
            "inputs": [bytes_input(["a [MASK]", "no mask here"])]})
        assert status == 400 and check(ERROR, body)["error"].startswith('"data"[1]: '), body
        # The pipeline refuses the parameter: 422 from the worker, in the v2 shape.
        status, body = await post(session, url, json={
            "inputs": [bytes_input(["a [MASK]"])], "parameters": {"top_k": "many"}})
        assert status == 422 and "top_k" in check(ERROR, body)["error"], body
        status, body = await post(session, f"{fill_mask.url}/v2/models/nope/infer",
                                  json={"inputs": [bytes_input(["a [MASK]"])]})
        assert status == 404 and "nope" in check(ERROR, body)["error"]
        async with session.get(url) as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
            check(ERROR, await resp.json())
        status, body = await get(session, fill_mask.url + "/v2/repository/index")
        assert status == 404 and "/v2/models/{name}/infer" in check(ERROR, body)["error"]


# -- in process: no worker yet, register(model_name=...) -------------------------------------
async def test_names_and_readiness_without_a_server():
    from gateway.api_keys import ApiKeys
    from gateway.app import API_KEYS, BROKER, CONFIG, error_middleware
    from gateway.config import GatewayConfig

    broker = SimpleNamespace(workers={}, draining=False)
    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = GatewayConfig()
    app[API_KEYS] = ApiKeys()
    app[BROKER] = broker
    kserve.register(app, model_name="my-isvc")
    async with TestClient(TestServer(app)) as client:
        async def call(path: str) -> tuple[int, Any]:
            resp = await client.get(path)
            return resp.status, await resp.json()

        # No worker has announced a model yet: nothing is ready, metadata is a v2 503.
        assert await call("/v2/health/ready") == (503, {"ready": False})
        assert await call("/v2/models/my-isvc/ready") == (503, {"name": "my-isvc",
                                                                  "ready": False})
        status, body = await call("/v2/models/my-isvc")
        assert status == 503 and check(ERROR, body)
        assert (await call("/v2/health/live")) == (200, {"live": True})

        info = Ready("w0", 1, "/srv/models/bert-base-uncased", "fill-mask", "cpu", 4, 8)
        broker.workers[b"w0"] = SimpleNamespace(info=info)
        for alias in ("my-isvc", "bert-base-uncased", quote(info.model, safe="")):
            status, body = await call(f"/v2/models/{alias}")
            assert status == 200 and check(MODEL_METADATA, body)["name"] == "my-isvc"
        assert await call("/v2/models/bert-base-uncased/ready") == (200, {"name": "my-isvc",
                                                                            "ready": True})
        broker.draining = True
        assert await call("/v2/health/ready") == (503, {"ready": False})
        assert (await call("/v2/models/my-isvc/ready"))[0] == 503


# -- deploy/kserve ---------------------------------------------------------------------------
def _load(name: str) -> dict:
    documents = list(yaml.safe_load_all((DEPLOY / name).read_text()))
    assert len(documents) == 1, f"{name} should hold one manifest"
    return documents[0]


async def test_kserve_manifests_reference_each_other():
    from gateway.app import create_app
    from gateway.broker import Broker
    from gateway.config import GatewayConfig, parse

    runtime = _load("servingruntime.yaml")
    service = _load("inferenceservice.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1",
                                                        "ServingRuntime")
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1",
                                                        "InferenceService")
    spec = runtime["spec"]
    model = service["spec"]["predictor"]["model"]
    # The InferenceService names this runtime, a format it supports, a protocol it speaks.
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert spec["protocolVersions"] == ["v2"]
    assert model["protocolVersion"] in spec["protocolVersions"]
    assert model["storageUri"].split("://", 1)[0] in {"s3", "gs", "pvc", "hf", "https", "azure"}

    [container] = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe looks for
    assert container["command"] == ["batchwire"]
    command, config = parse(container["args"], environ={})  # batchwire's own CLI parser
    assert command == "serve"
    # KServe's storage initializer puts storageUri's files in /mnt/models.
    assert config.workers.model == "/mnt/models"
    assert config.gateway.host == "0.0.0.0"
    port = config.gateway.port
    assert port == 8080
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(port)

    # Probe and metrics paths are routes batchwire serves (on GET, not the /v2 catch-all).
    app = create_app(GatewayConfig(), Broker("inproc://kserve-manifest-test", max_queue=1))
    if not any(r.canonical == "/v2/health/ready" for r in app.router.resources()):
        kserve.register(app)  # until create_app wires it
    paths = [spec["annotations"]["prometheus.kserve.io/path"]]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port
        paths.append(container[probe]["httpGet"]["path"])
    assert paths[1:] == ["/v2/health/ready", "/v2/health/live"]
    for path in paths:
        match = await app.router.resolve(make_mocked_request("GET", path, app=app))
        assert match.http_exception is None, path
        assert match.route.resource.canonical == path, path


async def test_model_name_flag_and_open_probes_with_an_api_key(start_server, tiny_model_dir):
    """KServe passes --model-name {{.Name}}; its probes carry no API key."""
    server = start_server(["--model", str(tiny_model_dir), "--model-name", "bert-x",
                           "--api-key", "k"])
    auth = {"Authorization": "Bearer k"}
    async with aiohttp.ClientSession() as session:
        for path in ("/v2/health/live", "/v2/health/ready"):
            async with session.get(server.url + path) as resp:
                assert resp.status == 200, path
        async with session.get(server.url + "/v2/models/bert-x") as resp:
            assert resp.status == 401
        async with session.get(server.url + "/v2/models/bert-x", headers=auth) as resp:
            assert resp.status == 200
            assert (await resp.json())["name"] == "bert-x"
        async with session.post(server.url + "/v2/models/bert-x/infer", headers=auth, json={
                "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                            "data": ["paris is the [MASK] of france"]}]}) as resp:
            body = await resp.json()
    assert resp.status == 200, body
    assert body["model_name"] == "bert-x" and body["outputs"][0]["datatype"] == "BYTES"
