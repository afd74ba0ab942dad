"""msgpack in and out, API keys, the access log and JSON logs, on a real server."""

from __future__ import annotations

import json

import aiohttp
import msgpack
import numpy as np

from tests.e2e.test_serve import post


async def test_msgpack_request_and_response(start_server, tiny_model_dir):
    server = start_server(["--model", str(tiny_model_dir), "--task", "feature-extraction",
                           "--log-format", "json"])
    body = msgpack.packb({"inputs": ["short", "a much longer input sentence"]})
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/predict", data=body,
                                headers={"Content-Type": "application/msgpack",
                                         "Accept": "application/msgpack"}) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/msgpack"
            answer = msgpack.unpackb(await resp.read())
        status, _, as_json = await post(session, server.url + "/predict",
                                        json={"inputs": ["short", "a much longer input sentence"]})
    assert status == 200
    arrays = [np.frombuffer(a["data"], dtype=a["dtype"]).reshape(a["shape"]) for a in answer]
    # Each item has its own token count (no batch padding) and matches the JSON answer.
    assert arrays[0].shape == (1, 3, 32) and arrays[1].shape[1] > 3
    for array, item in zip(arrays, as_json):
        np.testing.assert_allclose(array, np.array(item, dtype=np.float32), rtol=1e-6)
    # --log-format json: every gateway line is one JSON object; the access log has fields.
    lines = [line for line in server.log_text().splitlines() if '"process": "gateway"' in line]
    records = [json.loads(line) for line in lines]
    access = [r for r in records if r["logger"] == "batchwire.access" and r["path"] == "/predict"]
    assert access and access[0]["status"] == 200 and access[0]["batch_size"] >= 1
    assert len(access[0]["request_id"]) >= 16 and access[0]["total_ms"] > 0


async def test_bad_msgpack_body_is_400(start_server, tiny_model_dir):
    server = start_server(["--model", str(tiny_model_dir)])
    async with aiohttp.ClientSession() as session:
        status, _, body = await post(session, server.url + "/predict", data=b"\xc1\xc1",
                                     headers={"Content-Type": "application/msgpack"})
    assert status == 400 and "msgpack" in body["error"]["message"]


async def test_api_key_guards_every_route_but_the_probes(start_server, tiny_model_dir):
    server = start_server(["--model", str(tiny_model_dir)], env={"BATCHWIRE_API_KEY": "s3cret"})
    good = {"Authorization": "Bearer s3cret"}
    async with aiohttp.ClientSession() as session:
        for path in ("/health", "/ready"):
            async with session.get(server.url + path) as resp:
                assert resp.status == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, resp_headers, body = await post(session, server.url + "/", data=b"a [MASK]",
                                                    headers=headers)
            assert status == 401 and body["error"]["code"] == "unauthorized"
            assert resp_headers["WWW-Authenticate"] == "Bearer"
        async with session.get(server.url + "/info") as resp:
            assert resp.status == 401
        status, _, _ = await post(session, server.url + "/", data=b"a [MASK]", headers=good)
        assert status == 200
        async with session.get(server.url + "/info", headers=good) as resp:
            info = await resp.json()
    assert info["config"]["api_key"] == "***"
