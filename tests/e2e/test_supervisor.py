"""The supervisor's own process handling, with stand-in worker processes (`sleep`)."""

from __future__ import annotations

import asyncio
import signal

from gateway.config import WorkerLaunchConfig
from gateway.supervisor import Supervisor
from tests.e2e.conftest import ended, wait_for_async


async def test_a_worker_being_started_as_the_supervisor_stops_is_ended_too(monkeypatch):
    """stop() came while a watcher was starting a replacement: it did not see the new
    process, cancelled the watcher, and the process ran on (until its model had loaded)."""
    supervisor = Supervisor(WorkerLaunchConfig(workers=1, devices="cpu"), "ipc:///nowhere",
                            1.0, 60.0, "INFO", on_exit=lambda pid, reason: None)
    supervisor.slots[0].argv = ["sleep", "60"]
    start = asyncio.create_subprocess_exec
    spawned: list[asyncio.subprocess.Process] = []
    release = asyncio.Event()

    async def held_start(*args, **kwargs):
        process = await start(*args, **kwargs)
        spawned.append(process)
        if len(spawned) == 2:  # the replacement: started, not yet handed over
            await release.wait()
        return process

    monkeypatch.setattr(asyncio, "create_subprocess_exec", held_start)
    await supervisor.start()
    try:
        await wait_for_async(lambda: supervisor.slots[0].process is not None, 10,
                             "the first process")
        spawned[0].send_signal(signal.SIGKILL)  # restarted after 0.5 s
        await wait_for_async(lambda: len(spawned) == 2, 10, "the replacement to be started")
        stopping = asyncio.create_task(supervisor.stop(timeout_s=1.0))
        release.set()
        await asyncio.wait_for(stopping, 10)
        await wait_for_async(lambda: ended(spawned[1].pid), 5, "the replacement to end")
    finally:
        for process in spawned:
            if process.returncode is None:
                process.kill()
                await process.wait()
