"""Runs the gateway process: HTTP site, broker, optional supervisor, signals, drain."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile

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
from protocol import curve, eventloop
from protocol.heap import freeze_startup_objects

log = logging.getLogger("batchwire.gateway")


async def run_gateway(config: GatewayConfig, serve: ServeConfig | None = None) -> int:
    tls: ServerTls | None = None
    try:
        # Read first: files that cannot be used stop the gateway before it starts anything.
        if config.tls_cert and config.tls_key:
            tls = ServerTls(config.tls_cert, config.tls_key)
        api_keys = ApiKeys(config.api_key, config.api_keys_file)
    except (TlsConfigError, ApiKeysError) as exc:
        log.critical("%s", exc)
        return 2
    ipc_dir = None
    endpoint = config.zmq_bind
    if endpoint is None:
        ipc_dir = tempfile.mkdtemp(prefix="batchwire-")
        endpoint = f"ipc://{ipc_dir}/workers.sock"
    broker = Broker(endpoint, max_queue=config.max_queue,
                    max_held_bytes=config.max_held_bytes,
                    heartbeat_interval_s=config.heartbeat_interval_s,
                    batch_timeout_s=config.batch_timeout_s,
                    curve_secret_key=config.curve_secret_key,
                    curve_authorized_keys=config.curve_authorized_keys)
    local_worker_args: list[str] = []
    if serve is not None and config.curve_secret_key:
        # serve's own workers get a fresh key pair in a private (0700) directory, admitted
        # alongside any --curve-authorized-keys.
        keys_dir = tempfile.mkdtemp(prefix="batchwire-keys-")
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
    reread: list[ServerTls | ApiKeys] = [tls] if tls is not None else []
    if config.api_keys_file:
        reread.append(api_keys)
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

    signals_seen = 0
    drain_task: asyncio.Task | None = None

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s: draining (again to force)", sig.name)
            stop.set()
        else:
            log.warning("%s again: stopping now", sig.name)
            broker.draining = True
            if drain_task is not None:
                drain_task.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    def on_hangup() -> None:
        # As nginx does: SIGHUP reads the watched files now, not at the next 30 s check.
        log.info("SIGHUP: checking the TLS and API key files now")
        for files in reread:
            check_now(files.reload_if_changed)

    if reread:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)

    await stop.wait()
    drain_task = asyncio.create_task(broker.drain(config.drain_timeout_s))
    drained = False
    try:
        drained = await drain_task
        if not drained:
            log.warning("drain timeout: %d request(s) still in flight", broker.in_flight)
    except asyncio.CancelledError:
        pass
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
    if ipc_dir is not None:
        for name in os.listdir(ipc_dir):
            os.unlink(os.path.join(ipc_dir, name))
        os.rmdir(ipc_dir)
    log.info("stopped")
    return exit_code
