"""msgpack in and out, API keys, the access log and JSON logs, on a real server."""

from __future__ import annotations

import json

import aiohttp
import msgpack
import numpy as np

from tests.e2e.conftest import post, wait_for


async def test_msgpack_request_and_response(features_server):
    server = features_server
    body = msgpack.packb({"inputs": ["short", "a much longer input sentence"]})
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/predict", data=body,
                                headers={"Content-Type": "application/msgpack",
                                         "Accept": "application/msgpack",
                                         "X-Request-Id": "formats-msgpack-in-and-out"}) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/msgpack"
            answer = msgpack.unpackb(await resp.read())
        status, headers, as_json = await post(
            session, server.url + "/predict",
            json={"inputs": ["short", "a much longer input sentence"]})
    assert status == 200
    arrays = [np.frombuffer(a["data"], dtype=a["dtype"]).reshape(a["shape"]) for a in answer]
    # Each item has its own token count (no batch padding) and matches the JSON answer.
    assert arrays[0].shape == (1, 3, 32) and arrays[1].shape[1] > 3
    for array, item in zip(arrays, as_json):
        np.testing.assert_allclose(array, np.array(item, dtype=np.float32), rtol=1e-6)
    # --log-format json: every gateway line is one JSON object; the access log has fields,
    # under the id the client sent or, without one, the id the gateway made.
    ids = ("formats-msgpack-in-and-out", headers["X-Request-Id"])

    def access_records() -> dict | None:
        # A request's access line is written as its answer goes out: wait for the last one.
        lines = [line for line in server.log_text().splitlines()
                 if '"process": "gateway"' in line]
        records = [json.loads(line) for line in lines]
        access = {r["request_id"]: r for r in records
                  if r["logger"] == "batchwire.access" and r["path"] == "/predict"}
        return access if all(i in access for i in ids) else None

    access = wait_for(access_records, 10, "both requests' access log lines")
    sent = access["formats-msgpack-in-and-out"]
    assert sent["status"] == 200 and sent["batch_size"] >= 1 and sent["total_ms"] > 0
    made = access[headers["X-Request-Id"]]
    assert len(made["request_id"]) >= 16 and made["status"] == 200


async def test_accept_is_read_with_its_q_values_and_the_answer_varies_by_it(fill_mask_server):
    """Only the header's mention of msgpack was looked for: "application/msgpack;q=0" (it
    will not take msgpack) got msgpack, a client preferring JSON by q-value got msgpack, and
    "Application/MsgPack" got JSON. And with no Vary: Accept, a cache could hand one
    client's format to another."""
    cases = {
        "application/msgpack": "application/msgpack",
        "Application/MsgPack": "application/msgpack",
        "application/x-msgpack": "application/msgpack",
        "application/json, application/msgpack": "application/msgpack",
        "application/msgpack;q=0.5, application/json": "application/json",
        "application/json;q=0.4, application/msgpack;q=0.6": "application/msgpack",
        "application/msgpack;q=0": "application/json",
        "application/msgpack; q=bad": "application/json",
        "*/*": "application/json",
        "text/html": "application/json",
    }
    async with aiohttp.ClientSession() as session:
        for accept, content_type in cases.items():
            async with session.post(fill_mask_server.url + "/predict",
                                    json={"inputs": "a [MASK] day"},
                                    headers={"Accept": accept}) as resp:
                assert resp.status == 200, accept
                assert resp.content_type == content_type, accept
                assert "Accept" in resp.headers.getall("Vary"), accept
                body = await resp.read()
                value = (msgpack.unpackb(body) if content_type == "application/msgpack"
                         else json.loads(body))
                assert value[0]["token_str"], accept


async def test_bad_msgpack_body_is_400(fill_mask_server):
    server = fill_mask_server
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


def metric(scrape: str, sample: str) -> float:
    """A sample's value in a Prometheus scrape (0 if absent: not counted yet)."""
    for line in scrape.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_embeddings_on_a_fill_mask_server_say_what_is_needed(fill_mask_server):
    server = fill_mask_server
    embeddings_400 = 'batchwire_requests_total{route="/v1/embeddings",status="400"}'
    bad_input = 'batchwire_rejected_total{reason="bad_input"}'
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/metrics") as resp:
            before = await resp.text()
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
                 "batchwire_requests_requeued_total", "batchwire_requests_cancelled_total",
                 'batchwire_deadline_missed_total{where="worker_refused"}'):
        assert name in scrape, name
    # The server is shared with other modules: what these two requests added.
    assert metric(scrape, embeddings_400) - metric(before, embeddings_400) == 1.0
    assert metric(scrape, bad_input) - metric(before, bad_input) == 2.0
    assert metric(scrape, 'batchwire_workers{state="ready"}') == 1.0
    from protocol.version import package_version
    assert metric(scrape, f'batchwire_build_info{{version="{package_version()}"}}') == 1.0
