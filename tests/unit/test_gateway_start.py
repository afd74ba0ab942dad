"""What the gateway checks before it binds its worker endpoint (gateway/server.py)."""

from __future__ import annotations

import socket

from gateway.server import ipc_in_use


def test_an_ipc_path_a_process_listens_at_is_in_use_and_a_stale_one_is_not(tmp_path):
    """Binding an ipc:// path replaces its file: a second gateway on it, even one that then
    failed to start, took the running gateway's workers away."""
    path = tmp_path / "workers.sock"
    assert not ipc_in_use(f"ipc://{path}")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen()
    try:
        assert ipc_in_use(f"ipc://{path}")
    finally:
        listening.close()
    assert path.exists() and not ipc_in_use(f"ipc://{path}")  # left by a process gone
    assert not ipc_in_use("tcp://127.0.0.1:5555")
