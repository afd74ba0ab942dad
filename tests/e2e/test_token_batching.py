"""Token-aware batching end to end: the token budget, length buckets, the padding metrics and
the 422 for inputs longer than the model takes, through real `batchwire serve`."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from tests.conftest import FAULT_TASK
from tests.e2e.conftest import http_get, info_async, post, wait_for_async

#: Words that are one token each in the BERT uncased vocabulary, so lengths are exact.
WORDS = ("the", "of", "and", "to", "in", "was", "he", "for", "it", "with", "as", "his", "on",
         "be", "at", "by", "had", "are", "but", "from")
SHORT_WORDS, LONG_WORDS = 3, 40  # 3 + [MASK] + [CLS] + [SEP] = 6 tokens; 44 tokens
SHORT_TOKENS, LONG_TOKENS = SHORT_WORDS + 3, LONG_WORDS + 3


def text(i: int, words: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words)) + " [MASK]"


def mixed_burst(pairs: int) -> list[str]:
    """Short and long inputs alternating: first come, first served mixes them in every batch."""
    out = []
    for i in range(pairs):
        out += [text(i, SHORT_WORDS), text(i, LONG_WORDS)]
    return out


def scrape_value(scrape: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", scrape, re.MULTILINE)
    assert match, f"{name} not in the scrape"
    return float(match.group(1))


async def queued_burst(server, gates, texts: list[str]) -> list[tuple[int, dict, object]]:
    """Send ``texts`` while the worker is held in a gated batch of its own
    (tests/fixtures/fault_pipeline.py), and let it go on only once they all wait in the
    worker's queue, so the policy, not arrival timing, shapes the batches they form."""
    _, info = http_get(server.url + "/info")
    (worker,) = info["workers"]
    assert len(texts) < worker["capacity"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        with gates.new("burst") as gate:
            held = asyncio.ensure_future(post(session, server.url + "/", data=gate.text.encode()))
            await gate.wait_reached()
            replies = asyncio.gather(*(post(session, server.url + "/", data=t.encode())
                                       for t in texts))

            async def all_on_the_worker():
                (w,) = (await info_async(session, server))["workers"]
                return w["in_flight"] == 1 + len(texts)
            await wait_for_async(all_on_the_worker, 30, f"{len(texts)} requests on the worker")
        assert (await held)[0] == 200
        return await replies


async def mean_padding(server) -> tuple[float, float]:
    """(mean padding ratio, batches) from the server's own /metrics."""
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/metrics") as resp:
            scrape = await resp.text()
    count = scrape_value(scrape, "batchwire_padding_ratio_count")
    assert count == scrape_value(scrape, "batchwire_batch_tokens_count") > 0
    return scrape_value(scrape, "batchwire_padding_ratio_sum") / count, count


def fault_model(fault_model_dir, *extra: str) -> list[str]:
    # Capacity 4 x 8 = 32: the gated request and a 30-input burst all fit in the worker.
    return ["--model", str(fault_model_dir), "--task", FAULT_TASK, "--trust-remote-code",
            "--max-batch-size", "8", *extra]


@pytest.fixture(scope="module")
def bucket_server(start_server, fault_model_dir, gates):
    return start_server(fault_model(fault_model_dir, "--max-batch-tokens", "0"), env=gates.env)


@pytest.fixture(scope="module")
def budget_server(start_server, fault_model_dir, gates):
    return start_server(fault_model(fault_model_dir, "--max-batch-tokens", "96",
                                    "--no-length-buckets"), env=gates.env)


@pytest.fixture(scope="module")
def count_only_server(start_server, fault_model_dir, gates):
    return start_server(fault_model(fault_model_dir, "--max-batch-tokens", "0",
                                    "--no-length-buckets"), env=gates.env)


async def test_length_buckets_cut_padding_against_count_only(bucket_server, count_only_server,
                                                               gates):
    texts = mixed_burst(8)
    for server in (bucket_server, count_only_server):
        replies = await queued_burst(server, gates, texts)
        assert all(status == 200 for status, _, _ in replies), replies
        for t, (_, headers, answer) in zip(texts, replies):
            assert answer[0]["sequence"].startswith(t.split()[0])
            assert int(headers["X-Batch-Tokens"]) >= len(t.split()) + 2
    bucketed, _ = await mean_padding(bucket_server)
    count_only, _ = await mean_padding(count_only_server)
    # First come, first served puts short and long inputs in both batches: about 43 % of
    # their padded tokens are padding (the gated batch, alone, has none: mean 0.29). Buckets
    # batch the 8 short and the 8 long apart.
    assert count_only > 0.2, count_only
    assert bucketed < 0.05, bucketed
    # Short inputs rode in batches padded to their own length, not to 43 tokens.
    replies = await queued_burst(bucket_server, gates, texts)
    shorts = sorted(int(h["X-Batch-Tokens"]) for (_, h, _), t in zip(replies, texts)
                    if len(t.split()) == SHORT_WORDS + 1)
    assert shorts == [8 * SHORT_TOKENS] * 8, shorts


async def test_token_budget_bounds_every_batch(budget_server, gates):
    _, info = http_get(budget_server.url + "/info")
    assert {w["max_batch_tokens"] for w in info["workers"]} == {96}
    replies = await queued_burst(budget_server, gates, mixed_burst(15))
    assert all(status == 200 for status, _, _ in replies), replies
    sizes = [(int(h["X-Batch-Size"]), int(h["X-Batch-Tokens"])) for _, h, _ in replies]
    # 96 padded tokens: at most two long inputs (2 x 44) per call, against eight by count.
    assert all(tokens <= 96 for _, tokens in sizes), sizes
    assert max(size for size, _ in sizes) > 1, sizes


@pytest.mark.parametrize("route,body,parameters", [
    ("/", "[MASK] " + "word " * 200, None),
    ("/predict", "[MASK] " + "word " * 200, {}),
])
async def test_input_longer_than_the_model_is_422_unless_truncated(bucket_server, route, body,
                                                                   parameters):
    async with aiohttp.ClientSession() as session:
        kwargs = ({"data": body.encode()} if parameters is None
                  else {"json": {"inputs": body, "parameters": parameters}})
        status, _, answer = await post(session, bucket_server.url + route, **kwargs)
        assert status == 422, answer
        assert answer["error"]["code"] == "input_too_long"
        assert "128" in answer["error"]["message"]  # the tiny model's limit
        assert "Traceback" not in answer["error"]["message"]
        # Asked for, truncation makes it fit (the mask is at the front, so it survives).
        status, _, answer = await post(session, bucket_server.url + "/predict", json={
            "inputs": body, "parameters": {"tokenizer_kwargs": {"truncation": True}}})
        assert status == 200, answer
