"""Sampling profiles of a server under load: py-spy on every process of its tree.

``python -m benchmarks.run --profile`` attaches ``py-spy record`` to the server process and
each of its worker processes for the length of every measured point, without pausing them
(``--nonblocking``: a sample may tear, but the load is not perturbed by stop-the-world
reads). The raw collapsed stacks go to ``raw/``; the summary kept in ``results.json`` is
where each process spends its samples: by function, and by file (the package or the repo
module the leaf frame is in). That is the "profile before optimising" step of issue 5:
a finding in ``docs/benchmarks.md`` names the frame, the change, and the before/after
points.

py-spy is not a dependency of the server: ``pip install py-spy`` (the ``bench`` extra has
it). Linux only (it reads the processes' memory, which needs ptrace rights: root, or
``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procs import REPO_ROOT, tree_pids

#: Frames look like ``name (path:line)``; the line is dropped so a function is one row.
_FRAME = re.compile(r"^(?P<name>.*) \((?P<path>.*?)(?::\d+)?\)$")
_STDLIB = sysconfig.get_paths()["stdlib"]


class ProfilerUnavailable(RuntimeError):
    pass


def py_spy() -> str:
    """The py-spy executable next to this interpreter, or on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    found = str(here) if here.exists() else shutil.which("py-spy")
    if not found:
        raise ProfilerUnavailable("--profile needs py-spy: pip install py-spy")
    return found


def role_of(pid: int, root: int) -> str | None:
    """``server`` for the process we started; ``worker-N`` for a batchwire worker."""
    if pid == root:
        return "server"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode("utf-8", "replace") for a in argv]
    if "worker" in args and "-m" in args:
        wid = args[args.index("--worker-id") + 1] if "--worker-id" in args else str(pid)
        return wid
    return None  # multiprocessing helpers and the like: not on the request path


@functools.lru_cache(maxsize=None)  # a profile repeats the same few hundred files
def short_path(path: str) -> str:
    """A file as a reader knows it: ``aiohttp/web_protocol.py``, ``gateway/app.py``."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        pass
    if path.startswith(_STDLIB):
        return "stdlib/" + path[len(_STDLIB):].lstrip("/")
    return path


def _frame(text: str) -> tuple[str, str]:
    m = _FRAME.match(text.strip())
    if not m:
        return text.strip(), ""
    path = short_path(m.group("path"))
    return f"{m.group('name')} ({path})", path


@dataclass
class Summary:
    """Where one process's samples went."""

    samples: int = 0
    by_function: Counter = field(default_factory=Counter)   # leaf frame (self time)
    by_file: Counter = field(default_factory=Counter)       # leaf frame's file
    inclusive: Counter = field(default_factory=Counter)     # any frame on the stack

    def as_dict(self, top: int = 12) -> dict:
        def pct(counter: Counter) -> list[list]:
            return [[name, round(100.0 * n / self.samples, 1)]
                    for name, n in counter.most_common(top)] if self.samples else []
        return {"samples": self.samples, "self_by_function": pct(self.by_function),
                "self_by_file": pct(self.by_file), "inclusive": pct(self.inclusive)}


def summarize(collapsed: str) -> Summary:
    """Aggregate py-spy's raw (collapsed-stack) output: ``frame;frame;... count`` lines."""
    summary = Summary()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        # The first element is the thread (py-spy's "thread (0x...)" or a process label).
        frames = [_frame(f) for f in stack.split(";")
                  if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        summary.samples += n
        name, path = frames[-1]
        summary.by_function[name] += n
        summary.by_file[path or name] += n
        for seen in {f[0] for f in frames}:
            summary.inclusive[seen] += n
    return summary


class PointProfiler:
    """py-spy on every process of a server's tree for one measured point."""

    def __init__(self, root_pid: int, out_prefix: Path, duration_s: float, rate: int = 100):
        self.root = root_pid
        self.out_prefix = out_prefix
        self.duration_s = duration_s
        self.rate = rate
        self.running: list[tuple[str, Path, subprocess.Popen]] = []

    def start(self) -> "PointProfiler":
        exe = py_spy()
        self.out_prefix.parent.mkdir(parents=True, exist_ok=True)
        for pid in tree_pids(self.root):
            role = role_of(pid, self.root)
            if role is None:
                continue
            path = Path(f"{self.out_prefix}.{role}.collapsed.txt")
            argv = [exe, "record", "--pid", str(pid), "--rate", str(self.rate),
                    "--duration", str(max(1, round(self.duration_s))), "--format", "raw",
                    "--full-filenames", "--nonblocking", "--output", str(path)]
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.running.append((role, path, proc))
        return self

    def finish(self, timeout_s: float = 60.0) -> dict:
        """Wait for every py-spy; -> {role: summary dict} (or {role: {"error": ...}})."""
        out: dict[str, dict] = {}
        for role, path, proc in self.running:
            try:
                _, err = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode != 0 or not path.exists():
                tail = (err or b"").decode("utf-8", "replace").strip().splitlines()[-3:]
                out[role] = {"error": f"py-spy exited {proc.returncode}: {' / '.join(tail)}"}
                continue
            out[role] = {**summarize(path.read_text(errors="replace")).as_dict(),
                         "raw": os.path.relpath(path, self.out_prefix.parent.parent)}
        self.running.clear()
        return out
