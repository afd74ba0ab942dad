"""API keys (gateway/api_keys.py): --api-key and the keys of --api-keys-file, rotated by
rewriting the file, on the real app served on 127.0.0.1; and `batchwire gateway` refusing a
keys file it cannot use."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.api_keys import ApiKeys, ApiKeysError, read_keys
from gateway.app import API_KEYS, create_app
from gateway.broker import Broker
from gateway.config import GatewayConfig
from protocol.version import package_version
from tests.e2e.conftest import free_port, start_gateway, wait_for


def write_keys(path, *lines: str) -> str:
    # As renewals do: a new file moved over the old one.
    fresh = path.with_suffix(".new")
    fresh.write_text("".join(line + "\n" for line in lines))
    os.replace(fresh, path)
    return str(path)


async def status(client, key: str | None, path: str = "/info") -> int:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with client.get(path, headers=headers) as response:
        return response.status


async def test_keys_rotate_by_rewriting_the_file_with_no_restart(tmp_path, caplog):
    keys_file = write_keys(tmp_path / "keys", "# clients of team A", "old-key", "", "other-key")
    config = GatewayConfig(api_key="flag-key", api_keys_file=keys_file)
    app = create_app(config, Broker("inproc://api-keys-test", max_queue=1))
    async with TestClient(TestServer(app)) as client:
        for key in ("flag-key", "old-key", "other-key"):
            assert await status(client, key) == 200, key
        for key in (None, "wrong", "old-ke", "# clients of team A"):
            assert await status(client, key) == 401, key
        assert await status(client, None, "/health") == 200  # probes stay open
        info = await (await client.get("/info", headers={"Authorization": "Bearer old-key"})).json()
        assert info["api_keys"] == 3 and info["config"]["api_key"] == "***"
        assert info["version"] == package_version()

        # Rotation: the new key added, then the old one removed; each takes effect at the
        # next check (here called at once, as the gateway's 30 s watch would).
        keys = app[API_KEYS]
        write_keys(tmp_path / "keys", "old-key", "other-key", "new-key")
        assert keys.reload_if_changed()
        assert await status(client, "new-key") == 200 and await status(client, "old-key") == 200
        write_keys(tmp_path / "keys", "other-key", "new-key")
        assert keys.reload_if_changed()
        assert await status(client, "old-key") == 401 and await status(client, "new-key") == 200
        assert keys.reload_if_changed() is False  # unchanged since

        # A file that breaks is logged, and the keys before kept.
        write_keys(tmp_path / "keys", "new-key", "two words")
        with caplog.at_level(logging.ERROR, logger="batchwire.gateway.api_keys"):
            assert keys.reload_if_changed() is False
        assert any("keys:2: not a key" in r.getMessage() for r in caplog.records)
        assert await status(client, "new-key") == 200 and await status(client, "other-key") == 200

        # Emptied on purpose, it fails closed: only --api-key's key is left.
        write_keys(tmp_path / "keys", "# every client revoked")
        assert keys.reload_if_changed()
        assert await status(client, "new-key") == 401 and await status(client, "flag-key") == 200


def test_a_keys_file_that_failed_to_load_is_read_again_at_the_next_check(tmp_path,
                                                                         monkeypatch, caplog):
    """A file that could not be read when it changed (written root-only, say) was not read
    again once it could be, since a chmod leaves its mtime alone: the new key stayed
    refused until the file changed again. A failed load is retried at each check."""
    import gateway.api_keys

    keys_file = write_keys(tmp_path / "keys", "old")
    keys = ApiKeys(keys_file=keys_file)
    write_keys(tmp_path / "keys", "old", "new")
    monkeypatch.setattr(gateway.api_keys, "unreadable", lambda path: "permission denied")
    with caplog.at_level(logging.ERROR, logger="batchwire.gateway.api_keys"):
        assert keys.reload_if_changed() is False
    assert "permission denied; still accepting the keys read before" in caplog.text
    assert not keys.accepts("Bearer new")
    monkeypatch.undo()  # the chmod: nothing about the file changes
    assert keys.reload_if_changed() is True and keys.accepts("Bearer new")
    assert keys.reload_if_changed() is False


def test_a_watch_goes_on_after_a_check_that_raises(caplog):
    """One check that raised something unexpected (an encrypted TLS key did) ended the 30 s
    watch for good, silently: no renewal was picked up again."""
    import asyncio

    from gateway.watched_files import every

    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(22, "Invalid argument")

    async def watch_three() -> None:
        task = asyncio.create_task(every(0.001, check))
        try:
            while len(calls) < 3:
                await asyncio.sleep(0.001)
        finally:
            task.cancel()

    with caplog.at_level(logging.ERROR, logger="batchwire.gateway.watched_files"):
        asyncio.run(asyncio.wait_for(watch_three(), 5))
    assert len(calls) >= 3 and "checking watched files failed" in caplog.text


def test_a_keys_file_that_cannot_be_used_says_where_and_why(tmp_path):
    with pytest.raises(ApiKeysError, match="cannot read the API keys file .*--api-keys-file"):
        ApiKeys(keys_file=str(tmp_path / "missing"))
    # A FIFO would block the event loop on open (every request, probes included, hung).
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ApiKeysError, match="fifo' .*: not a regular file"):
        ApiKeys(keys_file=str(tmp_path / "fifo"))
    with pytest.raises(ApiKeysError, match="holds no key"):
        ApiKeys(keys_file=write_keys(tmp_path / "empty", "# nothing yet", ""))
    with pytest.raises(ApiKeysError, match=r"bad:2: not a key"):
        read_keys(write_keys(tmp_path / "bad", "good", "caf\u00e9"))
    assert read_keys(write_keys(tmp_path / "ok", "  a  ", "#b", "c")) == ["a", "c"]
    assert not ApiKeys().required and ApiKeys().accepts("Bearer anything") is False


def test_gateway_with_a_keys_file_it_cannot_read_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gateway", "gateway", "--port", str(free_port()),
                           "--api-keys-file", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot read the API keys file" in lines[0], done.stderr


def test_sighup_reads_the_keys_file_at_once(procs, tmp_path):
    """The watch checks every 30 s; SIGHUP checks now (as nginx reloads on it)."""
    keys_file = write_keys(tmp_path / "keys", "first-key")
    port = free_port()
    gateway = start_gateway(procs, tmp_path, port, free_port(), "--api-keys-file", keys_file)
    url = f"http://127.0.0.1:{port}/info"

    def info_status(key: str) -> int:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return answer.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 0  # not listening yet

    wait_for(lambda: info_status("first-key") == 200, 30, "the gateway to answer")
    write_keys(tmp_path / "keys", "second-key")
    gateway.proc.send_signal(signal.SIGHUP)
    # Well inside the 30 s between checks: only the signal can have done it.
    wait_for(lambda: info_status("second-key") == 200, 10, "the new key to be accepted")
    assert info_status("first-key") == 401
    assert gateway.stop() == 0
    assert "SIGHUP: checking the TLS, API key and worker key files now" in gateway.log_text()
