"""Static checks of the deployment files: Dockerfile, .dockerignore, docker-compose.yml,
.env.example and deploy/kubernetes/.

No Docker engine or cluster runs where the tests do, so each file is checked the way its
consumer would read it: the compose file is interpolated as compose does and validated
against the Compose JSON schema (tests/data/compose-spec.json, a copy of
shared/schemas/compose-spec.json); every command a container would run is parsed by
batchwire's own CLI parsers with that container's environment; the Kubernetes objects are
cross-referenced (selectors, ports, ConfigMap and Secret keys, probe paths that the gateway
app really routes). Fast: no processes, no torch.
"""

from __future__ import annotations

import argparse
import base64
import configparser
import contextlib
import io
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from gateway import config as gateway_config
from worker import config as worker_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
K8S_DIR = ROOT / "deploy" / "kubernetes"

#: Variables a service may set that are not batchwire flags, with who reads them.
FOREIGN_ENV = {"HF_TOKEN": "huggingface_hub (gated or private models)"}
#: Variables compose itself reads from .env (not interpolated into the file).
COMPOSE_OWN_VARIABLES = {"COMPOSE_PROFILES"}


# --- batchwire's CLI ----------------------------------------------------------------------

def _subcommand_parser(command: str) -> argparse.ArgumentParser:
    if command == "worker":
        return worker_config.build_parser({})
    for action in gateway_config.build_parser({})._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise AssertionError("batchwire's parser has no subcommands")


def flag_env_names(command: str) -> set[str]:
    """The BATCHWIRE_* variables `batchwire <command>` reads, as its --help names them."""
    names = set()
    for action in _subcommand_parser(command)._actions:
        found = re.search(r"\[env (BATCHWIRE_[A-Z0-9_]+)\]$", action.help or "")
        if found:
            names.add(found.group(1))
    assert names, f"no BATCHWIRE_* flags found for batchwire {command}"
    return names


def parse_batchwire(argv: list[str], environ: dict[str, str]):
    """(subcommand, typed config) exactly as `batchwire` would build them, or a test failure."""
    assert argv[:1] == ["batchwire"], f"{argv} does not run batchwire"
    assert len(argv) > 1, f"{argv}: no subcommand"
    command = argv[1]
    assert command in ("serve", "gateway", "worker"), f"{argv}: unknown subcommand {command!r}"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            if command == "worker":
                args = worker_config.build_parser(environ).parse_args(argv[2:])
                return command, worker_config.config_from_args(args)
            args = gateway_config.build_parser(environ).parse_args(argv[1:])
            if command == "serve":
                return command, gateway_config.serve_config_from_args(args)
            return command, gateway_config.gateway_config_from_args(args)
    except SystemExit as exc:
        pytest.fail(f"batchwire refuses {shlex.join(argv)} with env {environ}: "
                    f"{stderr.getvalue().strip() or exc}")


def endpoint(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    assert parts.scheme == "tcp" and parts.hostname and parts.port, f"not tcp://host:port: {url}"
    return parts.scheme, parts.hostname, parts.port


def gateway_app():
    from gateway.app import create_app
    from gateway.broker import Broker

    # Broker() opens no socket until start(); the app is only inspected or served in-process.
    return create_app(gateway_config.GatewayConfig(api_key="test-key"),
                      Broker("inproc://test-deploy", max_queue=1))


def gateway_get_routes() -> set[str]:
    return {route.resource.canonical for route in gateway_app().router.routes()
            if route.method == "GET"}


# --- Dockerfile -----------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [rest for name, rest in self.instructions if name == instruction]


def _expand_args(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], ""), text)


def dockerfile_stages() -> dict[str, Stage]:
    logical, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comments may also sit between continuation lines
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "ARG" and current is None:
            name, _, default = rest.partition("=")
            global_args[name] = default
        elif instruction == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else str(len(stages))
            current = stages[name] = Stage(name, _expand_args(words[0], global_args))
        else:
            assert current is not None, f"{instruction} before the first FROM"
            current.instructions.append((instruction, rest))
    return stages


def stage_chain(stages: dict[str, Stage], target: str) -> list[Stage]:
    """The target and the stages it is built FROM, nearest first."""
    chain = [stages[target]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def effective(stages: dict[str, Stage], target: str, instruction: str) -> str | None:
    """The value an image inherits: the last such instruction in the nearest stage."""
    for stage in stage_chain(stages, target):
        values = stage.all(instruction)
        if values:
            return values[-1]
    return None


def exec_form(text: str | None) -> list[str]:
    if not text:
        return []
    if text.startswith("["):
        return json.loads(text)
    return ["/bin/sh", "-c", text]


def image_entrypoint_and_cmd(target: str) -> tuple[list[str], list[str]]:
    stages = dockerfile_stages()
    return (exec_form(effective(stages, target, "ENTRYPOINT")),
            exec_form(effective(stages, target, "CMD")))


def stages_behind(stages: dict[str, Stage], target: str) -> list[Stage]:
    """Every stage whose work can end up in target: its FROM chain and COPY --from sources."""
    seen: dict[str, Stage] = {}
    todo = [target]
    while todo:
        for stage in stage_chain(stages, todo.pop()):
            if stage.name in seen:
                continue
            seen[stage.name] = stage
            for copy in stage.all("COPY"):
                source = re.search(r"--from=(\S+)", copy)
                if source and source.group(1) in stages:
                    todo.append(source.group(1))
    return list(seen.values())


def _dockerignore_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether the build context leaves out path (docker's rule: the last pattern matching
    the path or one of its parent directories decides)."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        regex = _dockerignore_regex(line.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


# --- docker-compose.yml ---------------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^{}$]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<invalid>))"
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err},
    ${VAR?err}, ${VAR:+alt}, ${VAR+alt}, and $$ for a literal $."""

    def substitute(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        if m["invalid"] is not None:
            raise AssertionError(f"invalid interpolation in {text!r}")
        name, op, arg = m["braced"] or m["named"], m["op"], m["arg"] or ""
        value = env.get(name)
        is_set, non_empty = value is not None, bool(value)
        if op in (":-", "-"):
            return value if (non_empty if op == ":-" else is_set) else arg
        if op in (":?", "?"):
            assert non_empty if op == ":?" else is_set, f"{name} is required: {arg}"
            return value
        if op in (":+", "+"):
            return arg if (non_empty if op == ":+" else is_set) else ""
        return value or ""

    return _VARIABLE.sub(substitute, text)


def resolve(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    return node


def raw_compose() -> dict:
    # safe_load resolves the anchors and `<<:` merge keys as compose's YAML parser does.
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose(env: dict[str, str] | None = None) -> dict:
    return resolve(raw_compose(), env or {})


def compose_variable_uses() -> list[tuple[str, str | None, str | None]]:
    """(name, operator, default) for every ${...} in the file's values (comments excluded)."""
    uses = []

    def walk(node):
        if isinstance(node, str):
            for m in _VARIABLE.finditer(node):
                if m["braced"] or m["named"]:
                    uses.append((m["braced"] or m["named"], m["op"], m["arg"]))
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(raw_compose())
    return uses


def env_example() -> dict[str, str]:
    """The assignments of .env.example; each must follow a comment in its paragraph."""
    values: dict[str, str] = {}
    commented = False
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            commented = False
        elif line.startswith("#"):
            commented = True
        else:
            name, eq, value = line.partition("=")
            assert eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), \
                f".env.example:{number}: not NAME=value: {line!r}"
            assert commented, f".env.example:{number}: {name} has no comment saying what it is"
            assert name not in values, f".env.example:{number}: {name} set twice"
            values[name] = value.strip().strip("'\"")
    return values


def service_environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    # A key with no value passes the host's variable through: nothing to check here.
    return {key: str(value) for key, value in env.items() if value is not None}


def service_argv(service: dict) -> list[str]:
    """What the container runs: compose's entrypoint/command over the image's own."""
    image_entrypoint, image_cmd = image_entrypoint_and_cmd(service["build"]["target"])

    def as_list(value):
        return shlex.split(value) if isinstance(value, str) else list(value)

    if "entrypoint" in service:
        # Setting entrypoint in compose also drops the image's CMD.
        return as_list(service["entrypoint"]) + as_list(service.get("command") or [])
    command = service.get("command")
    return image_entrypoint + (as_list(command) if command is not None else image_cmd)


def parsed_services(env: dict[str, str] | None = None) -> dict[str, tuple[str, object]]:
    services = compose(env)["services"]
    return {name: parse_batchwire(service_argv(svc), service_environment(svc))
            for name, svc in services.items()}


def gpu_devices(service: dict) -> list[dict]:
    devices = (service.get("deploy", {}).get("resources", {}).get("reservations", {})
               .get("devices", []))
    return [d for d in devices if "gpu" in d.get("capabilities", [])]


SERVICES = sorted(raw_compose()["services"])


# === Compose ===============================================================================

def test_compose_schema_is_the_shared_one():
    shared = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
    if not shared.exists():
        pytest.skip(f"{shared} is not in this checkout")
    assert json.loads(COMPOSE_SCHEMA.read_text()) == json.loads(shared.read_text()), \
        "tests/data/compose-spec.json differs from shared/schemas/compose-spec.json: copy it again"


@pytest.mark.parametrize("source", ["defaults", ".env.example"])
def test_compose_file_validates_against_the_compose_schema(source):
    env = {} if source == "defaults" else env_example()
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose(env)), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_every_compose_variable_has_its_default_in_env_example():
    documented = env_example()
    defaults: dict[str, set[str]] = {}
    for name, op, default in compose_variable_uses():
        assert name in documented, \
            f"${{{name}}} is used in docker-compose.yml but not in .env.example"
        assert op in (":-", "-"), f"${{{name}}} has no default in docker-compose.yml"
        defaults.setdefault(name, set()).add(default)
    for name, values in defaults.items():
        assert len(values) == 1, f"${{{name}}} has different defaults: {sorted(values)}"
        (default,) = values
        assert documented[name] == default, (
            f".env.example says {name}={documented[name]!r} but docker-compose.yml defaults "
            f"to {default!r}")
    unused = set(documented) - set(defaults) - COMPOSE_OWN_VARIABLES
    assert not unused, f".env.example documents variables the compose file never uses: {unused}"


@pytest.mark.parametrize("name", SERVICES)
@pytest.mark.parametrize("source", ["defaults", ".env.example"])
def test_compose_command_parses_with_batchwire_cli(name, source):
    env = {} if source == "defaults" else env_example()
    service = compose(env)["services"][name]
    # parse_batchwire fails the test with argparse's own message if a flag or an env value
    # (BATCHWIRE_MAX_BATCH_SIZE=abc, say) would stop the container at start.
    command, _ = parse_batchwire(service_argv(service), service_environment(service))
    if command == "worker":
        assert service["build"]["target"] == "worker"
    else:
        assert service["build"]["target"] == "gateway" and command == "gateway", \
            f"{name}: the gateway image has no torch, it can only run `batchwire gateway`"


@pytest.mark.parametrize("name", SERVICES)
def test_compose_environment_names_real_flags_of_that_process(name):
    service = compose()["services"][name]
    command = service_argv(service)[1]
    known = flag_env_names(command)
    for key in service_environment(service):
        if key in FOREIGN_ENV:
            continue
        assert key.startswith("BATCHWIRE_"), f"{name}: {key} is neither a flag nor known"
        assert key in known, (f"{name}: batchwire {command} has no flag for {key} (it would be "
                              f"ignored); it reads {sorted(known)}")


def test_compose_topology():
    services = compose()["services"]
    parsed = parsed_services()
    gateways = [n for n, (command, _) in parsed.items() if command == "gateway"]
    workers = [n for n, (command, _) in parsed.items() if command == "worker"]
    assert gateways == ["gateway"], f"one gateway service, got {gateways}"
    gateway = services["gateway"]
    gw = parsed["gateway"][1]
    assert "profiles" not in gateway, "the gateway must start with every profile"
    assert gw.host == "0.0.0.0", "the gateway must listen beyond the container's loopback"
    assert "--port" not in service_argv(gateway), \
        "the image's healthcheck follows BATCHWIRE_PORT, which --port would override"
    published = [str(p) for p in gateway["ports"]]
    assert published == [f"8000:{gw.port}"], f"publish 8000 to the gateway's --port: {published}"
    _, bind_host, zmq_port = endpoint(gw.zmq_bind)
    assert bind_host == "0.0.0.0", "workers in other containers must reach the ZeroMQ bind"
    assert str(zmq_port) not in " ".join(published), \
        "ZeroMQ has no authentication yet: do not publish it on the host"
    stop = int(gateway["stop_grace_period"].rstrip("s"))
    assert stop > gw.drain_timeout_s, "stop_grace_period must outlast the drain timeout"

    assert len(workers) >= 3, workers
    used_gpus = []
    for name in workers:
        service, cfg = services[name], parsed[name][1]
        assert endpoint(cfg.connect)[1:] == ("gateway", zmq_port), \
            f"{name} connects to {cfg.connect}, not the gateway service's ZeroMQ bind"
        assert "container_name" not in service and "ports" not in service, \
            f"{name} must be scalable: no container_name, no published port"
        devices = gpu_devices(service)
        if cfg.device == "cpu":
            assert not devices and service["profiles"] == ["cpu"], name
            continue
        assert service["profiles"] == ["gpu"], f"{name}: GPU workers are the gpu profile"
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia", name
        assert len(devices[0]["device_ids"]) == 1, f"{name}: pin exactly one GPU"
        used_gpus += devices[0]["device_ids"]
        # With one GPU reserved, the container sees it as its only one.
        assert cfg.device == "cuda:0", f"{name}: its pinned GPU is cuda:0 inside the container"
    assert len(used_gpus) >= 2 and len(set(used_gpus)) == len(used_gpus), \
        f"one worker per GPU, each on its own: {used_gpus}"
    assert "worker-cpu" in workers
    assert env_example()["COMPOSE_PROFILES"] == "gpu"


def test_compose_workers_are_written_once_with_an_anchor():
    raw = raw_compose()
    template = raw["x-worker"]
    text = COMPOSE_FILE.read_text()
    assert re.search(r"^x-worker: &worker$", text, re.MULTILINE)
    workers = [n for n in raw["services"] if n != "gateway"]
    for name in workers:
        assert re.search(rf"^  {re.escape(name)}:\n    <<: \*worker$", text, re.MULTILINE), \
            f"{name} does not start from the x-worker anchor"
        service = raw["services"][name]
        for key, value in template.items():
            if key not in ("command", "environment", "profiles"):
                assert service[key] == value, f"{name} overrides {key} of the anchor"


# === Dockerfile ============================================================================

def test_dockerfile_has_both_targets_on_the_right_bases():
    stages = dockerfile_stages()
    assert {"gateway", "worker"} <= set(stages)
    gateway_base = stage_chain(stages, "gateway")[-1].base
    worker_base = stage_chain(stages, "worker")[-1].base
    assert re.fullmatch(r"python:3\.\d+-slim", gateway_base), gateway_base
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+(\.\d+)?-cuda12\.\d+-cudnn9-runtime",
                        worker_base), worker_base
    targets = {svc["build"]["target"] for svc in raw_compose()["services"].values()}
    assert targets <= set(stages), f"compose builds targets the Dockerfile lacks: {targets}"


@pytest.mark.parametrize("target", ["gateway", "worker"])
def test_dockerfile_target_runs_batchwire_as_non_root_with_a_healthcheck(target):
    stages = dockerfile_stages()
    user = effective(stages, target, "USER")
    assert user, f"{target} runs as root: no USER"
    name = user.split(":")[0]
    assert name not in ("root", "0") and name.isdigit(), \
        f"{target}: USER {user} (numeric and non-zero, so runAsNonRoot can check it)"
    healthcheck = effective(stages, target, "HEALTHCHECK")
    assert healthcheck and "CMD" in healthcheck and healthcheck.strip() != "NONE", target
    entrypoint, cmd = image_entrypoint_and_cmd(target)
    assert entrypoint == ["batchwire"], entrypoint
    # The worker image's default command takes its gateway from BATCHWIRE_CONNECT.
    env = {"BATCHWIRE_CONNECT": "tcp://gateway:5555"} if target == "worker" else {}
    command, config = parse_batchwire(entrypoint + cmd, env)
    assert command == target
    if target == "gateway":
        assert config.host == "0.0.0.0" and endpoint(config.zmq_bind)[1] == "0.0.0.0"
        # The probe reads BATCHWIRE_PORT with the flag's default, and the command passes no
        # --port that could move the gateway elsewhere.
        assert f"os.environ.get('BATCHWIRE_PORT', '{config.port}')" in healthcheck
        assert "--port" not in cmd
        # slim has no curl or wget; the probe is python's urllib against an open route.
        assert "urllib" in healthcheck and not re.search(r"\b(curl|wget)\b", healthcheck)
        assert "/health" in healthcheck and "/health" in gateway_get_routes()


def test_gateway_image_never_installs_torch_or_the_worker_extra():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    requires = setup["options"]["install_requires"].lower()
    assert "torch" not in requires and "transformers" not in requires, \
        "the bare package would pull torch into the gateway image"
    stages = dockerfile_stages()
    for stage in stages_behind(stages, "gateway"):
        assert "pytorch" not in stage.base and "cuda" not in stage.base, stage.base
        for run in stage.all("RUN"):
            assert "torch" not in run and not re.search(r"\[[^\]]*worker", run), \
                f"stage {stage.name} installs the worker side: RUN {run}"


def test_worker_image_keeps_its_torch_and_caches_models_in_a_volume():
    stages = dockerfile_stages()
    runs = " ".join(r for s in stage_chain(stages, "worker") for r in s.all("RUN"))
    install = re.search(r"pip install (.*?)(&&|$)", runs)
    assert install and "[worker]" in install.group(1), "the worker extra is not installed"
    assert re.search(r"(--constraint|-c) \S+", install.group(1)), \
        "pip install [worker] without a constraint may replace the image's CUDA torch"
    assert "'torch=='" in runs, "the constraint must pin the torch the base image has"
    env = " ".join(s for st in stage_chain(stages, "worker") for s in st.all("ENV"))
    assert re.search(r"\bHF_HOME=/models\b", env)
    assert any("/models" in v for v in stages["worker"].all("VOLUME"))


def test_dockerignore_sends_what_the_dockerfile_copies_and_no_secrets():
    for stage in dockerfile_stages().values():
        for copy in stage.all("COPY"):
            if "--from=" in copy:
                continue
            for source in copy.split()[:-1]:
                path = ROOT / source
                files = [path] if path.is_file() else [
                    p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
                assert files, f"COPY {source}: nothing there"
                for file in files:
                    rel = file.relative_to(ROOT).as_posix()
                    assert not dockerignored(rel), f".dockerignore drops {rel}, which COPY needs"
    for secret_or_bulk in (".env", ".venv/bin/python", ".git/HEAD", "tests/conftest.py",
                           "benchmarks/run.py", "protocol/__pycache__/codec.cpython-311.pyc"):
        assert dockerignored(secret_or_bulk), f"{secret_or_bulk} would enter the build context"


# === Kubernetes ============================================================================

def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def k8s_objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for filename, doc in k8s_documents():
        if doc.get("kind") == "Kustomization":
            continue
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in objects, f"{key} defined twice"
        objects[key] = doc
    return objects


def only_container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]


def container_environment(objects: dict, container: dict) -> dict[str, str]:
    """The container's environment, every ConfigMap and Secret reference resolved."""

    def source(kind: str, name: str, optional: bool) -> dict[str, str] | None:
        obj = objects.get((kind, name))
        assert obj is not None or optional, f"{kind} {name} is referenced but not defined"
        if obj is None:
            return None
        if kind == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            return data | (obj.get("stringData") or {})
        return {k: str(v) for k, v in (obj.get("data") or {}).items()}

    env: dict[str, str] = {}
    for item in container.get("envFrom", []):
        ref_kind = "ConfigMap" if "configMapRef" in item else "Secret"
        ref = item.get("configMapRef") or item.get("secretRef")
        env |= source(ref_kind, ref["name"], ref.get("optional", False)) or {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        value_from = item["valueFrom"]
        for ref_key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
            if ref_key in value_from:
                ref = value_from[ref_key]
                data = source(kind, ref["name"], ref.get("optional", False))
                if data is None:
                    continue
                assert ref["key"] in data or ref.get("optional", False), \
                    f"{kind} {ref['name']} has no key {ref['key']}"
                if ref["key"] in data:
                    env[item["name"]] = data[ref["key"]]
    return env


def container_port(container: dict, target) -> int:
    for port in container.get("ports", []):
        if target in (port.get("name"), port["containerPort"]):
            return port["containerPort"]
    raise AssertionError(f"container {container['name']} has no port {target!r}")


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def deployment_config(objects: dict, name: str):
    container = only_container(objects[("Deployment", name)])
    assert container.get("command") is None, "keep the image's ENTRYPOINT (batchwire)"
    target = "worker" if "worker" in container["image"] else "gateway"
    entrypoint, cmd = image_entrypoint_and_cmd(target)
    argv = entrypoint + container.get("args", cmd)
    env = container_environment(objects, container)
    return container, env, parse_batchwire(argv, env)


def test_k8s_manifests_parse_and_kustomization_lists_them_all():
    documents = k8s_documents()
    assert documents
    for filename, doc in documents:
        assert doc.get("apiVersion") and doc.get("kind"), f"{filename}: apiVersion and kind"
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), f"{filename}: {doc['kind']} has no name"
    (kustomization,) = [doc for _, doc in documents if doc["kind"] == "Kustomization"]
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    kinds = {kind for kind, _ in k8s_objects()}
    assert {"Deployment", "Service", "ConfigMap", "Secret"} <= kinds
    for image in kustomization.get("images", []):
        assert any(image["name"] in only_container(doc)["image"]
                   for (kind, _), doc in k8s_objects().items() if kind == "Deployment")


def test_k8s_deployments_select_their_own_pods():
    for (kind, name), obj in k8s_objects().items():
        if kind == "Deployment":
            assert selects(obj["spec"]["selector"]["matchLabels"],
                           obj["spec"]["template"]["metadata"]["labels"]), name


def test_k8s_services_reach_the_gateway_ports():
    objects = k8s_objects()
    gateway = objects[("Deployment", "batchwire-gateway")]
    worker = objects[("Deployment", "batchwire-worker")]
    container, _, (command, gw) = deployment_config(objects, "batchwire-gateway")
    assert command == "gateway" and gw.host == "0.0.0.0"
    gateway_labels = gateway["spec"]["template"]["metadata"]["labels"]
    worker_labels = worker["spec"]["template"]["metadata"]["labels"]
    exposed: dict[int, list[dict]] = {}
    for (kind, name), svc in objects.items():
        if kind != "Service":
            continue
        selector = svc["spec"]["selector"]
        assert selects(selector, gateway_labels), f"Service {name} misses the gateway pods"
        assert not selects(selector, worker_labels), f"Service {name} would send to workers"
        for port in svc["spec"]["ports"]:
            exposed.setdefault(container_port(container, port.get("targetPort", port["port"])),
                               []).append(svc)
    assert gw.port in exposed, "no Service exposes the gateway's HTTP --port"
    zmq_port = endpoint(gw.zmq_bind)[2]
    assert zmq_port in exposed, "no Service exposes the gateway's ZeroMQ bind"
    # The gateway is ready only once a worker joined, and workers join through this Service:
    # it must route to the pod before readiness.
    assert all(svc["spec"].get("publishNotReadyAddresses") for svc in exposed[zmq_port])
    # The HTTP Service is readiness-gated (clients only reach a gateway that has a worker).
    assert any(not svc["spec"].get("publishNotReadyAddresses") for svc in exposed[gw.port])


def test_k8s_worker_connects_to_the_gateway_service():
    objects = k8s_objects()
    gateway_container, _, (_, gw) = deployment_config(objects, "batchwire-gateway")
    container, _, (command, cfg) = deployment_config(objects, "batchwire-worker")
    assert command == "worker"
    _, host, port = endpoint(cfg.connect)
    # A Service's DNS name: NAME, NAME.NAMESPACE, NAME.NAMESPACE.svc[.cluster.local].
    dns = re.fullmatch(r"([a-z0-9-]+)(\.[a-z0-9-]+(\.svc(\.cluster\.local)?)?)?", host)
    assert dns, f"the worker connects to {host}, which is not a Service's DNS name"
    svc = objects.get(("Service", dns.group(1)))
    assert svc is not None, f"the worker connects to {host}, which is no Service here"
    ports = [p for p in svc["spec"]["ports"] if p["port"] == port]
    assert ports, f"Service {dns.group(1)} exposes no port {port}"
    target = container_port(gateway_container, ports[0].get("targetPort", port))
    assert target == endpoint(gw.zmq_bind)[2], "the Service port leads elsewhere than ZeroMQ"
    assert svc["spec"].get("publishNotReadyAddresses"), \
        "workers must reach the gateway before it is ready (it is ready once they joined)"
    assert cfg.device == "cuda:0", "the pod's one GPU is cuda:0 inside it"
    resources = container.get("resources", {})
    # Extended resources go in limits (requests, if given, must be equal).
    assert resources.get("limits", {}).get("nvidia.com/gpu") == 1, "limits: nvidia.com/gpu: 1"
    assert resources.get("requests", {}).get("nvidia.com/gpu") == 1, "requests: nvidia.com/gpu: 1"


def test_k8s_config_keys_are_flags_of_the_process_that_reads_them():
    objects = k8s_objects()
    for deployment in ("batchwire-gateway", "batchwire-worker"):
        _, env, (command, _) = deployment_config(objects, deployment)
        known = flag_env_names(command)
        for key in env:
            if key in FOREIGN_ENV:
                continue
            assert key in known, f"{deployment}: batchwire {command} has no flag for {key}"
        assert any(key.startswith("BATCHWIRE_") for key in env), deployment
    # Every ConfigMap and Secret is used by some container.
    used = json.dumps([objects[k]["spec"] for k in objects if k[0] == "Deployment"])
    for kind, name in objects:
        if kind in ("ConfigMap", "Secret"):
            assert f'"name": "{name}"' in used, f"{kind} {name} is used by no Deployment"
    _, env, _ = deployment_config(objects, "batchwire-gateway")
    assert "BATCHWIRE_API_KEY" in env, "the gateway takes its API key from the Secret"


def test_k8s_gateway_probes_hit_real_routes_on_the_http_port():
    objects = k8s_objects()
    gateway = objects[("Deployment", "batchwire-gateway")]
    container, _, (_, gw) = deployment_config(objects, "batchwire-gateway")
    routes = gateway_get_routes()
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        http = container[probe]["httpGet"]
        assert http["path"] == path, f"{probe} must ask {path}"
        assert path in routes, f"the gateway app has no GET {path}"
        assert container_port(container, http["port"]) == gw.port, f"{probe} misses --port"
    # One gateway per worker pool; Recreate so a rollout never waits on a second gateway
    # that no worker will ever join.
    assert gateway["spec"]["replicas"] == 1
    assert gateway["spec"]["strategy"]["type"] == "Recreate"
    assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > \
        gw.drain_timeout_s


def test_k8s_pods_run_as_the_images_non_root_user():
    for (kind, name), obj in k8s_objects().items():
        if kind == "Deployment":
            security = obj["spec"]["template"]["spec"]["securityContext"]
            assert security["runAsNonRoot"] is True and security["runAsUser"] != 0, name


async def test_probes_answer_without_the_api_key():
    """Kubelet and docker probes send no Authorization header: with --api-key set, /health
    and /ready must still answer, while other routes ask for the key."""
    from aiohttp.test_utils import TestClient, TestServer

    async with TestClient(TestServer(gateway_app())) as client:
        health = await client.get("/health")
        assert health.status == 200
        ready = await client.get("/ready")
        assert ready.status == 503 and (await ready.json())["reason"] == "no_workers"
        info = await client.get("/info")
        assert info.status == 401
