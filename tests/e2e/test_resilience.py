"""Separate gateway and worker processes, stopped workers, disconnecting clients, hostile peers."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import aiohttp
import msgpack
import zmq

from tests.conftest import FAULT_TASK
from tests.e2e.conftest import (
    burst,
    ended,
    free_port,
    http_get,
    info_async,
    post,
    start_gateway,
    start_worker,
    stop_while_holding_work,
    wait_for,
    workers_ready,
    wait_for_async,
    wait_worker_busy,
)


async def test_gateway_restart_finds_running_workers_again(procs, tmp_path, tiny_model_dir):
    port, zmq_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = start_gateway(procs, tmp_path, port, zmq_port)
    worker = start_worker(procs, tmp_path, zmq_port, tiny_model_dir)
    wait_for(workers_ready(url, 1), 90, "the worker to register")
    pid = http_get(url + "/info")[1]["workers"][0]["pid"]
    assert gateway.stop() == 0  # SIGTERM: drains, tells the worker DISCONNECT
    for sig in (signal.SIGTERM, signal.SIGKILL):
        gateway = start_gateway(procs, tmp_path, port, zmq_port)
        wait_for(workers_ready(url, 1), 30, f"the worker to find the new gateway (after {sig.name})")
        assert http_get(url + "/info")[1]["workers"][0]["pid"] == pid
        async with aiohttp.ClientSession() as session:
            status, _, _ = await post(session, url + "/", data=b"again [MASK]")
        assert status == 200
        gateway.stop(sig)
    assert worker.proc.poll() is None, "the worker must survive gateway restarts"
    # A gateway that said DISCONNECT is gone on purpose; one killed goes silent, which the
    # worker says once (in silence, it looked like a worker serving).
    wait_for(lambda: "no word from the gateway" in worker.log_text(), 15,
             "the worker to say its gateway went silent")
    assert worker.log_text().count("no word from the gateway") == 1
    assert worker.stop() == 0


async def test_a_replaced_gateways_requests_are_never_answered_to_the_next_ones_clients(
        procs, tmp_path, fault_model_dir):
    """A worker outlives its gateway holding that gateway's requests. Request ids counted
    from 1 in each gateway matched those answers to the next gateway's own requests, whose
    clients got someone else's answer with a 200. Now the ids never meet, a gateway that
    shuts down cancels what it answered "draining", and a worker told DISCONNECT drops its
    queue, so the next gateway's clients wait for nothing of the old one's either."""
    port, zmq_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = start_gateway(procs, tmp_path, port, zmq_port, "--drain-timeout-s", "0.5")
    worker = start_worker(procs, tmp_path, zmq_port, fault_model_dir, "--task", FAULT_TASK,
                          "--trust-remote-code", "--max-batch-size", "1", "--capacity", "12")
    wait_for(workers_ready(url, 1), 90, "the worker to register")
    pid = worker.proc.pid
    for sig in (signal.SIGKILL, signal.SIGTERM):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            # Half a second each, one at a time: the worker is still busy with them below.
            old = [asyncio.ensure_future(post(session, url + "/", data=f"SLOW old {i} [MASK]"))
                   for i in range(10)]
            await wait_worker_busy(session, url, pid)
            gateway.stop(sig)
            await asyncio.gather(*old, return_exceptions=True)
        gateway = start_gateway(procs, tmp_path, port, zmq_port, "--drain-timeout-s", "0.5")
        try:
            wait_for(workers_ready(url, 1), 30,
                     f"the worker to find the new gateway ({sig.name})")
        except AssertionError as exc:
            # Seen once under load, and not since: what the two said is the only lead.
            raise AssertionError(f"{exc}\n--- worker ---\n{worker.log_text()[-3000:]}\n"
                                 f"--- gateway ---\n{gateway.log_text()[-3000:]}") from None
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            new = await asyncio.gather(*(post(session, url + "/", data=f"new item{i} [MASK]")
                                         for i in range(10)))
        assert [status for status, _, _ in new] == [200] * 10, new
        for i, (_, _, answer) in enumerate(new):
            assert all(f"item{i}" in c["sequence"] and "old" not in c["sequence"]
                       for c in answer), (i, answer)
    assert "queued request(s) dropped" in worker.log_text()
    gateway.stop()
    assert worker.proc.poll() is None and worker.stop() == 0


async def test_a_gateway_that_did_not_run_for_a_while_does_not_blame_its_workers(
        start_server, tiny_model_dir):
    """The gateway's heartbeat check ran first after a pause (a GC, a paused VM, a loop held
    by a long call), before it read the heartbeats waiting in its socket, and declared every
    healthy worker dead: SIGKILLed, reloaded, their requests charged as crashes. The time
    the gateway itself was away is no longer counted against them."""
    # Beats of 0.5 s: a worker is dead after 1.5 s of silence, which a busy machine's stall of
    # the worker itself does not reach (at 0.25 s, 0.75 s did).
    server = start_server(["--model", str(tiny_model_dir), "--heartbeat-interval-s", "0.5"])
    pid = server.info()["workers"][0]["pid"]
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(4.0)  # the pause being survived (eight heartbeats), not a wait on anything
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    async with aiohttp.ClientSession() as session:
        status, _, body = await post(session, server.url + "/", data=b"after [MASK]")
    assert status == 200, body
    wait_for(lambda: "did not run for" in server.log_text(), 5, "the pause to be logged")
    info = server.info()
    assert [w["pid"] for w in info["workers"]] == [pid], server.log_text()
    assert [w["restarts"] for w in info["local_workers"]] == [0]
    assert "no message for" not in server.log_text()


async def test_sigterm_on_a_lone_worker_finishes_and_leaves_cleanly(procs, tmp_path,
                                                                    tiny_model_dir):
    port, zmq_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    start_gateway(procs, tmp_path, port, zmq_port)
    leaving = start_worker(procs, tmp_path, zmq_port, tiny_model_dir, "--max-batch-size", "2")
    staying = start_worker(procs, tmp_path, zmq_port, tiny_model_dir, "--max-batch-size", "2")
    wait_for(workers_ready(url, 2), 90, "two workers")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        requests = burst(session, url, 100, "w")
        await wait_worker_busy(session, url, leaving.proc.pid)
        leaving.proc.send_signal(signal.SIGTERM)
        replies = await asyncio.gather(*requests)
    assert [s for s, _, _ in replies] == [200] * 100
    assert leaving.proc.wait(30) == 0  # one SIGTERM is enough: it exits by itself, cleanly
    assert "leaving (signal SIGTERM)" in leaving.log_text()
    wait_for(workers_ready(url, 1), 10, "the gateway to drop the leaving worker")
    assert staying.proc.poll() is None


async def test_sigstopped_worker_is_declared_dead_and_its_requests_complete_elsewhere(
        start_server, tiny_model_dir):
    server = start_server(["--model", str(tiny_model_dir), "--workers", "2",
                           "--max-batch-size", "2", "--max-delay-ms", "5"])
    wait_for(lambda: len(server.info()["workers"]) == 2, 60, "both workers")
    victim = server.info()["workers"][0]["pid"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        # Stopped while it holds requests, which only its being declared dead gets answered.
        requests = await stop_while_holding_work(session, server, victim, "s", 100)
        stopped_at = time.monotonic()
        replies = await asyncio.gather(*requests)
        finished_in = time.monotonic() - stopped_at
    assert [s for s, _, _ in replies] == [200] * 100
    # 3 missed 1 s heartbeats, then requeue: a few seconds, not the 30 s request timeout.
    assert finished_in < 15, finished_in
    assert "no message for" in server.log_text()
    # The stopped process was killed and replaced, not left behind.
    wait_for(lambda: ended(victim), 10, "the stopped worker to be killed")


async def test_client_disconnect_makes_the_worker_skip_the_item(start_server, fault_model_dir,
                                                                gates):
    server = start_server(["--model", str(fault_model_dir), "--task", FAULT_TASK,
                           "--trust-remote-code", "--max-batch-size", "1", "--max-delay-ms", "0"],
                          env=gates.env)
    async with aiohttp.ClientSession() as session:
        with gates.new("hold") as gate:
            held = asyncio.ensure_future(post(session, server.url + "/", data=gate.text.encode()))
            await gate.wait_reached()
            # Capacity is 4 (four batches of one): this one waits on the worker behind the
            # held batch, for as long as the test needs.
            async with aiohttp.ClientSession() as leaving_client:
                doomed = asyncio.ensure_future(post(leaving_client, server.url + "/",
                                                    data=b"doomed [MASK]"))

                async def doomed_on_worker():
                    return (await info_async(session, server))["workers"][0]["in_flight"] == 2
                await wait_for_async(doomed_on_worker, 10,
                                     "the second request to reach the worker")
                doomed.cancel()
            # leaving the block closed the connection: the client is gone

            async def cancel_counted():
                async with session.get(server.url + "/metrics") as resp:
                    return ('batchwire_requests_cancelled_total{reason="client_gone"} 1.0'
                            in await resp.text())
            # The gateway sends the worker CANCEL as it counts the cancel: only then may the
            # worker go on to the doomed item.
            await wait_for_async(cancel_counted, 10, "the gateway to count the cancel")
        status, _, _ = await held
        assert status == 200

        async def skipped():
            return (await info_async(session, server))["workers"][0]["skipped"] == 1
        await wait_for_async(skipped, 10, "the worker to report the skipped item")
        assert (await post(session, server.url + "/", data=b"next [MASK]"))[0] == 200
        async with session.get(server.url + "/metrics") as resp:
            scrape = await resp.text()
    # Counted, so that requests by status add up to what came in.
    assert 'batchwire_requests_total{route="/",status="499"} 1.0' in scrape
    assert 'batchwire_requests_cancelled_total{reason="client_gone"} 1.0' in scrape


async def test_rogue_peer_with_garbage_frames_is_ignored(start_server, tiny_model_dir):
    server = start_server(["--model", str(tiny_model_dir)])
    endpoint = server.info()["zmq_endpoint"]
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(endpoint)
    rng = random.Random(1234)
    frames = [rng.randbytes(rng.randint(0, 300)) for _ in range(3000)]
    # Frames that parse as msgpack but are not valid messages, or are valid and out of place.
    frames += [msgpack.packb(x) for x in (
        [], [1], [2, 1], [1, 99], [1, 2, 1, "x"], [1, 3, 5, None, 1, 0.0, 0.0],
        [1, 4, 123456, "bad_input", "no such request"], [1, 6], [1, 7, "bye"],
        [1, 1, "rogue", 1, "m", "t", "cpu", 0, 0], {"a": 1}, "text", 1e300,
    )] * 50
    for frame in frames:
        rogue.send(frame)
    rogue.send_multipart([b"a", b"b", b"c"])  # more frames than a message has
    async with aiohttp.ClientSession() as session:
        for i in range(5):
            status, _, _ = await post(session, server.url + "/", data=f"still {i} [MASK]".encode())
            assert status == 200
    info = server.info()
    assert len(info["workers"]) == 1 and info["workers"][0]["id"] == "worker-0"
    assert "malformed frame" in server.log_text()
    rogue.close()
    ctx.term()
