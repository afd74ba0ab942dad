"""Process plumbing for the benchmark: free ports, server subprocesses, CPU accounting.

A server runs in its own session (process group) so that stopping it reaches the worker
processes it started too: SIGTERM to the group, a bounded wait, then SIGKILL to the group.
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent


def die_with_parent() -> None:
    """``preexec_fn``: on Linux, SIGTERM this child when the process that started it dies.

    So a benchmark killed mid-run (a test timeout, ^C twice) leaves no server behind.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every benchmark subprocess gets: offline, quiet, repo importable."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
    )
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    if extra:
        env.update(extra)
    return env


# -- CPU accounting (Linux /proc; None elsewhere) ------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read_stats() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, cpu seconds) for every process we can read."""
    stats: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                raw = fh.read().decode("ascii", "replace")
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2:].split()
        try:
            stats[int(name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK)
        except (IndexError, ValueError):
            continue
    return stats


def _tree(pid: int, stats: dict[int, tuple[int, float]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(p)
    found, stack = [], [pid]
    while stack:
        p = stack.pop()
        found.append(p)
        stack.extend(children.get(p, ()))
    return found


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants (empty if it is gone or /proc is missing)."""
    if not os.path.isdir("/proc"):
        return []
    stats = _read_stats()
    return _tree(pid, stats) if pid in stats else []


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by ``pid`` and its live descendants."""
    if not os.path.isdir("/proc"):
        return None
    stats = _read_stats()
    if pid not in stats:
        return None
    return sum(stats[p][1] for p in _tree(pid, stats))


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return (total - idle) / _TICK, total / _TICK


# -- servers --------------------------------------------------------------------------------
class ServerFailed(RuntimeError):
    pass


@dataclass
class ServerProcess:
    """A server subprocess on 127.0.0.1:``port`` whose output goes to ``log_path``."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] | None = None
    #: Where it runs (``python -m`` imports from there first); the repository by default.
    cwd: Path | None = None
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_after_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(f"$ {' '.join(self.argv)}\n".encode())
        log.flush()
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.cwd or REPO_ROOT, env=self.env or bench_env(), start_new_session=True,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        log.close()
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, deadline_s: float, probe_body: bytes, path: str = "/") -> float:
        """Poll ``POST path`` with ``probe_body`` until it answers 200; -> seconds taken.

        A real inference answer, not a health route, is the readiness signal: it means the
        model is loaded and has served once, for every server alike.
        """
        end = time.monotonic() + deadline_s
        last = "no answer yet"
        while time.monotonic() < end:
            if not self.alive():
                raise ServerFailed(f"{self.name} exited with code {self.process.returncode} "
                                   f"before it was ready:\n{self.log_tail()}")
            request = urllib.request.Request(self.base_url + path, data=probe_body,
                                             method="POST",
                                             headers={"Content-Type": "text/plain"})
            try:
                wait = min(10.0, max(end - time.monotonic(), 0.1))
                with urllib.request.urlopen(request, timeout=wait) as resp:
                    resp.read()
                    if resp.status == 200:
                        self.ready_after_s = time.monotonic() - self.started_at
                        return self.ready_after_s
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        raise ServerFailed(f"{self.name} was not ready within {deadline_s:.0f} s ({last}):\n"
                           f"{self.log_tail()}")

    def cpu_seconds(self) -> float | None:
        return tree_cpu_seconds(self.process.pid) if self.alive() else None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the server's process group, wait, then SIGKILL what is left."""
        proc = self.process
        if proc is None:
            return None
        pgid = proc.pid  # start_new_session: the group id is the leader's pid
        if proc.poll() is None:
            _kill_group(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                print(f"[bench] {self.name} did not stop within {timeout_s:.0f} s; killing it",
                      file=sys.stderr)
        # Whatever is left in the group (a worker that outlived its gateway) goes too.
        _kill_group(pgid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
