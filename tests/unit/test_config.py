"""Flags, BATCHWIRE_* env vars and device resolution, with no processes started."""

from __future__ import annotations

import pytest

from gateway import config as gateway_config
from gateway.supervisor import Supervisor, resolve_devices, usable_cpus
from worker import config as worker_config


def test_env_vars_set_defaults_and_flags_override_them():
    env = {"BATCHWIRE_MAX_BATCH_SIZE": "7", "BATCHWIRE_MAX_DELAY_MS": "3.5",
           "BATCHWIRE_PORT": "9001", "BATCHWIRE_DEBUG": "true"}
    command, cfg = gateway_config.parse(["serve"], environ=env)
    assert command == "serve"
    assert cfg.workers.max_batch_size == 7 and cfg.workers.max_delay_ms == 3.5
    assert cfg.gateway.port == 9001 and cfg.gateway.debug is True
    _, cfg = gateway_config.parse(["serve", "--max-batch-size", "9"], environ=env)
    assert cfg.workers.max_batch_size == 9


def test_bad_env_value_is_refused_like_a_bad_flag(capsys):
    with pytest.raises(SystemExit):
        gateway_config.parse(["serve"], environ={"BATCHWIRE_MAX_BATCH_SIZE": "zero"})
    assert "max-batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gateway_config.parse(["serve", "--max-queue", "0"], environ={})


def test_connection_limits_come_from_flag_or_env_and_must_be_positive():
    _, cfg = gateway_config.parse(["gateway"], environ={})
    assert (cfg.max_connections, cfg.idle_timeout_s) == (4096, 60.0)
    _, cfg = gateway_config.parse(["gateway", "--idle-timeout-s", "2.5"],
                                  environ={"BATCHWIRE_MAX_CONNECTIONS": "100"})
    assert (cfg.max_connections, cfg.idle_timeout_s) == (100, 2.5)
    for argv in (["--max-connections", "0"], ["--idle-timeout-s", "0"]):
        with pytest.raises(SystemExit):
            gateway_config.parse(["serve", *argv], environ={})


def test_cors_origins_come_from_flag_or_env_and_must_be_origins(capsys):
    assert gateway_config.parse(["gateway"], environ={})[1].cors_origins == ()
    _, cfg = gateway_config.parse(["serve"], environ={"BATCHWIRE_CORS_ORIGINS": "*"})
    assert cfg.gateway.cors_origins == ("*",)
    _, cfg = gateway_config.parse(["gateway", "--cors-origins", "http://a.example:8080,https://b"],
                                  environ={})
    assert cfg.cors_origins == ("http://a.example:8080", "https://b")
    with pytest.raises(SystemExit):
        gateway_config.parse(["gateway", "--cors-origins", "a.example"], environ={})
    assert "'a.example' is not an origin" in capsys.readouterr().err


def test_version_is_the_installed_packages(capsys):
    from protocol.version import package_version

    for parse in (lambda: gateway_config.parse(["--version"], environ={}),
                  lambda: worker_config.parse(["--version"], environ={})):
        with pytest.raises(SystemExit) as exit_:
            parse()
        assert exit_.value.code == 0
        assert capsys.readouterr().out.strip() == f"batchwire {package_version()}"
    assert package_version() not in ("", "0.0.0+source")  # make install installs it


def test_tls_takes_a_certificate_and_its_key_together(capsys):
    _, cfg = gateway_config.parse(["gateway"], environ={})
    assert (cfg.tls_cert, cfg.tls_key) == (None, None)
    _, cfg = gateway_config.parse(["serve", "--tls-cert", "c.pem"],
                                  environ={"BATCHWIRE_TLS_KEY": "k.pem"})
    assert (cfg.gateway.tls_cert, cfg.gateway.tls_key) == ("c.pem", "k.pem")
    for argv, env in ((["--tls-cert", "c.pem"], {}), ([], {"BATCHWIRE_TLS_KEY": "k.pem"})):
        with pytest.raises(SystemExit):
            gateway_config.parse(["gateway", *argv], environ=env)
        assert "--tls-cert and --tls-key go together" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_a_port_outside_1_to_65535_is_refused(capsys, port):
    with pytest.raises(SystemExit):
        gateway_config.parse(["serve", "--port", port], environ={})
    assert "must be a TCP port, 1 to 65535" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gateway_config.parse(["gateway"], environ={"BATCHWIRE_PORT": port})


def test_embeddings_take_openais_2048_inputs_and_other_lists_256():
    _, cfg = gateway_config.parse(["serve"], environ={})
    assert (cfg.gateway.max_inputs, cfg.gateway.max_embedding_inputs) == (256, 2048)
    assert cfg.gateway.max_queue >= cfg.gateway.max_embedding_inputs  # admitted whole
    _, cfg = gateway_config.parse(["gateway"], environ={"BATCHWIRE_MAX_EMBEDDING_INPUTS": "8"})
    assert cfg.max_embedding_inputs == 8


def test_a_body_limit_past_what_a_worker_message_carries_is_refused(capsys):
    """A text travels to a worker as one message field, which the protocol bounds at 16
    MiB: a longer one would be dropped there unanswered."""
    _, cfg = gateway_config.parse(["serve", "--max-body-bytes", str(16 * 2**20)], environ={})
    assert cfg.gateway.max_body_bytes == 16 * 2**20
    with pytest.raises(SystemExit):
        gateway_config.parse(["gateway"], environ={"BATCHWIRE_MAX_BODY_BYTES": str(2**30)})
    assert "must be at most 16777216 (16 MiB" in capsys.readouterr().err


def test_help_names_every_env_var(capsys):
    with pytest.raises(SystemExit):
        gateway_config.parse(["serve", "--help"], environ={})
    text = " ".join(capsys.readouterr().out.split())
    for name in ("BATCHWIRE_MAX_BATCH_SIZE", "BATCHWIRE_MAX_DELAY_MS", "BATCHWIRE_MAX_QUEUE",
                 "BATCHWIRE_TIMEOUT_MS", "BATCHWIRE_WORKERS", "BATCHWIRE_DEVICES"):
        assert name in text


def test_worker_capacity_defaults_to_four_batches():
    cfg = worker_config.parse(["--connect", "ipc:///tmp/x", "--max-batch-size", "5"], environ={})
    assert cfg.capacity == 20 and cfg.max_delay_s == pytest.approx(cfg.max_delay_ms / 1000)
    with pytest.raises(SystemExit):
        worker_config.parse([], environ={})  # --connect is required


@pytest.mark.parametrize("endpoint", [
    "tcp://gateway:5555", "tcp://[::1]:1", "tcp://127.0.0.1:65535", "tcp://eth0;gateway:5555",
    "ipc:///tmp/bw.sock", "ipc://" + "/d" * 53 + "s"])
def test_worker_connect_endpoints_that_can_reach_a_gateway_pass(endpoint):
    worker_config.check_connect(endpoint)


@pytest.mark.parametrize("endpoint, why", [
    ("tcp://localhost", "has no port"), ("tcp://[::1]", "has no port"),
    ("tcp://:5555", "has no host"), ("tcp://gateway:0", "from 1 to 65535"),
    ("tcp://gateway:65536", "from 1 to 65535"), ("tcp://gateway:*", "from 1 to 65535"),
    ("ipc://" + "/d" * 54, "longer than 107 bytes"), ("inproc://gateway", "only this process"),
    ("gateway:5555", "not a ZeroMQ endpoint"), ("ipc://", "not a ZeroMQ endpoint"),
    ("ws://gateway:5555", "tcp:// or ipc://")])
def test_worker_connect_endpoints_that_cannot_reach_a_gateway_say_why(endpoint, why):
    # Checked before the model load: ZeroMQ refused them only after it, with exit 1.
    with pytest.raises(ValueError, match=why):
        worker_config.check_connect(endpoint)


def test_resolve_devices():
    assert resolve_devices("cpu", 3) == ["cpu", "cpu", "cpu"]
    assert resolve_devices("cuda:0,cuda:1", 3) == ["cuda:0", "cuda:1", "cuda:0"]
    with pytest.raises(ValueError):
        resolve_devices("tpu:0", 1)


def test_auto_devices_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_devices("auto", 2) == ["cpu", "cpu"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert resolve_devices("auto", 3) == ["cuda:0", "cuda:1", "cuda:0"]


def test_workers_auto_is_one_per_gpu_or_one_per_core(monkeypatch):
    _, cfg = gateway_config.parse(["serve", "--workers", "auto"], environ={})
    assert cfg.workers.workers is None
    _, cfg = gateway_config.parse(["serve"], environ={"BATCHWIRE_WORKERS": "AUTO"})
    assert cfg.workers.workers is None
    _, cfg = gateway_config.parse(["serve"], environ={})
    assert cfg.workers.workers == 1  # the default: one worker with every core as a thread
    for bad in ("0", "many"):
        with pytest.raises(SystemExit):
            gateway_config.parse(["serve", "--workers", bad], environ={})

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert resolve_devices("auto", None) == ["cuda:0", "cuda:1"]
    assert resolve_devices("cuda:0,cpu", None) == ["cuda:0", "cpu"] + ["cpu"] * (usable_cpus() - 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_devices("auto", None) == ["cpu"] * usable_cpus()

    # On CPU each auto worker gets one torch thread: N processes on N cores, no more.
    launch = gateway_config.WorkerLaunchConfig(model="/m", task="fill-mask", workers=None,
                                               devices="cpu")
    sup = Supervisor(launch, "ipc:///tmp/bw.sock", 1.0, 12.0, "INFO", on_exit=lambda *a: None)
    assert len(sup.slots) == usable_cpus()
    for slot in sup.slots:
        cfg = worker_config.parse(slot.argv[3:], environ={})
        assert cfg.torch_threads == 1 and slot.env["OMP_NUM_THREADS"] == "1"


def test_usable_cpus_honours_a_cgroup_quota(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs: two workers would each get 0.75
    assert usable_cpus(str(cpu_max)) == min(2, usable_cpus(str(tmp_path / "absent")))
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(str(cpu_max)) == usable_cpus(str(tmp_path / "absent")) >= 1


def test_supervisor_argv_parses_with_the_worker_parser(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    launch = gateway_config.WorkerLaunchConfig(model="/m", task="fill-mask", workers=2,
                                               devices="cpu", max_batch_size=4, max_delay_ms=7,
                                               trust_remote_code=True, stock_pipeline=True,
                                               max_seq_length=384, oom_recovery_s=5.0)
    sup = Supervisor(launch, "ipc:///tmp/bw.sock", 1.0, 12.0, "INFO", on_exit=lambda *a: None,
                     event_loop="asyncio")
    assert len(sup.slots) == 2
    for slot in sup.slots:
        assert slot.argv[1:3] == ["-m", "worker"]
        cfg = worker_config.parse(slot.argv[3:], environ={})
        assert (cfg.model, cfg.task, cfg.max_batch_size, cfg.max_delay_ms) == ("/m", "fill-mask", 4, 7)
        assert cfg.exit_on_disconnect and cfg.trust_remote_code and cfg.stock_pipeline
        assert cfg.batch_timeout_s == 12.0 and cfg.torch_threads >= 1
        assert cfg.event_loop == "asyncio"  # serve's --event-loop reaches its workers
        assert cfg.max_seq_length == 384
        assert cfg.oom_recovery_s == 5.0
        assert slot.env["OMP_NUM_THREADS"] == str(cfg.torch_threads)


def test_max_seq_length_is_auto_or_a_count(capsys):
    _, cfg = gateway_config.parse(["serve"], environ={})
    assert cfg.workers.max_seq_length == 0  # auto: as the model declares
    _, cfg = gateway_config.parse(["serve", "--max-seq-length", "AUTO"], environ={})
    assert cfg.workers.max_seq_length == 0
    _, cfg = gateway_config.parse(["serve"], environ={"BATCHWIRE_MAX_SEQ_LENGTH": "128"})
    assert cfg.workers.max_seq_length == 128
    assert worker_config.parse(["--connect", "ipc:///x", "--max-seq-length", "64"],
                               environ={}).max_seq_length == 64
    # The default (auto) is not passed on: each worker resolves it from the model.
    launch = gateway_config.WorkerLaunchConfig(model="/m", workers=1, devices="cpu")
    sup = Supervisor(launch, "ipc:///tmp/bw.sock", 1.0, 12.0, "INFO", on_exit=lambda *a: None)
    assert "--max-seq-length" not in sup.slots[0].argv
    for bad, why in (("0", "must be at least 1"), ("-3", "must be at least 1"),
                     ("long", 'must be "auto" or a whole number')):
        with pytest.raises(SystemExit):
            gateway_config.parse(["serve", "--max-seq-length", bad], environ={})
        assert why in capsys.readouterr().err


def test_empty_env_values_count_as_unset():
    _, cfg = gateway_config.parse(["serve"], environ={"BATCHWIRE_MAX_BATCH_SIZE": "",
                                                      "BATCHWIRE_API_KEY": "  "})
    assert cfg.workers.max_batch_size is None  # each worker's device default
    assert cfg.gateway.api_key is None


def test_max_batch_size_defaults_by_device():
    cpu = worker_config.parse(["--connect", "ipc:///tmp/x"], environ={})
    gpu = worker_config.parse(["--connect", "ipc:///tmp/x", "--device", "cuda:0"], environ={})
    assert (cpu.max_batch_size, cpu.capacity) == (worker_config.DEFAULT_MAX_BATCH_SIZE_CPU,
                                                  4 * worker_config.DEFAULT_MAX_BATCH_SIZE_CPU)
    assert gpu.max_batch_size == worker_config.DEFAULT_MAX_BATCH_SIZE_GPU
    assert (cpu.max_batch_tokens, gpu.max_batch_tokens) == (
        worker_config.DEFAULT_MAX_BATCH_TOKENS_CPU, worker_config.DEFAULT_MAX_BATCH_TOKENS_GPU)
    assert cpu.length_buckets and gpu.length_buckets


def test_token_budget_and_buckets_can_be_turned_off():
    cfg = worker_config.parse(["--connect", "ipc:///tmp/x", "--max-batch-tokens", "0",
                               "--no-length-buckets"], environ={})
    assert cfg.max_batch_tokens == 0 and not cfg.length_buckets
    env = worker_config.parse(["--connect", "ipc:///tmp/x"], environ={
        "BATCHWIRE_MAX_BATCH_TOKENS": "512", "BATCHWIRE_NO_LENGTH_BUCKETS": "1"})
    assert env.max_batch_tokens == 512 and not env.length_buckets
    with pytest.raises(SystemExit):
        worker_config.parse(["--connect", "ipc:///tmp/x", "--max-batch-tokens", "-1"], environ={})


def test_stock_pipeline_is_off_unless_asked_for_by_flag_or_env():
    base = ["--connect", "tcp://127.0.0.1:5555"]
    assert not worker_config.parse(base, environ={}).stock_pipeline
    assert worker_config.parse(base + ["--stock-pipeline"], environ={}).stock_pipeline
    assert worker_config.parse(base, environ={"BATCHWIRE_STOCK_PIPELINE": "1"}).stock_pipeline
    _, serve = gateway_config.parse(["serve", "--stock-pipeline"], environ={})
    assert serve.workers.stock_pipeline
    _, serve = gateway_config.parse(["serve"], environ={})
    assert not serve.workers.stock_pipeline


def test_dtype_comes_from_flag_or_env_and_serve_passes_it_to_its_workers(monkeypatch):
    base = ["--connect", "tcp://127.0.0.1:5555"]
    assert worker_config.parse(base, environ={}).dtype == "auto"
    assert worker_config.parse(base + ["--dtype", "bfloat16"], environ={}).dtype == "bfloat16"
    assert worker_config.parse(base, environ={"BATCHWIRE_DTYPE": "float16"}).dtype == "float16"
    with pytest.raises(SystemExit):
        worker_config.parse(base + ["--dtype", "bf16"], environ={})
    _, serve = gateway_config.parse(["serve", "--dtype", "bfloat16"], environ={})
    assert serve.workers.dtype == "bfloat16"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    for dtype, flag_expected in (("bfloat16", True), ("auto", False)):
        launch = gateway_config.WorkerLaunchConfig(model="/m", task="fill-mask", workers=1,
                                                   devices="cpu", dtype=dtype)
        sup = Supervisor(launch, "ipc:///tmp/bw.sock", 1.0, 12.0, "INFO",
                         on_exit=lambda *a: None)
        argv = sup.slots[0].argv
        # "auto" is the worker's own default: serve leaves it to the worker (and its env).
        assert ("--dtype" in argv) is flag_expected
        assert worker_config.parse(argv[3:], environ={}).dtype == dtype


def test_oom_recovery_comes_from_flag_or_env_and_defaults_to_a_minute():
    base = ["--connect", "tcp://127.0.0.1:5555"]
    assert worker_config.parse(base, environ={}).oom_recovery_s == 60.0
    assert worker_config.parse(base + ["--oom-recovery-s", "0"], environ={}).oom_recovery_s == 0
    assert worker_config.parse(base, environ={"BATCHWIRE_OOM_RECOVERY_S": "300"}
                               ).oom_recovery_s == 300.0
    with pytest.raises(SystemExit):
        worker_config.parse(base + ["--oom-recovery-s", "-1"], environ={})
    _, serve = gateway_config.parse(["serve", "--oom-recovery-s", "120"], environ={})
    assert serve.workers.oom_recovery_s == 120.0


def test_an_on_off_variable_that_says_neither_is_an_error_not_off(capsys):
    """BATCHWIRE_DEBUG=maybe (or "enabled", "2") had started the gateway with debug off,
    silently."""
    for word, on in (("1", True), ("TRUE", True), ("yes", True), (" on ", True),
                     ("0", False), ("false", False), ("No", False), ("off", False)):
        _, cfg = gateway_config.parse(["serve"], environ={"BATCHWIRE_DEBUG": word})
        assert cfg.gateway.debug is on, word
    for word in ("maybe", "enabled", "2"):
        with pytest.raises(SystemExit) as exit_:
            gateway_config.parse(["serve"], environ={"BATCHWIRE_DEBUG": word})
        assert exit_.value.code == 2
        assert f"BATCHWIRE_DEBUG='{word}': must be one of 1, true" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        worker_config.parse(["--connect", "ipc:///x"], environ={"BATCHWIRE_TRUST_REMOTE_CODE":
                                                                "sure"})


def test_devices_are_checked_with_the_other_flags(capsys):
    """--devices gpu was a traceback once the broker had bound its socket (and left its
    ipc directory behind); it is a one-line error before anything starts."""
    for spec in ("gpu", "cuda", "cpu,gpu", "", " , "):
        with pytest.raises(SystemExit) as exit_:
            gateway_config.parse(["serve", "--devices", spec], environ={})
        assert exit_.value.code == 2
        assert "argument --devices: unknown device" in capsys.readouterr().err
    for spec in ("auto", "cpu", "cuda:0,cuda:1", "cpu,cpu"):
        _, cfg = gateway_config.parse(["serve", "--devices", spec], environ={})
        assert cfg.workers.devices == spec
    with pytest.raises(SystemExit):
        gateway_config.parse(["serve"], environ={"BATCHWIRE_DEVICES": "gpu"})


def test_durations_are_finite():
    """--timeout-ms inf was taken for "no deadline", and --heartbeat-interval-s inf would send
    no heartbeat at all; nan was refused. Both are refused now, with what to give."""
    for flag in ("--timeout-ms", "--heartbeat-interval-s", "--drain-timeout-s"):
        for bad in ("inf", "-inf", "nan", "1e999"):
            with pytest.raises(SystemExit):
                gateway_config.parse(["serve", flag, bad], environ={})
    with pytest.raises(SystemExit):
        worker_config.parse(["--connect", "ipc:///x", "--max-delay-ms", "inf"], environ={})
    _, cfg = gateway_config.parse(["serve", "--timeout-ms", "1e9"], environ={})
    assert cfg.gateway.timeout_ms == 1e9


@pytest.mark.parametrize("argv, environ", [(["serve", "--log-level", "loud"], {}),
                                           (["serve"], {"BATCHWIRE_LOG_LEVEL": "loud"})],
                         ids=["flag", "env"])
def test_an_unknown_log_level_is_a_usage_error_not_a_traceback(capsys, argv, environ):
    with pytest.raises(SystemExit) as exit:
        gateway_config.parse(argv, environ=environ)
    assert exit.value.code == 2
    assert "DEBUG, INFO, WARNING, ERROR, CRITICAL, not 'loud'" in capsys.readouterr().err
    _, cfg = gateway_config.parse(["serve", "--log-level", "debug"], environ={})
    assert cfg.gateway.log_level == "DEBUG"


def test_more_cpu_workers_than_cores_is_warned_of(monkeypatch, caplog):
    """--workers 5 on 2 cores started five one-thread workers in silence."""
    from gateway import supervisor as supervisor_module

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(supervisor_module, "usable_cpus", lambda: 2)
    caplog.set_level("WARNING", logger="batchwire.gateway.supervisor")
    for workers, warned in ((2, False), (5, True)):
        caplog.clear()
        launch = gateway_config.WorkerLaunchConfig(model="/m", workers=workers, devices="cpu")
        Supervisor(launch, "ipc:///tmp/bw.sock", 1.0, 12.0, "INFO", on_exit=lambda *a: None)
        assert ("5 CPU workers on 2 usable core(s)" in caplog.text) is warned, caplog.text
