"""Faults injected through a real custom pipeline: poison inputs, hangs, out-of-memory."""

from __future__ import annotations

import asyncio
import re

import aiohttp

from worker.config import REPEAT_WITHIN_S

from tests.conftest import FAULT_TASK
from tests.e2e.conftest import info_async, wait_for, wait_for_async
from tests.e2e.conftest import post


def fault_args(fault_model_dir, *extra: str) -> list[str]:
    return ["--model", str(fault_model_dir), "--task", FAULT_TASK, "--trust-remote-code", *extra]


async def test_out_of_memory_splits_the_batch_and_lowers_the_token_budget(start_server,
                                                                          fault_model_dir):
    # Raised again only after 5 s without another error, long after the requests below.
    server = start_server(fault_args(fault_model_dir, "--max-batch-size", "8",
                                     "--max-delay-ms", "300", "--oom-recovery-s", "5"))
    async with aiohttp.ClientSession() as session:
        replies = await asyncio.gather(*(post(session, server.url + "/",
                                              data=f"OOM {i} [MASK]".encode()) for i in range(8)))
        assert [status for status, _, _ in replies] == [200] * 8, replies
        assert max(int(h["X-Batch-Size"]) for _, h, _ in replies) == 1
        budgets = re.findall(r"effective token budget is now (\d+)", server.log_text())
        assert budgets, server.log_text()
        budget = int(budgets[-1])
        # The worker keeps the lowered budget: no later batch asks for more padded tokens.
        replies = await asyncio.gather(*(post(session, server.url + "/",
                                              data=f"after {i} [MASK]".encode()) for i in range(6)))
    assert [status for status, _, _ in replies] == [200] * 6
    assert max(int(h["X-Batch-Tokens"]) for _, h, _ in replies) <= budget
    # The worker re-announces its limits, so /info shows the budget it now runs with.
    wait_for(lambda: [w["max_batch_tokens"] for w in server.info()["workers"]] == [budget], 10,
             "/info to show the lowered token budget")
    assert [w["max_batch_size"] for w in server.info()["workers"]] == [8]
    assert "effective batch size" not in server.log_text()  # token counts were known

    # With no error since, the next batch after --oom-recovery-s raises the budget a step,
    # and /info shows it.
    async with aiohttp.ClientSession() as session:
        async def raised() -> bool:
            status, _, _ = await post(session, server.url + "/", data=b"later [MASK]")
            assert status == 200
            workers = (await info_async(session, server))["workers"]
            return [w["max_batch_tokens"] for w in workers] > [budget]

        await wait_for_async(raised, 30, "the token budget to be raised again", interval=0.2)
    assert "no out-of-memory error for 5 s" in server.log_text()
    assert "exited with code" not in server.log_text()


async def test_poison_input_gets_500_once_and_the_pool_survives(start_server, fault_model_dir):
    server = start_server(fault_args(fault_model_dir, "--workers", "2", "--max-batch-size", "4",
                                     "--max-delay-ms", "50"))
    wait_for(lambda: len(server.info()["workers"]) == 2, 60, "both workers")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        innocent = [asyncio.ensure_future(post(session, server.url + "/",
                                               data=f"fine {i} [MASK]".encode()))
                    for i in range(20)]
        status, _, body = await post(session, server.url + "/", data=b"CRASH [MASK]")
        replies = await asyncio.gather(*innocent)
        assert status == 500, body
        assert body["error"]["code"] == "worker_crashed"
        assert all(s == 200 for s, _, _ in replies), [r for r in replies if r[0] != 200][:2]

        # Both workers died once each; the supervisor brings the pool back.
        async def pool_back():
            return len((await info_async(session, server))["workers"]) == 2
        await wait_for_async(pool_back, 60, "the pool to be restored")
        assert (await post(session, server.url + "/", data=b"later [MASK]"))[0] == 200
        # A client retrying the 500: refused at once, unrun (it cost two more workers a try).
        status, _, body = await post(session, server.url + "/", data=b"CRASH [MASK]")
        assert status == 500 and body["error"]["code"] == "worker_crashed", body
        assert "refused for another" in body["error"]["message"], body
        info = await info_async(session, server)
        assert info["poison"] == {"remembered": 1, "refused": 1, "suspected": 0}
        assert (await post(session, server.url + "/", data=b"still [MASK]"))[0] == 200
    assert server.log_text().count("restarting in") == 2  # one death on each worker
    assert "killed the two workers that ran it" in server.log_text()


async def test_hung_model_call_is_detected_and_its_requests_run_elsewhere(start_server,
                                                                          fault_model_dir):
    server = start_server(fault_args(fault_model_dir, "--workers", "2", "--max-batch-size", "1",
                                     "--batch-timeout-s", "2"))
    wait_for(lambda: len(server.info()["workers"]) == 2, 60, "both workers")
    async with aiohttp.ClientSession() as session:
        hung = asyncio.ensure_future(post(session, server.url + "/", data=b"HANG [MASK]",
                                          headers={"X-Timeout-Ms": "60000"}))
        # The other worker keeps serving while one is stuck.
        for i in range(5):
            assert (await post(session, server.url + "/", data=f"ok {i} [MASK]".encode()))[0] == 200
        status, _, body = await hung
        # The hanging input took down one worker, then the one it was retried on: 500, once.
        assert status == 500 and body["error"]["code"] == "worker_crashed", body
        # Sent again, it is refused unrun: it would hold a third worker until its watchdog.
        await wait_for_async(lambda: _workers_back(session, server, 2), 60, "the pool back")
        status, _, body = await post(session, server.url + "/", data=b"HANG [MASK]")
        assert status == 500 and "refused for another" in body["error"]["message"], body
    assert server.log_text().count("past --batch-timeout-s") == 2


async def test_second_sigterm_forces_a_prompt_exit(start_server, fault_model_dir):
    """A drain that would wait on a hung model call is cut short by a second SIGTERM."""
    import signal
    import time

    server = start_server(fault_args(fault_model_dir, "--drain-timeout-s", "600",
                                     "--batch-timeout-s", "600"))
    async with aiohttp.ClientSession() as session:
        hung = await start_hung_request(session, server)
        server.proc.send_signal(signal.SIGTERM)
        await wait_for_async(lambda: _draining(session, server), 10, "draining")
        # Within REPEAT_WITHIN_S, a second one is the first delivered twice: not "again".
        # The window opens when the gateway handles the first signal, which may be well
        # after it was sent on a busy machine (CI once sent the second 1.0 s after the
        # first, and the gateway, late with the first, took it for a repeat); /ready
        # answering 503 shows it was handled by then.
        draining_seen_at = time.monotonic()
        await wait_for_async(lambda: time.monotonic() - draining_seen_at > REPEAT_WITHIN_S, 5,
                             "the repeat window to pass")
        forced_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        status, _, body = await hung
    assert status == 503 and body["error"]["code"] == "draining"
    assert await asyncio.to_thread(server.proc.wait, 30) == 0
    assert time.monotonic() - forced_at < 10
    # What a forced stop dropped is said: it passed in silence.
    assert "stopped before the drain was done: 1 input(s) still in flight" in server.log_text()
    assert server.stop() == 0  # also checks no worker process was left behind


async def test_drain_timeout_bounds_the_wait(start_server, fault_model_dir):
    import signal
    import time

    server = start_server(fault_args(fault_model_dir, "--drain-timeout-s", "1",
                                     "--batch-timeout-s", "600"))
    async with aiohttp.ClientSession() as session:
        hung = await start_hung_request(session, server)
        sent_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        status, _, body = await hung
        answered_after = time.monotonic() - sent_at
    assert status == 503 and body["error"]["code"] == "draining"
    assert 0.9 <= answered_after < 5, answered_after
    assert await asyncio.to_thread(server.proc.wait, 30) == 0
    # The drain timeout bounds the exit too: the worker stuck in its model call gets a
    # second, not the ten a worker finishing its last batch gets after a full drain.
    exited_after = time.monotonic() - sent_at
    assert exited_after < 6, exited_after
    log = server.log_text()
    assert "drain timeout: 1 input(s) still in flight, answered 503 draining" in log
    assert "did not exit in 1 s; killing it" in log
    assert server.stop() == 0


async def start_hung_request(session, server) -> asyncio.Future:
    """A request whose model call never returns, once the gateway holds it in flight."""
    hung = asyncio.ensure_future(post(session, server.url + "/", data=b"HANG [MASK]"))

    async def holding():
        return (await info_async(session, server))["in_flight"] == 1
    await wait_for_async(holding, 10, "the hanging request to be in flight")
    return hung


async def _workers_back(session, server, n: int) -> bool:
    return len((await info_async(session, server))["workers"]) == n


async def _draining(session, server) -> bool:
    """Whether /ready says draining (its 503 alone could be for no worker connected)."""
    async with session.get(server.url + "/ready") as resp:
        return resp.status == 503 and (await resp.json())["reason"] == "draining"
