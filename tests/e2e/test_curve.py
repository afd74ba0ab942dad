"""CURVE-authenticated workers, and a worker on another (network-namespace) host."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import aiohttp
import pytest

from tests.e2e.conftest import free_port, http_get, post, start_gateway, start_worker, wait_for


def keygen(directory, name) -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "keygen", str(directory), "--name", name],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def registered_pids(url: str) -> set[int]:
    try:
        status, body = http_get(url + "/info")
    except OSError:
        return set()
    return {w["pid"] for w in body["workers"]} if status == 200 else set()


async def test_only_workers_with_authorized_keys_get_requests(procs, tmp_path, tiny_model_dir):
    keys, allowed = tmp_path / "keys", tmp_path / "authorized"
    for name in ("gateway", "worker-a", "worker-b"):
        keygen(keys, name)
    assert (keys / "gateway.key").read_text().count("public-key") == 1
    allowed.mkdir()
    shutil.copy(keys / "worker-a.key", allowed)
    port, zmq_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = start_gateway(procs, tmp_path, port, zmq_port,
                            "--curve-secret-key", str(keys / "gateway.key_secret"),
                            "--curve-authorized-keys", str(allowed))
    server_key = str(keys / "gateway.key")
    a = start_worker(procs, tmp_path, zmq_port, tiny_model_dir, "--curve-server-key", server_key,
                     "--curve-secret-key", str(keys / "worker-a.key_secret"))
    b = start_worker(procs, tmp_path, zmq_port, tiny_model_dir, "--curve-server-key", server_key,
                     "--curve-secret-key", str(keys / "worker-b.key_secret"))
    c = start_worker(procs, tmp_path, zmq_port, tiny_model_dir)  # plain, no CURVE at all
    d = start_worker(procs, tmp_path, zmq_port, tiny_model_dir,  # another gateway's key
                     "--curve-server-key", str(keys / "worker-a.key"))
    wait_for(lambda: a.proc.pid in registered_pids(url), 90, "the authorized worker")
    # Each refused worker, and the gateway, say why, with what to change.
    b_key = public_key(keys / "worker-b.key")
    wait_for(lambda: "refused this worker: it does not admit this worker's CURVE key "
             f"{b_key}" in b.log_text(), 90, "worker b to say its key was refused")
    wait_for(lambda: "refused this worker: it requires CURVE: pass --curve-server-key"
             in c.log_text(), 90, "worker c to say the gateway requires CURVE")
    wait_for(lambda: "is {} (--curve-server-key) that gateway's public key?".format(
             keys / "worker-a.key") in d.log_text(), 90,
             "worker d to suspect its --curve-server-key")
    wait_for(lambda: all(line in gateway.log_text() for line in (
        f"its CURVE public key {b_key} is not in {allowed}",
        "before its first message: a worker without CURVE: give it --curve-server-key",
        "before its first message: a worker whose --curve-server-key is not this gateway's")),
        30, "the gateway to log each refusal")
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert registered_pids(url) <= {a.proc.pid}
        for p in (b, c, d):
            assert p.proc.poll() is None, p.log_text()
        time.sleep(0.25)
    await answered_only_by(url, a, "secure", 10)

    # Keys are added and revoked with no restart: on SIGHUP (or within 30 s) the gateway
    # reads the directory again. Worker b, refused until now, tries again and joins;
    # worker a, whose key is taken out, is taken out of dispatch at once.
    shutil.copy(keys / "worker-b.key", allowed)
    (allowed / "worker-a.key").unlink()
    os.kill(gateway.proc.pid, signal.SIGHUP)
    wait_for(lambda: registered_pids(url) == {b.proc.pid}, 60,
             "worker b to join, and worker a to be revoked")
    assert "1 added, 1 removed" in gateway.log_text()
    assert "joined the gateway at" in b.log_text()
    assert "send queue to the gateway is full" not in b.log_text()
    assert "CURVE key was removed from the gateway's --curve-authorized-keys" in a.log_text()
    await answered_only_by(url, b, "rekeyed", 4)
    assert a.proc.poll() is None, a.log_text()


async def answered_only_by(url: str, worker, word: str, n: int) -> None:
    """n requests answered 200, all of them (since it joined) by this worker alone."""
    async with aiohttp.ClientSession() as session:
        for i in range(n):
            status, _, _ = await post(session, url + "/", data=f"{word} {i} [MASK]".encode())
            assert status == 200
    info = http_get(url + "/info")[1]
    assert [(w["pid"], w["answered"]) for w in info["workers"]] == [(worker.proc.pid, n)]


def public_key(path) -> str:
    from protocol import curve
    return curve.load_public(path).decode("ascii")


def test_plain_tcp_off_loopback_warns_loudly(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c",
         "import logging, io; from protocol import curve;"
         "buf = io.StringIO(); h = logging.StreamHandler(buf); log = logging.getLogger('t');"
         "log.addHandler(h);"
         "[curve.warn_if_plain(e, False, log, 'gateway') for e in ("
         "'tcp://127.0.0.1:5555', 'ipc:///tmp/x', 'tcp://0.0.0.0:5555', 'tcp://10.1.2.3:5')];"
         "curve.warn_if_plain('tcp://0.0.0.0:5555', True, log, 'gateway');"
         "print(buf.getvalue())"],
        capture_output=True, text=True, timeout=30, cwd=os.getcwd())
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 2, out.stdout + out.stderr
    assert "0.0.0.0" in lines[0] and "10.1.2.3" in lines[1]
    assert all("without CURVE" in line for line in lines)


# -- a worker on another host: two network namespaces joined by a veth pair ----------------
def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@pytest.fixture
def two_hosts():
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (`ip`) to make network namespaces")
    tag = uuid.uuid4().hex[:6]
    gw, wk = f"bwgw{tag}", f"bwwk{tag}"
    made = _ip("netns", "add", gw)
    if made.returncode != 0:
        pytest.skip(f"cannot create network namespaces here (needs root): {made.stderr.strip()}")
    try:
        _ip("netns", "add", wk).check_returncode()
        _ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}").check_returncode()
        _ip("link", "set", f"va{tag}", "netns", gw).check_returncode()
        _ip("link", "set", f"vb{tag}", "netns", wk).check_returncode()
        for ns, dev, addr in ((gw, f"va{tag}", "10.201.0.1/24"), (wk, f"vb{tag}", "10.201.0.2/24")):
            _ip("-n", ns, "addr", "add", addr, "dev", dev).check_returncode()
            _ip("-n", ns, "link", "set", dev, "up").check_returncode()
            _ip("-n", ns, "link", "set", "lo", "up").check_returncode()
        yield gw, wk
    finally:
        _ip("netns", "del", gw)
        _ip("netns", "del", wk)


def test_a_worker_on_another_host_answers_through_the_network(two_hosts, tmp_path,
                                                               tiny_model_dir):
    gw, wk = two_hosts
    keys = tmp_path / "keys"
    keygen(keys, "gateway")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    port = 8000
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("gateway", "worker")}
    gateway = subprocess.Popen(
        ["ip", "netns", "exec", gw, sys.executable, "-m", "gateway", "gateway",
         "--host", "127.0.0.1", "--port", str(port), "--zmq-bind", "tcp://10.201.0.1:5555",
         "--curve-secret-key", str(keys / "gateway.key_secret")],
        env=env, stdout=logs["gateway"], stderr=subprocess.STDOUT)
    worker = subprocess.Popen(
        ["ip", "netns", "exec", wk, sys.executable, "-m", "gateway", "worker",
         "--connect", "tcp://10.201.0.1:5555", "--model", str(tiny_model_dir),
         "--curve-server-key", str(keys / "gateway.key")],
        env=env, stdout=logs["worker"], stderr=subprocess.STDOUT)

    def in_gateway_ns(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", gw, *cmd], capture_output=True, text=True,
                              timeout=30)

    try:
        def ready() -> bool:
            out = in_gateway_ns("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://127.0.0.1:{port}/ready")
            return out.stdout == "200"
        wait_for(ready, 120, "the remote worker to join", interval=0.5)
        out = in_gateway_ns("curl", "-s", "-X", "POST", "-d", "across the [MASK]",
                            f"http://127.0.0.1:{port}/")
        assert out.stdout.startswith("[{"), out.stdout + out.stderr
        assert '"sequence":"across the' in out.stdout
        info = json.loads(in_gateway_ns("curl", "-s", f"http://127.0.0.1:{port}/info").stdout)
        assert [w["answered"] for w in info["workers"]] == [1]
        assert info["zmq_endpoint"] == "tcp://10.201.0.1:5555"
    finally:
        for proc in (worker, gateway):
            proc.terminate()
        for proc in (worker, gateway):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for f in logs.values():
            f.close()
    assert gateway.returncode == 0 and worker.returncode == 0, \
        (tmp_path / "gateway.log").read_text() + (tmp_path / "worker.log").read_text()


async def test_serve_with_curve_admits_its_own_workers(start_server, tmp_path, tiny_model_dir):
    keygen(tmp_path / "keys", "gateway")
    (tmp_path / "authorized").mkdir()  # no remote worker is listed
    temp = tmp_path / "temp"
    temp.mkdir()
    server = start_server(["--model", str(tiny_model_dir),
                           "--zmq-bind", f"tcp://127.0.0.1:{free_port()}",
                           "--curve-secret-key", str(tmp_path / "keys" / "gateway.key_secret"),
                           "--curve-authorized-keys", str(tmp_path / "authorized")],
                          env={"TMPDIR": str(temp)})
    async with aiohttp.ClientSession() as session:
        status, _, _ = await post(session, server.url + "/", data=b"own [MASK]")
    assert status == 200
    assert "CURVE on: 1 authorized worker key(s)" in server.log_text()
    # Its workers' key pair, secret key included, was left in a temp directory every start.
    def ours() -> list[str]:
        return [p.name for p in temp.iterdir() if p.name.startswith("batchwire-")]

    assert len(ours()) == 1 and ours()[0].startswith("batchwire-keys-")
    assert server.stop() == 0
    assert ours() == []
