"""Browsers on other origins (gateway/cors.py, --cors-origins): preflights answered ahead
of the API key, every answer to an allowed origin readable by its page (errors too), other
origins told why; and nothing of it when no origin is listed. The real app, served on
127.0.0.1, with the requests a browser sends."""

from __future__ import annotations

import argparse

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway import cors
from gateway.app import create_app
from gateway.broker import Broker
from gateway.config import GatewayConfig

PAGE = "http://localhost:3000"


def client_for(**settings) -> TestClient:
    app = create_app(GatewayConfig(**settings), Broker("inproc://cors-test", max_queue=1))
    return TestClient(TestServer(app))


def preflight(origin: str, method: str = "POST",
              headers: str = "authorization, content-type, x-stainless-os") -> dict:
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers}


async def test_an_allowed_origin_gets_its_preflight_and_reads_every_answer():
    async with client_for(cors_origins=(PAGE,), api_key="k") as client:
        # The preflight carries no API key, and is answered anyway.
        async with client.options("/v1/embeddings", headers=preflight(PAGE)) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == PAGE
            assert response.headers["Access-Control-Allow-Methods"] == "GET, HEAD, POST"
            assert response.headers["Access-Control-Allow-Headers"] == \
                "authorization, content-type, x-stainless-os"
            assert int(response.headers["Access-Control-Max-Age"]) > 0
            assert "Origin" in response.headers.getall("Vary")
        # The request itself: no worker here, so 503, which the page can read, with the
        # headers that say when to retry and which request it was.
        async with client.post("/", data="a [MASK]",
                               headers={"Origin": PAGE, "Authorization": "Bearer k"}) as response:
            assert response.status == 503
            assert response.headers["Access-Control-Allow-Origin"] == PAGE
            exposed = response.headers["Access-Control-Expose-Headers"]
            assert "Retry-After" in exposed and "X-Request-Id" in exposed
            assert (await response.json())["error"]["code"] == "no_workers"
        # A missing key is still 401, readable by the page.
        async with client.get("/info", headers={"Origin": PAGE}) as response:
            assert response.status == 401
            assert response.headers["Access-Control-Allow-Origin"] == PAGE


async def test_another_origin_is_told_why_and_gets_no_cors_headers():
    async with client_for(cors_origins=(PAGE,)) as client:
        async with client.options("/", headers=preflight("https://evil.example")) as response:
            assert response.status == 403
            assert "Access-Control-Allow-Origin" not in response.headers
            error = (await response.json())["error"]
            assert error["code"] == "origin_not_allowed" and "--cors-origins" in error["message"]
        # A plain request from it is answered (a server cannot stop it being sent), but not
        # marked readable: the browser keeps the page from it.
        async with client.get("/health", headers={"Origin": "https://evil.example"}) as response:
            assert response.status == 200
            assert "Access-Control-Allow-Origin" not in response.headers
            assert "Origin" in response.headers.getall("Vary")


async def test_any_origin_with_a_star():
    async with client_for(cors_origins=("*",)) as client:
        async with client.options("/", headers=preflight("https://anything.example")) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == "*"
        async with client.get("/health", headers={"Origin": "https://x.example"}) as response:
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            assert "Vary" not in response.headers


async def test_without_origins_listed_there_is_no_cors_at_all():
    async with client_for() as client:
        async with client.options("/", headers=preflight(PAGE)) as response:
            assert response.status == 405  # as any other OPTIONS: browsers refuse the call
            assert "Access-Control-Allow-Origin" not in response.headers
        async with client.get("/health", headers={"Origin": PAGE}) as response:
            assert "Access-Control-Allow-Origin" not in response.headers
            assert "Vary" not in response.headers


def test_origins_are_scheme_host_and_port():
    assert cors.origins("http://LocalHost:3000, https://a.example.com/") == \
        ("http://localhost:3000", "https://a.example.com")
    assert cors.origins("*") == ("*",)
    # Browsers leave a default port out of Origin: written in, it matched no page.
    assert cors.origins("https://ok.example:443,http://ok.example:80,https://ok.example:8443") \
        == ("https://ok.example", "http://ok.example", "https://ok.example:8443")
    for bad in ("localhost:3000", "http://a.example.com/app", "ftp://a.example.com", "*,http://a.b"):
        with pytest.raises(argparse.ArgumentTypeError, match="not an origin"):
            cors.origins(bad)


async def test_every_answer_varies_by_origin_and_odd_header_lists_still_get_theirs():
    """An answer to a request without Origin lacked Vary: a shared cache could store it and
    hand it to a page of an allowed origin, which then failed. A header list with an empty
    item got a preflight that allowed no header at all, and the browser an opaque failure."""
    async with client_for(cors_origins=(PAGE,)) as client:
        async with client.get("/health") as response:
            assert "Origin" in response.headers.getall("Vary")
        odd = preflight(PAGE, headers="content-type,,authorization")
        async with client.options("/", headers=odd) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Headers"] == "content-type, authorization"
