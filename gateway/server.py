"""Runs the gateway process: HTTP site, broker, optional supervisor, signals, drain."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import tempfile
import time

import zmq
from aiohttp import web

from gateway.api_keys import ApiKeys, ApiKeysError
from gateway.app import CONNECTIONS, SUPERVISOR, create_app, runner_settings
from gateway.broker import Broker
from gateway.config import GatewayConfig, ServeConfig
from gateway.connections import make_room_for
from gateway.supervisor import Supervisor
from gateway.tls import ServerTls, TlsConfigError
from gateway.watched_files import check_now
from gateway.worker_keys import WorkerKeys
from protocol import curve, eventloop
from protocol.heap import freeze_startup_objects
from worker.config import MAX_IPC_PATH_BYTES, REPEAT_WITHIN_S

log = logging.getLogger("batchwire.gateway")


async def run_gateway(config: GatewayConfig, serve: ServeConfig | None = None) -> int:
    """Serve until stopped; the exit status. The private directories made on the way (the
    workers' socket, serve's workers' CURVE keys) are removed however it ends."""
    private_dirs: list[str] = []
    try:
        return await _run_gateway(config, serve, private_dirs)
    finally:
        for path in private_dirs:
            shutil.rmtree(path, ignore_errors=True)


def ipc_in_use(endpoint: str) -> bool:
    """Whether a process listens at ``endpoint``'s socket file. Binding an ipc:// endpoint
    replaces the file: a second gateway on the same path, even one that then failed to
    start, took the running one's workers from it, and its restarted workers never joined."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return False
    path = endpoint[len("ipc://"):]
    if not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:  # refused: a file left by a process that is gone
        return False
    finally:
        probe.close()


async def _run_gateway(config: GatewayConfig, serve: ServeConfig | None,
                       private_dirs: list[str]) -> int:
    tls: ServerTls | None = None
    try:
        # Read first: files that cannot be used stop the gateway before it starts anything.
        if config.tls_cert and config.tls_key:
            tls = ServerTls(config.tls_cert, config.tls_key)
        api_keys = ApiKeys(config.api_key, config.api_keys_file)
    except (TlsConfigError, ApiKeysError) as exc:
        log.critical("%s", exc)
        return 2
    endpoint = config.zmq_bind
    if endpoint is None:
        ipc_dir = tempfile.mkdtemp(prefix="batchwire-")
        if len(f"{ipc_dir}/workers.sock".encode()) > MAX_IPC_PATH_BYTES:
            # A deep TMPDIR (CI runners, macOS's /var/folders/...) made serve fail to start.
            os.rmdir(ipc_dir)
            ipc_dir = tempfile.mkdtemp(prefix="batchwire-", dir="/tmp")
        private_dirs.append(ipc_dir)
        endpoint = f"ipc://{ipc_dir}/workers.sock"
    elif ipc_in_use(endpoint):
        log.critical("another process listens at %s: stop it, or give this gateway another "
                     "--zmq-bind", endpoint)
        return 2
    broker = Broker(endpoint, max_queue=config.max_queue,
                    default_timeout_s=config.timeout_ms / 1000.0,
                    max_held_bytes=config.max_held_bytes,
                    heartbeat_interval_s=config.heartbeat_interval_s,
                    batch_timeout_s=config.batch_timeout_s,
                    poison_memory_s=config.poison_memory_s,
                    curve_secret_key=config.curve_secret_key,
                    curve_authorized_keys=config.curve_authorized_keys)
    local_worker_args: list[str] = []
    if serve is not None and config.curve_secret_key:
        # serve's own workers get a fresh key pair in a private (0700) directory, admitted
        # alongside any --curve-authorized-keys.
        keys_dir = tempfile.mkdtemp(prefix="batchwire-keys-")
        private_dirs.append(keys_dir)
        public, secret = curve.generate(keys_dir, "local-worker")
        broker.extra_worker_keys.add(curve.load_public(public))
        local_worker_args = ["--curve-server-key", config.curve_secret_key,
                             "--curve-secret-key", str(secret)]
    try:
        await broker.start()
    except zmq.ZMQError as exc:
        log.critical("cannot bind the worker endpoint %s: %s", endpoint, exc)
        return 2
    except (OSError, ValueError) as exc:
        log.critical("cannot read CURVE keys: %s", exc)
        return 2
    log.info("broker bound to %s", endpoint)

    stop = asyncio.Event()
    exit_code = 0

    def give_up(reason: str) -> None:
        nonlocal exit_code
        log.critical("%s: stopping", reason)
        exit_code = 2
        stop.set()

    supervisor = None
    if serve is not None:
        supervisor = Supervisor(serve.workers, endpoint, config.heartbeat_interval_s,
                                config.batch_timeout_s, config.log_level,
                                on_exit=broker.worker_process_exited,
                                log_format=config.log_format, on_give_up=give_up,
                                extra_args=local_worker_args, event_loop=config.event_loop)
        broker.on_worker_dead = supervisor.kill
        broker.on_worker_ready = supervisor.ready
        broker.expecting_workers = supervisor.expecting
        broker.metrics.set_restarts(lambda: supervisor.restarts)

    app = create_app(config, broker, api_keys)
    if tls is not None:
        broker.metrics.watch_tls(tls)
    app[SUPERVISOR] = supervisor
    runner = web.AppRunner(app, **runner_settings())
    await runner.setup()
    room = make_room_for(config.max_connections)
    if room is not None:
        log.log(*room)
    listener: asyncio.AbstractServer | None = None
    # What the gateway reads again when it changes: every 30 s, and at once on SIGHUP.
    reread: list[ServerTls | ApiKeys | WorkerKeys] = [tls] if tls is not None else []
    if config.api_keys_file:
        reread.append(api_keys)
    if broker.worker_keys is not None:
        reread.append(broker.worker_keys)
    watches: list[asyncio.Task] = []
    try:
        listener = await app[CONNECTIONS].listen(runner, config.host, config.port,
                                                 ssl=tls.context if tls is not None else None)
    except OSError as exc:
        log.critical("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror or exc)
        stop.set()
        exit_code = 2
    else:
        log.info("listening on %s://%s:%d (pid %d, %s loop)", "https" if tls else "http",
                 config.host, config.port, os.getpid(), eventloop.loop_name())
        watches = [asyncio.create_task(files.watch()) for files in reread]
        freeze_startup_objects()
        if supervisor is not None:
            await supervisor.start()

    first_signal_at: float | None = None
    drain_task: asyncio.Task | None = None

    def on_signal(sig: signal.Signals) -> None:
        nonlocal first_signal_at
        now = time.monotonic()
        if first_signal_at is None:
            first_signal_at = now
            log.info("%s: draining (again to force)", sig.name)
            if supervisor is not None:
                supervisor.stop_restarting()
            stop.set()
        elif now - first_signal_at < REPEAT_WITHIN_S:
            # GNU timeout signals the process, then its group; so do some init systems.
            # One request to stop, delivered twice, skipped the drain.
            log.debug("%s again %.3f s after the first: the same request to stop", sig.name,
                      now - first_signal_at)
        else:
            log.warning("%s again: stopping now", sig.name)
            broker.draining = True
            if drain_task is not None:
                drain_task.cancel()
            if supervisor is not None:
                supervisor.hurry()

    loop = asyncio.get_running_loop()
    # SIGQUIT as nginx reads it: a graceful stop. (Its default ended the gateway at once,
    # dropping admitted requests, with nothing logged.)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, on_signal, sig)

    def on_hangup() -> None:
        # As nginx does: SIGHUP reads the watched files now, not at the next 30 s check.
        # Without any, it is ignored: its default ended the gateway at once (a closed
        # terminal, or an operator used to SIGHUP meaning "reload").
        if not reread:
            log.info("SIGHUP: no TLS, API key or worker key files to read again; ignored")
        else:
            log.info("SIGHUP: checking the TLS, API key and worker key files now")
        for files in reread:
            check_now(files.reload_if_changed)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)

    await stop.wait()
    drain_task = asyncio.create_task(broker.drain(config.drain_timeout_s))
    drained = False
    try:
        drained = await drain_task
        if not drained:
            # Inputs, not HTTP requests: a list of 64 is 64 of them.
            log.warning("drain timeout: %d input(s) still in flight, answered 503 draining",
                        broker.in_flight)
    except asyncio.CancelledError:
        log.warning("stopped before the drain was done: %d input(s) still in flight, "
                    "answered 503 draining", broker.in_flight)
    await broker.close()
    if supervisor is not None:
        # A worker still busy once the drain is over (forced by a second signal, or past
        # --drain-timeout-s) computes answers nobody waits for any more: the 503s are out, so
        # it gets one second before SIGKILL, not ten, and the drain timeout bounds the exit.
        await supervisor.stop(timeout_s=10.0 if drained else 1.0)
    for watch in watches:
        watch.cancel()
    if listener is not None:
        listener.close()  # no new connections; runner.cleanup() closes the open ones
    await runner.cleanup()
    log.info("stopped")
    return exit_code
