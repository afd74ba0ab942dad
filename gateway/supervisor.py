"""Starts and watches the local worker processes of `batchwire serve`.

A worker that exits is reported to the broker at once (its requests requeue without waiting
for missed heartbeats) and started again after an exponential backoff, which resets once a
worker has stayed up for a while. The gateway never imports torch: workers are separate
``python -m worker`` processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

from gateway.config import WorkerLaunchConfig, device_list
from worker.config import EXIT_CANNOT_LOAD

log = logging.getLogger("batchwire.gateway.supervisor")

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
#: How long stop() waits for the watchers to see it before cancelling them.
WATCHERS_END_S = 5.0
#: A worker up this long (or one that joined the gateway) is considered healthy again: its
#: next crash restarts quickly.
STABLE_AFTER_S = 60.0


def resolve_devices(spec: str, count: int | None) -> list[str]:
    """One device per worker: ``auto`` uses every visible GPU (via nvidia-smi), else CPU.

    ``count`` None (``--workers auto``): one worker per GPU, or one per usable CPU core.
    """
    if spec == "auto":
        gpus = _visible_gpus()
        devices = [f"cuda:{i}" for i in range(gpus)] or ["cpu"]
    else:
        devices = device_list(spec)
    if count is None:
        gpus = list(dict.fromkeys(d for d in devices if d != "cpu"))
        return gpus + (["cpu"] * usable_cpus() if "cpu" in devices else [])
    return [devices[i % len(devices)] for i in range(count)]


def usable_cpus(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup v2 CPU quota.

    A container limited to 2 CPUs on a 64-core host sees 64 in os.cpu_count(); starting 64
    workers there would oversubscribe it 32 times.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open(cpu_max) as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _visible_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


@dataclass
class WorkerSlot:
    index: int
    device: str
    argv: list[str]
    env: dict[str, str]
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    #: starting | running | restarting | failed (cannot load the model: not retried)
    state: str = "starting"
    last_exit: str = ""
    #: The pid of the last process of this slot that joined the gateway; None while none
    #: has. Once one has, the slot's model loads: a later failure to load is taken for a
    #: passing condition (device memory its killed predecessor still held), and retried.
    ready_pid: int | None = None
    #: The ZeroMQ identity that process joined as: the only peer whose loss may end it. A
    #: peer that claimed the pid of a supervised worker in its READY, then left, had the real
    #: worker SIGKILLed, round after round.
    ready_identity: bytes | None = None


class Supervisor:
    def __init__(self, launch: WorkerLaunchConfig, endpoint: str, heartbeat_interval_s: float,
                 batch_timeout_s: float, log_level: str, on_exit: Callable[[int, str], None],
                 log_format: str = "text", on_give_up: Callable[[str], None] = lambda r: None,
                 extra_args: list[str] | None = None, event_loop: str = "auto"):
        self.log_format = log_format
        self.event_loop = event_loop
        self.extra_args = list(extra_args or [])
        self.on_give_up = on_give_up
        self.launch = launch
        self.endpoint = endpoint
        self.on_exit = on_exit
        devices = resolve_devices(launch.devices, launch.workers)
        cpu_workers = sum(1 for d in devices if d == "cpu")
        cores = usable_cpus()
        if cpu_workers > cores:
            # Each gets a thread of its own, and they take turns on the cores: more batches
            # in flight, each slower, and no more throughput (docs/operations.md).
            log.warning("%d CPU workers on %d usable core(s): they share the cores; one "
                        "worker per core (--workers auto) serves as much", cpu_workers, cores)
        threads = launch.torch_threads or max(1, cores // max(cpu_workers, 1))
        self.slots = [
            self._slot(i, device, threads, heartbeat_interval_s, batch_timeout_s, log_level)
            for i, device in enumerate(devices)
        ]
        self._stopping = False
        self._hurry = asyncio.Event()
        self._watchers: list[asyncio.Task] = []
        self._wake = asyncio.Event()

    def _slot(self, index: int, device: str, threads: int, heartbeat_s: float,
              batch_timeout_s: float, log_level: str) -> WorkerSlot:
        launch = self.launch
        argv = [
            sys.executable, "-m", "worker",
            "--connect", self.endpoint,
            "--device", device,
            "--worker-id", f"worker-{index}",
            "--max-delay-ms", str(launch.max_delay_ms),
            "--heartbeat-interval-s", str(heartbeat_s),
            "--batch-timeout-s", str(batch_timeout_s),
            "--exit-on-disconnect",
            "--parent-pid", str(os.getpid()),
            "--log-level", log_level,
            "--log-format", self.log_format,
            "--event-loop", self.event_loop,
            *self.extra_args,
        ]
        if launch.model:
            argv += ["--model", launch.model]
        if launch.task:
            argv += ["--task", launch.task]
        if launch.max_batch_size:
            argv += ["--max-batch-size", str(launch.max_batch_size)]
        if launch.max_batch_tokens is not None:
            argv += ["--max-batch-tokens", str(launch.max_batch_tokens)]
        if not launch.length_buckets:
            argv += ["--no-length-buckets"]
        if launch.oom_recovery_s is not None:
            argv += ["--oom-recovery-s", str(launch.oom_recovery_s)]
        if launch.trust_remote_code:
            argv += ["--trust-remote-code"]
        argv += ["--pooling", launch.pooling, "--normalize", launch.normalize]
        if launch.max_seq_length:
            argv += ["--max-seq-length", str(launch.max_seq_length)]
        if launch.fixed_delay:
            argv += ["--fixed-delay"]
        if not launch.sparse_mlm_head:
            argv += ["--dense-mlm-head"]
        if launch.stock_pipeline:
            argv += ["--stock-pipeline"]
        if launch.dtype != "auto":
            argv += ["--dtype", launch.dtype]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHWIRE_")}
        if device == "cpu":
            # Each CPU worker gets its share of the cores; more threads only contend.
            argv += ["--torch-threads", str(threads)]
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        return WorkerSlot(index, device, argv, env)

    async def start(self) -> None:
        for slot in self.slots:
            log.info("starting worker-%d on %s", slot.index, slot.device)
            self._watchers.append(asyncio.create_task(self._watch(slot), name=f"watch-{slot.index}"))

    async def _watch(self, slot: WorkerSlot) -> None:
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            # A session of its own: a terminal's Ctrl-C, or a signal to the gateway's process
            # group, is the gateway's to act on (it drains, then stops its workers), not each
            # worker's at once. The worker watches its parent, so it never outlives it.
            slot.process = await asyncio.create_subprocess_exec(*slot.argv, env=slot.env,
                                                                start_new_session=True)
            if self._stopping:
                # stop() came while this process was being started, and did not see it:
                # it has loaded nothing yet.
                _signal(slot.process, signal.SIGKILL)
                await slot.process.wait()
                return
            slot.state = "running"
            code = await slot.process.wait()
            if self._stopping:
                return
            reason = f"process {slot.process.pid} exited with code {code}"
            slot.last_exit = reason
            self.on_exit(slot.process.pid, reason)
            if code == EXIT_CANNOT_LOAD and slot.ready_pid is not None:
                log.error("worker-%d could not load its model this time, though it had "
                          "before (see its log above); retried with the backoff below",
                          slot.index)
            elif code == EXIT_CANNOT_LOAD:
                slot.state = "failed"
                log.critical("worker-%d cannot load its model (see its log above); not "
                             "restarting it", slot.index)
                if all(s.state == "failed" for s in self.slots):
                    self.on_give_up("no worker could load the model")
                return
            slot.state = "restarting"
            # Backing off is for a worker that cannot get going. One that loaded and joined
            # was ended by what it ran (a client's poison input, a kill for silence): started
            # again at once. Counted as failures, a few poison inputs had slots wait 30 s to
            # restart, and with two workers the pool was empty most of the time.
            served = slot.ready_pid == slot.process.pid
            lived = time.monotonic() - started
            failures = 0 if served or lived > STABLE_AFTER_S else failures + 1
            delay = min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** max(failures - 1, 0))
            slot.restarts += 1
            log.warning("worker-%d %s; restarting in %.1f s", slot.index, reason, delay)
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def ready(self, pid: int, identity: bytes) -> None:
        """A worker process announced itself (see WorkerSlot.ready_pid): the first peer to
        claim the process is taken for it."""
        for slot in self.slots:
            if slot.process is not None and slot.process.pid == pid and slot.ready_pid != pid:
                slot.ready_pid = pid
                slot.ready_identity = identity

    def kill(self, pid: int, reason: str, identity: bytes) -> bool:
        """End a worker the broker declared dead or stuck (it may be hung or SIGSTOPped);
        its watcher then restarts it. True if it was one of ours, still running, and the
        peer lost is the one it joined as."""
        for slot in self.slots:
            if slot.process is not None and slot.process.pid == pid and slot.process.returncode is None:
                if slot.ready_pid != pid or slot.ready_identity != identity:
                    log.warning("not killing worker-%d (pid %d): the peer lost (%s) claimed its "
                                "pid, but is not what it joined as", slot.index, pid, reason)
                    return False
                log.warning("killing worker-%d (pid %d): %s", slot.index, pid, reason)
                _signal(slot.process, signal.SIGKILL)
                return True
        return False

    def describe(self) -> list[dict]:
        """The local worker processes, for /info."""
        return [
            {"slot": s.index, "device": s.device, "state": s.state, "restarts": s.restarts,
             "pid": s.process.pid if s.process and s.process.returncode is None else None,
             "last_exit": s.last_exit}
            for s in self.slots
        ]

    @property
    def restarts(self) -> int:
        return sum(slot.restarts for slot in self.slots)

    def expecting(self) -> bool:
        """Whether a worker process is on its way: starting, or to be restarted."""
        return not self._stopping and any(slot.state != "failed" for slot in self.slots)

    def stop_restarting(self) -> None:
        """A worker that exits from now on stays down: the gateway is stopping. (Restarted,
        workers that a signal to the whole process group had ended reloaded the model while
        the drain waited on them, and admitted requests got 503 when it timed out.)"""
        self._stopping = True
        self._wake.set()

    def hurry(self) -> None:
        """Cut :meth:`stop`'s wait short: the operator asked for the stop a second time."""
        self._hurry.set()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every worker, SIGKILL what is still there after the timeout (at once,
        once hurried)."""
        self.stop_restarting()
        procs = [s.process for s in self.slots if s.process and s.process.returncode is None]
        for proc in procs:
            _signal(proc, signal.SIGTERM)
        if procs:
            exited = asyncio.ensure_future(asyncio.gather(*(p.wait() for p in procs)))
            hurried = asyncio.create_task(self._hurry.wait())
            await asyncio.wait([exited, hurried], timeout=timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
            hurried.cancel()
            for proc in procs:
                if proc.returncode is None:
                    log.warning("worker pid %d %s; killing it", proc.pid,
                                "still running at the second signal" if self._hurry.is_set()
                                else f"did not exit in {timeout_s:.0f} s")
                    _signal(proc, signal.SIGKILL)
                    await proc.wait()
        # Let the watchers end by themselves: one starting a process as stop() came ends it
        # (cancelled there, it left that process running until its model had loaded).
        if self._watchers:
            await asyncio.wait(self._watchers, timeout=WATCHERS_END_S)
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass
