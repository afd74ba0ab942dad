"""msgpack in and out, API keys, the access log and JSON logs, on a real server."""

from __future__ import annotations

import json

import aiohttp
import msgpack
import numpy as np

from tests.e2e.conftest import post


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
        # A timestamp is valid msgpack, but no request can carry one: the 400 says so.
        stamped = msgpack.packb({"inputs": "a [MASK]",
                                 "parameters": {"at": msgpack.Timestamp(1, 0)}})
        status, _, body = await post(session, server.url + "/predict", data=stamped,
                                     headers={"Content-Type": "application/msgpack"})
    assert status == 400 and body["error"]["code"] == "bad_input", body
    message = body["error"]["message"]
    assert "extension type" in message and "send strings" in message


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


async def test_openai_embeddings_rank_by_meaning_with_the_default_minilm(start_server):
    server = start_server([])
    texts = ["a cat sits on the mat", "a kitten rests on a rug", "stock markets fell sharply"]
    async with aiohttp.ClientSession() as session:
        status, headers, body = await post(session, server.url + "/v1/embeddings",
                                           json={"input": texts, "model": "minilm"})
        assert status == 200, body
        status, _, single = await post(session, server.url + "/v1/embeddings",
                                       json={"input": texts[0]})
        assert status == 200
        bad, _, err = await post(session, server.url + "/v1/embeddings", json={"input": []})
        assert bad == 400 and err["error"]["code"] == "bad_input"
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float64)
    assert vectors.shape == (3, 384)
    # all-MiniLM-L6-v2 declares mean pooling + normalisation: unit vectors.
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cat_kitten, cat_market = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert cat_kitten > cat_market + 0.2, (cat_kitten, cat_market)
    np.testing.assert_allclose(single["data"][0]["embedding"], vectors[0], atol=1e-6)
    # [CLS] + words + [SEP] for each input.
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == 8 + 8 + 6
    assert int(headers["X-Batch-Size"]) >= 1


async def test_embeddings_on_a_fill_mask_server_say_what_is_needed(start_server, tiny_model_dir):
    server = start_server(["--model", str(tiny_model_dir)])
    async with aiohttp.ClientSession() as session:
        status, _, body = await post(session, server.url + "/v1/embeddings", json={"input": "x"})
        reserved, _, body2 = await post(session, server.url + "/predict", json={
            "inputs": "a [MASK]", "parameters": {"batchwire:embed": True}})
        # Metrics after some traffic: histograms of batch size and requests by route/status.
        async with session.get(server.url + "/metrics") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/plain"
            scrape = await resp.text()
    assert status == 400 and "feature-extraction" in body["error"]["message"]
    assert reserved == 400 and "reserved" in body2["error"]["message"]
    for name in ("batchwire_requests_total", "batchwire_request_duration_seconds_bucket",
                 "batchwire_queue_depth", "batchwire_queue_wait_seconds_bucket",
                 "batchwire_batch_size_bucket", "batchwire_inference_seconds_bucket",
                 "batchwire_workers", "batchwire_rejected_total", "batchwire_worker_restarts_total",
                 "batchwire_requests_requeued_total", "batchwire_requests_cancelled_total"):
        assert name in scrape, name
    assert 'batchwire_requests_total{route="/v1/embeddings",status="400"} 1.0' in scrape
    assert 'batchwire_rejected_total{reason="bad_input"} 2.0' in scrape
    assert 'batchwire_workers{state="ready"} 1.0' in scrape
