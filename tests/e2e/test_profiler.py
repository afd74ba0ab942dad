"""``benchmarks.run --profile``: py-spy on a real process tree, and its summary.

The live test profiles a parent process and a child started the way the supervisor
starts a worker (``-m worker --worker-id ...`` on its command line), each burning CPU in a
function of its own, and checks that each profile finds its own hot function. py-spy is in
the ``bench`` extra that ``make test`` installs: its absence fails the test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from benchmarks.profiler import PointProfiler, py_spy, short_path, summarize
from benchmarks.report import profile_tables

pytestmark = pytest.mark.e2e

BURN = textwrap.dedent("""
    import subprocess, sys, time
    def {name}():
        end = time.monotonic() + {seconds}
        while time.monotonic() < end:
            sum(i * i for i in range(500))
    if len(sys.argv) > 1 and sys.argv[1] == "parent":
        child = subprocess.Popen([sys.executable, "-c", sys.argv[2].replace("parent_burn",
                                  "child_burn"), "-m", "worker", "--worker-id", "worker-7"])
        print("ready", flush=True)
        {name}()
        child.wait()
    else:
        {name}()
""")


def test_summary_counts_leaf_frames_by_function_and_file():
    collapsed = "\n".join([
        "thread (0x1);main (/x/site-packages/aiohttp/web.py:10);encode (/x/site-packages/orjson/__init__.py:3) 30",
        "thread (0x1);main (/x/site-packages/aiohttp/web.py:10);encode (/x/site-packages/orjson/__init__.py:7) 10",
        "thread (0x2);main (/x/site-packages/aiohttp/web.py:12) 60",
        "garbage line",
    ])
    s = summarize(collapsed)
    assert s.samples == 100
    # Line numbers are dropped: one function is one row.
    assert s.by_function.most_common(2) == [("main (aiohttp/web.py)", 60),
                                            ("encode (orjson/__init__.py)", 40)]
    assert s.by_file["orjson/__init__.py"] == 40
    # Inclusive time counts a frame once per stack, however deep it recurs.
    assert s.inclusive["main (aiohttp/web.py)"] == 100
    d = s.as_dict(top=1)
    assert d["self_by_function"] == [["main (aiohttp/web.py)", 60.0]]


def test_short_path_names_packages_and_repo_modules():
    assert short_path("/v/lib/python3.11/site-packages/zmq/sugar/socket.py") == "zmq/sugar/socket.py"
    from benchmarks.procs import REPO_ROOT
    assert short_path(str(REPO_ROOT / "gateway" / "app.py")) == "gateway/app.py"


def test_point_profiler_profiles_server_and_worker_processes(tmp_path):
    py_spy()  # ProfilerUnavailable fails the test: make test installs py-spy
    code = BURN.format(name="parent_burn", seconds=6)
    proc = subprocess.Popen([sys.executable, "-c", code, "parent", code],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        # The child is in the tree once Popen returned in the parent, which printed after.
        profiler = PointProfiler(proc.pid, tmp_path / "raw" / "point", duration_s=2, rate=50)
        profiler.start()
        roles = sorted(role for role, _, _ in profiler.running)
        assert roles == ["server", "worker-7"], roles
        profiles = profiler.finish()
    finally:
        proc.kill()
        proc.wait()
    for role, hot in (("server", "parent_burn"), ("worker-7", "child_burn")):
        prof = profiles[role]
        assert "error" not in prof, prof
        assert prof["samples"] > 20, prof
        hot_share = sum(pct for name, pct in prof["inclusive"] if name.startswith(hot))
        assert hot_share > 80, (role, prof["inclusive"])
        assert (tmp_path / prof["raw"]).exists()

    workload = {"servers": {"batchwire": {"points": [{"mode": "closed", "concurrency": 8,
                                                       "profile": profiles}]}}}
    table = "\n".join(profile_tables(workload))
    assert "**batchwire, C=8, worker-7**" in table
    assert "child_burn" in table
