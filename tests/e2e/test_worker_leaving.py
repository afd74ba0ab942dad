"""A worker's own leave: SIGTERM under load, a signal delivered twice, a signal during the
model load, and an endpoint it could never connect to."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import aiohttp

from tests.conftest import FAULT_TASK
from tests.e2e.conftest import (
    Proc,
    burst,
    free_port,
    post,
    start_gateway,
    start_worker,
    wait_for,
    wait_worker_busy,
    workers_ready,
)


async def test_a_worker_leaving_under_load_is_not_taken_for_a_crash(start_server,
                                                                    tiny_model_dir):
    """The worker sent DISCONNECT and closed its socket at once; a send the gateway made
    before reading that DISCONNECT (more work for the credit its last answers freed, a
    heartbeat) failed, and the leave was taken for a crash: its requests were charged one,
    and the supervisor SIGKILLed the leaving process. Now it keeps its socket open until the
    gateway acknowledges the DISCONNECT. The gateway is paused while the worker leaves, so
    that its reading lags as it did under load, every time."""
    # The leaving worker waits two heartbeats (5 s at most) for the acknowledgement: at the
    # default 1 s, a test process stalled for 2 s before its SIGCONT let the worker close,
    # which is the failure this test looks for.
    server = start_server(["--model", str(tiny_model_dir), "--workers", "2",
                           "--max-batch-size", "4", "--max-delay-ms", "20",
                           "--heartbeat-interval-s", "2.5"])
    wait_for(lambda: len(server.info()["workers"]) == 2, 60, "both workers")
    victim = server.info()["workers"][0]
    pid, name = victim["pid"], victim["id"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        requests = burst(session, server.url, 100, "leave")
        await wait_worker_busy(session, server, pid)
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            os.kill(pid, signal.SIGTERM)
            # The worker logs this once its last answers and its DISCONNECT are sent.
            wait_for(lambda: f"worker {name} leaving (signal SIGTERM)" in server.log_text(),
                     30, "the worker to finish its batch and say DISCONNECT")
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        replies = await asyncio.gather(*requests)
    assert [s for s, _, _ in replies] == [200] * 100, [r for r in replies if r[0] != 200][:3]
    exited = f"process {pid} exited with code"
    log = wait_for(lambda: exited in server.log_text() and server.log_text(), 30,
                   "the supervisor to see the worker exit")
    assert f"{exited} 0;" in log, log
    assert f"(pid {pid}) lost: it disconnected (signal SIGTERM)" in log, log
    assert "send failed" not in log and f"(pid {pid}): " not in log, log


async def test_a_signal_delivered_twice_is_one_request_to_leave(procs, tmp_path,
                                                                fault_model_dir):
    """Ctrl-C reaches the worker and the supervisor's SIGTERM follows; GNU timeout signals
    the pid and then its group. The second of the two was taken for "again": exit 1 and the
    running batch dropped."""
    port, zmq_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    start_gateway(procs, tmp_path, port, zmq_port)
    args = ("--task", FAULT_TASK, "--trust-remote-code", "--max-batch-size", "1",
            "--max-delay-ms", "0")
    leaving = start_worker(procs, tmp_path, zmq_port, fault_model_dir, *args)
    start_worker(procs, tmp_path, zmq_port, fault_model_dir, *args)
    wait_for(workers_ready(url, 2), 90, "two workers")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        # Half a second each: the leaving worker is computing one when the signals come.
        requests = [asyncio.ensure_future(post(session, url + "/", data=f"SLOW {i} [MASK]"))
                    for i in range(6)]
        await wait_worker_busy(session, url, leaving.proc.pid)
        leaving.proc.send_signal(signal.SIGINT)
        leaving.proc.send_signal(signal.SIGTERM)
        replies = await asyncio.gather(*requests)
    assert [s for s, _, _ in replies] == [200] * 6, replies
    assert await asyncio.to_thread(leaving.proc.wait, 30) == 0, leaving.log_text()
    assert "again" not in leaving.log_text()
    assert leaving.log_text().count("leaving (signal SIG") == 1, leaving.log_text()


def test_a_signal_during_the_model_load_ends_the_worker_cleanly(procs, tmp_path,
                                                                tiny_model_dir):
    """As PID 1 (the worker image) a signal with no handler is ignored: `docker stop` during
    the load was dropped, and the worker went on to join and serve. Its weights here are a
    named pipe no one writes, so the load waits for as long as the test needs."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")
    worker = start_worker(procs, tmp_path, free_port(), model)
    wait_for(lambda: "loading" in worker.log_text(), 60, "the model load to start")
    signalled_at = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(10) == 0, worker.log_text()
    assert time.monotonic() - signalled_at < 5
    assert "SIGTERM before the model was loaded and serving: exiting" in worker.log_text()
    assert "Traceback" not in worker.log_text()


def test_an_endpoint_the_worker_cannot_connect_to_fails_before_the_load(procs, tmp_path,
                                                                       tiny_model_dir):
    """`tcp://localhost` (no port) loaded the model, then died with a ZeroMQ traceback and
    exit 1, which `serve` and Docker take for a crash and restart, loading again each time.
    Now it is exit 2, the worker's "cannot start", with one line, before the load."""
    for endpoint, why in (("tcp://localhost", "has no port"),
                          ("inproc://gateway", "reaches only this process"),
                          ("ipc:///" + "d/" * 60 + "s", "longer than 107 bytes")):
        worker = Proc(["worker", "--connect", endpoint, "--model", str(tiny_model_dir)],
                      tmp_path / f"bad-{len(procs)}.log")
        procs.append(worker)
        assert worker.proc.wait(60) == 2, worker.log_text()
        text = worker.log_text()
        assert why in text and "loading" not in text and "Traceback" not in text, text
        assert len(text.strip().splitlines()) == 1, text
