"""CURVE keys for the gateway <-> worker link (ZeroMQ's built-in encryption and auth).

Key files are ZeroMQ certificates written by ``batchwire keygen`` (``zmq.auth``):
``NAME.key`` holds the public key, ``NAME.key_secret`` the public and secret keys. The
gateway's secret file makes it a CURVE server; workers need the gateway's public key to
connect at all, and with ``--curve-authorized-keys DIR`` only workers whose public key
file is in DIR are admitted (checked by a ZAP authenticator before any frame is read;
gateway/worker_keys.py).
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import zmq
import zmq.auth


def generate(directory: str | Path, name: str) -> tuple[Path, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def load_public(path: str | Path) -> bytes:
    """The public key from a .key or .key_secret file."""
    public, _ = zmq.auth.load_certificate(str(path))
    return public


def load_keypair(path: str | Path) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ValueError(f"{path} holds no secret key: pass the .key_secret file")
    return public, secret


def is_exposed_tcp(endpoint: str) -> bool:
    """True for tcp:// endpoints reachable from other hosts (not loopback)."""
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", ""):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name, or * / 0.0.0.0 style wildcards: reachable


def warn_if_plain(endpoint: str, curve: bool, log: logging.Logger, role: str) -> None:
    if is_exposed_tcp(endpoint) and not curve:
        log.warning(
            "!!! %s uses plain tcp on %s without CURVE: anyone who can reach it can %s. "
            "Create keys with `batchwire keygen` and pass --curve-* flags.", role, endpoint,
            "join as a worker and read every request" if role == "gateway"
            else "read this worker's traffic or impersonate the gateway")


def curve_supported() -> bool:
    return bool(zmq.has("curve"))
