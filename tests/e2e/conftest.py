"""Real `batchwire serve` processes on 127.0.0.1 for end-to-end tests.

A server is started as a subprocess on a free port; readiness is a probe of /ready with a
monotonic deadline, never a log line or a fixed sleep. Teardown sends SIGTERM and checks
the process exited 0, left no child process behind, and freed its port.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


_PORTS_GIVEN: set[int] = set()
#: Ports tests listen on come from below the kernel's ephemeral range (32768 and up on
#: Linux), which it never hands out on its own, split between pytest-xdist's workers: a port
#: one worker picked cannot be picked by another before its server binds it.
_PORT_RANGE = (10000, 32000)


def _port_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    width = (_PORT_RANGE[1] - _PORT_RANGE[0]) // max(count, 1)
    start = _PORT_RANGE[0] + index * width
    return range(start, start + width)


_PORTS = _port_slice()
_next_port = itertools.count(random.randrange(len(_PORTS)))


def free_port() -> int:
    """A port free now, and not handed out before in this run: a test that takes two (HTTP
    and ZeroMQ) binds neither before asking for the second."""
    for _ in range(len(_PORTS)):
        port = _PORTS[next(_next_port) % len(_PORTS)]
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port left in {_PORTS}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def children_of(pid: int) -> list[int]:
    """Every live descendant of pid, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name in parentheses: state, ppid, ...
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def ended(pid: int) -> bool:
    """Whether process ``pid`` is gone or a zombie (it may go while this reads it)."""
    try:
        return "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    except OSError:
        return True


def wait_for(predicate, timeout: float, message: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(interval)


async def wait_for_async(predicate, timeout: float, message: str, interval: float = 0.02):
    """Like wait_for, for async tests: the predicate may be a plain or a coroutine function,
    and polling yields to the event loop so the test's own requests keep moving."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")
        await asyncio.sleep(interval)


async def post(session, url: str, **kwargs):
    """POST and read the whole answer: (status, headers, parsed JSON body or None)."""
    async with session.post(url, **kwargs) as resp:
        body = await resp.read()
        return resp.status, resp.headers.copy(), json.loads(body) if body else None


def burst(session, url: str, count: int, prefix: str) -> list:
    """Start `count` concurrent POSTs of distinct fill-mask texts; returns their futures."""
    import asyncio

    return [asyncio.ensure_future(post(session, url + "/", data=f"{prefix} {i} [MASK]".encode()))
            for i in range(count)]


async def wait_worker_busy(session, server: "Server | str", pid: int, timeout: float = 30) -> None:
    """Until the worker with this pid holds unanswered requests (so killing or stopping it
    really strands work that must be requeued)."""
    async def busy() -> bool:
        info = await info_async(session, server)
        return any(w["pid"] == pid and w["in_flight"] for w in info["workers"])
    await wait_for_async(busy, timeout, f"worker {pid} to hold requests", 0.002)


async def info_async(session, server: "Server | str") -> dict:
    url = server if isinstance(server, str) else server.url
    async with session.get(url + "/info") as resp:
        assert resp.status == 200
        return await resp.json()


class Gate:
    """One gate of the fault pipeline (tests/fixtures/fault_pipeline.py): a model call whose
    batch holds ``text`` waits until :meth:`open`. Used as a context manager, it is opened on
    the way out whatever happened, so a failing test does not leave a worker held."""

    def __init__(self, directory: Path, name: str):
        self.name = name
        self.text = f"GATE:{name} [MASK]"
        self._path = directory / name

    def reached(self) -> bool:
        """Whether a model call has reached this gate (and so is running, held)."""
        return self._path.with_name(self.name + ".reached").exists()

    async def wait_reached(self, timeout: float = 30) -> None:
        await wait_for_async(self.reached, timeout, f"a model call to reach gate {self.name}")

    def open(self) -> None:
        self._path.touch()

    def __enter__(self) -> "Gate":
        return self

    def __exit__(self, *exc) -> None:
        self.open()


class Gates:
    """Makes :class:`Gate` s; a server whose model calls they hold is started with
    ``env=gates.env`` and the fault model (``--task fault-fill-mask``)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._numbers = itertools.count()

    @property
    def env(self) -> dict[str, str]:
        return {"FAULT_GATE_DIR": str(self.directory)}

    def new(self, label: str = "gate") -> Gate:
        return Gate(self.directory, f"{label}{next(self._numbers)}")


@pytest.fixture(scope="module")
def gates(tmp_path_factory) -> Gates:
    return Gates(tmp_path_factory.mktemp("gates"))


async def stop_while_holding_work(session, server: "Server | str", victim: int,
                                  prefix: str, count: int, attempts: int = 5) -> list:
    """SIGSTOP worker ``victim`` while it holds requests of a burst of ``count``; returns
    the burst's futures, the victim stopped. Busy when seen is not enough: by the time the
    signal lands it may have answered everything. Stopped, it cannot answer any more, so
    /info then tells for sure (read twice, so answers it sent just before are read first);
    if it holds nothing, it is let go on and a new burst tried."""
    async def held() -> int:
        info = await info_async(session, server)
        return sum(w["in_flight"] for w in info["workers"] if w["pid"] == victim)

    for attempt in range(attempts):
        requests = burst(session, server if isinstance(server, str) else server.url, count,
                         f"{prefix}{attempt}")
        await wait_worker_busy(session, server, victim)
        os.kill(victim, signal.SIGSTOP)
        if await held() and await held():
            return requests
        os.kill(victim, signal.SIGCONT)
        replies = await asyncio.gather(*requests)
        assert [s for s, _, _ in replies] == [200] * count, replies
    raise AssertionError(f"worker {victim} held no requests when stopped, {attempts} times")


class Server:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.args = args
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True) -> "Server":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), *self.args],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            # A process group of its own, as a server started from a shell has: a test may
            # signal the group (os.killpg), as Ctrl-C and systemd do.
            start_new_session=True,
        )
        if wait_ready:
            self.wait_ready()
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                return http_get(self.url + "/ready", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, f"{self.url}/ready\n{self.log_path}")

    def info(self) -> dict:
        status, body = http_get(self.url + "/info")
        assert status == 200, body
        return body

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            kids = children_of(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            finally:
                if self.proc.poll() is None:
                    for pid in children_of(self.proc.pid):
                        os.kill(pid, signal.SIGKILL)
                    self.proc.kill()
                    self.proc.wait()
            leftover = [pid for pid in kids if not ended(pid)]
            assert not leftover, f"worker processes left behind: {leftover}\n{self.log_text()}"
        self._log.close()
        with socket.socket() as s:
            # SO_REUSEADDR: connections in TIME_WAIT are fine, a listener still there is not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
        return self.proc.returncode


def _server_factory(tmp_path_factory):
    """start(args, env=None, wait_ready=True) -> Server; every server it started is stopped
    (and checked for a clean exit) when the generator resumes."""
    servers: list[Server] = []

    def start(args: list[str], env: dict | None = None, wait_ready: bool = True) -> Server:
        log_path = tmp_path_factory.mktemp("serve") / "serve.log"
        server = Server(args, log_path, env)
        servers.append(server)
        return server.start(wait_ready=wait_ready)

    yield start
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            assert server.stop() == 0, server.log_text()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Factory: start_server(args, env=None, wait_ready=True) -> Server, stopped (and checked
    for a clean exit) when the test module ends."""
    yield from _server_factory(tmp_path_factory)


@pytest.fixture(scope="session")
def start_shared_server(tmp_path_factory):
    """Like start_server, for the servers several modules share: each server start costs
    seconds of torch import, so a plain configuration is started once a session. Tests on
    a shared server must not depend on what other tests sent it (count deltas, filter by
    request id)."""
    yield from _server_factory(tmp_path_factory)


@pytest.fixture(scope="session")
def fill_mask_server(start_shared_server, tiny_model_dir) -> Server:
    """One worker serving the tiny fill-mask model with default batching settings."""
    return start_shared_server(["--model", str(tiny_model_dir), "--workers", "1"])


@pytest.fixture(scope="session")
def features_server(start_shared_server, tiny_model_dir) -> Server:
    """One worker serving the tiny model as token-level feature-extraction, logging JSON."""
    return start_shared_server(["--model", str(tiny_model_dir), "--task", "feature-extraction",
                                "--workers", "1", "--log-format", "json"])


class Proc:
    """A `batchwire gateway` or `batchwire worker` subprocess with its log."""

    def __init__(self, args: list[str], log_path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", *args], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"did not exit on {sig}:\n{self.log_text()}")
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.stop(signal.SIGKILL)


def start_gateway(procs, tmp_path, port: int, zmq_port: int, *extra: str) -> Proc:
    p = Proc(["gateway", "--port", str(port), "--zmq-bind", f"tcp://127.0.0.1:{zmq_port}",
              *extra], tmp_path / f"gateway-{len(procs)}.log")
    procs.append(p)
    return p


def start_worker(procs, tmp_path, zmq_port: int, model, *extra: str) -> Proc:
    p = Proc(["worker", "--connect", f"tcp://127.0.0.1:{zmq_port}", "--model", str(model),
              "--worker-id", f"remote-{len(procs)}", *extra], tmp_path / f"worker-{len(procs)}.log")
    procs.append(p)
    return p


def workers_ready(url: str, n: int):
    def check():
        try:
            status, body = http_get(url + "/info")
        except OSError:
            return False
        return status == 200 and len(body["workers"]) == n
    return check
