"""docker-compose.yml, the Dockerfile and the Makefile agree (no Docker engine here: the files are parsed and
cross-checked).

Services redis/worker/coordinator/flower/ui/exporter/fake-llm and the demo as a profile; the worker scales; every
Python service has the same TASKTREE_* wiring, pointing at the `redis` service, each name a
broker_config.TasktreeSettings field (the CLI's TASKTREE_CONTROL_TOKEN aside); Redis keeps an append-only file on a
volume and publishes no port; published ports bind 127.0.0.1; long-running services restart and report health;
traces live on a named volume shared by every service that writes or reads them; health probes start no Python
process (workers: the file their loop touches); workers have a stop grace period; Flower keeps its history on a
volume and its API auth is passed through; the Dockerfile installs the dependencies at the versions of
constraints.txt before it copies the code; the modules and files the commands name exist.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # PyYAML: in the dev extra

from broker_config import TasktreeSettings
from tasktree_dist.testing.fleet import REPO_ROOT, fleet_env

COMPOSE = REPO_ROOT / "docker-compose.yml"
MAKEFILE = REPO_ROOT / "Makefile"
PYTHON_SERVICES = ("worker", "coordinator", "flower", "ui", "exporter", "demo", "fake-llm")
LONG_RUNNING = ("redis", "worker", "coordinator", "flower", "ui", "exporter", "fake-llm")
TASKTREE_VARS = {"TASKTREE_BROKER_URL", "TASKTREE_REDIS_URL", "TASKTREE_IMPORTS"}
#: Read by the `tasktree` command (click), not by broker_config.
CLI_VARS = {"TASKTREE_CONTROL_TOKEN"}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the `<<: *python` merge keys
    assert isinstance(compose, dict) and isinstance(compose.get("services"), dict)
    return compose["services"]


def command(service: dict[str, Any]) -> str:
    value = service.get("command") or ""
    return value if isinstance(value, str) else shlex.join(str(part) for part in value)


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """Name -> value; None for a name passed through from the host's environment (set there or not at all)."""
    value = service.get("environment") or {}
    if isinstance(value, list):  # the `- NAME=value` / `- NAME` forms
        value = dict(item.split("=", 1) if "=" in item else (item, None) for item in value)
    return {str(key): None if val is None else str(val) for key, val in value.items()}


def ports(service: dict[str, Any]) -> list[str]:
    # "host_ip:published:target" strings, or the long form's mapping
    return [
        str(port) if not isinstance(port, dict) else f"{port.get('host_ip', '')}:{port.get('published', '')}"
        for port in service.get("ports", [])
    ]


def depends_on(service: dict[str, Any]) -> set[str]:
    value = service.get("depends_on") or []
    return set(value)  # a list of names or a mapping name -> condition


def make_recipe(target: str) -> str:
    """The recipe of a Makefile target, backslash continuations joined."""
    lines = MAKEFILE.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(rf"{re.escape(target)}\s*:", line)), None)
    assert start is not None, f"Makefile has no `{target}` target"
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return " ".join(recipe).replace("\\ ", " ")


def test_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(PYTHON_SERVICES) | set(LONG_RUNNING) <= set(services)
    assert str(services["redis"]["image"]).startswith("redis:")


def test_commands(services: dict[str, dict[str, Any]]) -> None:
    assert command(services["worker"]).startswith("celery -A worker worker -Q tasktree ")
    assert command(services["coordinator"]).startswith("celery -A worker worker -Q tasktree.runs ")
    ui = command(services["ui"])
    assert ui.startswith("tasktree serve ") and "--trace-dir /app/.traces" in ui
    assert command(services["exporter"]).startswith("tasktree metrics ")
    flower = command(services["flower"])
    assert "celery -A worker flower" in flower and "--port=5555" in flower
    assert "tasktree_dist.testing.fake_llm" in command(services["fake-llm"])
    assert importlib.util.find_spec("tasktree_dist.testing.fake_llm") is not None
    assert "--external" in command(services["demo"])  # use the compose broker and workers, start nothing


def test_worker_is_scalable(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed container_name breaks `--scale worker=N`"
    assert not worker.get("ports"), "published host ports break `--scale worker=N`"
    assert "hostname" not in worker, "a fixed hostname gives every replica the same Celery node name"


def test_published_ports_are_loopback_only_and_redis_publishes_none(services: dict[str, dict[str, Any]]) -> None:
    for name, port in (("flower", "5555"), ("ui", "8000"), ("exporter", "9200")):
        published = ports(services[name])
        assert published and all(p.startswith("127.0.0.1:") for p in published), (name, published)
        assert any(p.split(":")[1] == port for p in published), (name, published)
    for name, service in services.items():
        assert all(p.startswith("127.0.0.1:") for p in ports(service)), name
    assert not services["redis"].get("ports"), "Redis must not clash with a host Redis on 6379"


def test_redis_keeps_an_append_only_file_on_a_volume(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    words = command(redis).split()
    assert words[words.index("--appendonly") + 1] == "yes" and "--save" not in words
    assert any(str(v).endswith(":/data") for v in redis.get("volumes", []))


def test_restart_policies_health_checks_and_the_demo_profile(services: dict[str, dict[str, Any]]) -> None:
    for name in LONG_RUNNING:
        assert services[name].get("restart") in ("unless-stopped", "always"), name
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    demo = services["demo"]
    assert demo.get("profiles") == ["demo"], "the one-shot demo must not start with `docker compose up`"
    assert demo.get("restart") == "no"
    for name in LONG_RUNNING:  # cheap probes: no Python process started every interval
        probe = " ".join(services[name]["healthcheck"]["test"])
        assert "python" not in probe and "celery" not in probe, (name, probe)


def test_workers_report_health_from_the_file_their_loop_touches_and_restart_when_stuck(
    services: dict[str, dict[str, Any]],
) -> None:
    health_file = environment(services["worker"])["TASKTREE_HEALTH_FILE"]
    assert health_file and health_file.startswith("/tmp/")  # written by the unprivileged user
    assert "stuck_loop_s" in TasktreeSettings.model_fields and TasktreeSettings().stuck_loop_s == 120
    for name in ("worker", "coordinator"):
        assert environment(services[name])["TASKTREE_HEALTH_FILE"] == health_file, name
        probe = services[name]["healthcheck"]["test"]
        assert probe[0] == "CMD-SHELL" and f"find {health_file} -mmin -1" in probe[1], (name, probe)
        # a stuck worker exits (TASKTREE_STUCK_LOOP_S): Docker restarts exited containers, never unhealthy ones
        assert services[name]["restart"] in ("unless-stopped", "always"), name
        assert "TASKTREE_STUCK_LOOP_S" not in environment(services[name]) or \
            float(environment(services[name])["TASKTREE_STUCK_LOOP_S"] or 0) > 0, name


def seconds(duration: str) -> float:
    """A compose duration (`90s`, `5m`, `1m30s`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_workers_have_time_to_finish_their_units_when_stopped(services: dict[str, dict[str, Any]]) -> None:
    assert seconds(str(services["worker"].get("stop_grace_period", "10s"))) >= 120  # LLM units of minutes
    assert seconds(str(services["coordinator"].get("stop_grace_period", "10s"))) >= 30


def test_flower_keeps_its_history_on_a_volume(services: dict[str, dict[str, Any]]) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    flower = command(services["flower"]).split()
    assert "--persistent=True" in flower
    db = next(part.split("=", 1)[1] for part in flower if part.startswith("--db="))
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in services["flower"].get("volumes", [])}
    folder = next((m for m in mounts if db.startswith(m.rstrip("/") + "/")), None)
    assert folder is not None, f"Flower's db {db} is not on a volume ({mounts})"
    assert mounts[folder] in compose.get("volumes", {}), mounts[folder]
    assert f"mkdir -p /app/.traces {folder}" in (REPO_ROOT / "Dockerfile").read_text()  # owned by the user


def test_the_image_installs_pinned_versions(services: dict[str, dict[str, Any]]) -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = [line.strip() for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    pins = {}
    for line in lines:
        name, _, version = line.partition("==")
        assert version and re.fullmatch(r"[\w.+!-]+", version), f"constraints.txt: {line!r} is not name==version"
        pins[canonicalize_name(name)] = version
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for spec in [*project["dependencies"], *project["optional-dependencies"]["flower"]]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in constraints.txt (make constraints)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (spec, pins[name])
        for extra in requirement.extras:  # celery[redis] -> redis, redis[hiredis] -> hiredis
            assert canonicalize_name(extra) in pins, f"{extra} (extra of {requirement.name}) is not pinned"
    dockerfile = [line.strip() for line in (REPO_ROOT / "Dockerfile").read_text().splitlines()]
    assert "COPY pyproject.toml constraints.txt ./" in dockerfile
    assert any("pip install -c constraints.txt -r" in line for line in dockerfile)
    assert ".constraints-venv" in (REPO_ROOT / ".dockerignore").read_text().split()


def test_traces_live_on_a_named_volume_shared_by_every_service_that_writes_or_reads_them(
    services: dict[str, dict[str, Any]],
) -> None:
    """`tasktree trace RUN --save .traces` in a worker or coordinator container writes where the board reads."""
    compose = yaml.safe_load(COMPOSE.read_text())
    assert "traces" in compose.get("volumes", {}) and "redis-data" in compose["volumes"]
    for name in ("ui", "demo", "worker", "coordinator"):
        assert services[name].get("volumes") == ["traces:/app/.traces"], name
        assert services[name].get("working_dir") == "/app", name  # .traces relative to it is the volume
    assert "--trace-dir /app/.traces" in command(services["demo"])
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "mkdir -p /app/.traces" in dockerfile and "chown tasktree /app/.traces" in dockerfile  # volume ownership


def test_flower_and_ui_auth_is_passed_through_not_opened(services: dict[str, dict[str, Any]]) -> None:
    flower = environment(services["flower"])
    assert "FLOWER_BASIC_AUTH" in flower and flower["FLOWER_BASIC_AUTH"] is None  # from the host, when set
    assert not any(name.startswith("FLOWER_UNAUTHENTICATED") for name in flower)
    ui = environment(services["ui"])
    assert "TASKTREE_CONTROL_TOKEN" in ui and ui["TASKTREE_CONTROL_TOKEN"] is None


def test_python_services_share_the_tasktree_environment(services: dict[str, dict[str, Any]]) -> None:
    envs = {name: environment(services[name]) for name in PYTHON_SERVICES}
    reference = {key: envs["worker"][key] for key in TASKTREE_VARS}
    for name, env in envs.items():
        assert TASKTREE_VARS <= set(env), f"{name} lacks {TASKTREE_VARS - set(env)}"
        assert {key: env[key] for key in TASKTREE_VARS} == reference, f"{name}'s TASKTREE_* differ from worker's"
        assert env.get("LLM_BASE_URL") == envs["worker"].get("LLM_BASE_URL"), name
        # one image, built from ./Dockerfile, for every Python service; nothing mounted over the installed code
        assert services[name].get("build") == "." and services[name]["image"] == services["worker"]["image"], name
        assert services[name].get("working_dir") == "/app", name
        assert all(str(v).split(":")[1] in ("/app/.traces", "/app/.flower")
                   for v in services[name].get("volumes", [])), name
    for name in ("worker", "coordinator", "flower", "ui", "exporter", "demo"):
        assert "redis" in depends_on(services[name]), f"{name} must depend on redis"
    assert {"worker", "coordinator", "fake-llm"} <= depends_on(services["demo"])


def test_urls_point_at_the_compose_services(services: dict[str, dict[str, Any]]) -> None:
    env = environment(services["worker"])
    broker, state = urlsplit(env["TASKTREE_BROKER_URL"]), urlsplit(env["TASKTREE_REDIS_URL"])
    for url in (broker, state):
        assert url.scheme == "redis" and url.hostname == "redis" and (url.port or 6379) == 6379, url.geturl()
    assert broker.path != state.path, "broker and state should use different Redis databases"
    llm = urlsplit(env["LLM_BASE_URL"])
    assert llm.hostname == "fake-llm" and "fake-llm" in services
    fake_command = command(services["fake-llm"]).split()
    assert str(llm.port) == fake_command[fake_command.index("--port") + 1]
    assert "0.0.0.0" in fake_command  # reachable from the other containers


def test_variable_names_are_the_settings_the_makefile_and_fleet_use(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    compose_names = {
        key for name in PYTHON_SERVICES for key in environment(services[name]) if key.startswith("TASKTREE_")
    }
    sentinels = ("broker-sentinel", "redis-sentinel", "imports-sentinel")
    fleet_names = {key for key, value in fleet_env(*sentinels).items() if value in sentinels}
    make_names = set(re.findall(r"\bTASKTREE_[A-Z_]+\b", MAKEFILE.read_text()))
    fields = set(TasktreeSettings.model_fields)
    assert fleet_names == TASKTREE_VARS and TASKTREE_VARS <= compose_names
    assert make_names <= compose_names, f"Makefile uses {make_names - compose_names}, compose does not set them"
    for name in compose_names - CLI_VARS:
        assert name.removeprefix("TASKTREE_").lower() in fields, f"{name} is not a TasktreeSettings field"
    # The settings read the compose values as they are.
    for key, value in environment(services["worker"]).items():
        monkeypatch.setenv(key, value or "")
    settings = TasktreeSettings()
    env = environment(services["worker"])
    assert (settings.broker_url, settings.redis_url) == (env["TASKTREE_BROKER_URL"], env["TASKTREE_REDIS_URL"])


def test_imported_modules_exist(services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    imports = environment(services["worker"])["TASKTREE_IMPORTS"]
    modules = [name.strip() for name in imports.split(",") if name.strip()]
    assert modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"TASKTREE_IMPORTS names {module!r}, not importable"


def test_demo_runs_a_file_of_the_repo(services: dict[str, dict[str, Any]]) -> None:
    scripts = [part for part in command(services["demo"]).split() if part.endswith(".py")]
    assert scripts == ["examples/distributed_demo.py"], scripts
    script = REPO_ROOT / scripts[0]
    assert script.exists() and "--external" in script.read_text(), f"{scripts[0]} does not accept --external"


def test_dockerfile_installs_the_package_and_ships_what_the_commands_need(
    services: dict[str, dict[str, Any]],
) -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM python:3.11"), lines[0]
    assert "WORKDIR /app" in lines and any(line.startswith("USER ") for line in lines)
    copied = {name for line in lines if line.startswith("COPY ") for name in line.split()[1:-1]}
    imports = environment(services["worker"])["TASKTREE_IMPORTS"]
    needed = {"pyproject.toml", "tasktree_dist", "broker_config", "worker", "examples"}
    needed |= {name.strip().split(".")[0] for name in imports.split(",") if name.strip()}
    assert needed <= copied, f"the image lacks {needed - copied}"
    # dependencies first, from pyproject.toml and constraints.txt alone (a cached layer while only the code
    # changes), then the code
    copies = [i for i, line in enumerate(lines) if line.startswith("COPY ")]
    assert lines[copies[0]] == "COPY pyproject.toml constraints.txt ./", lines[copies[0]]
    deps = next(i for i, line in enumerate(lines) if "pip install -c constraints.txt -r" in line)
    assert copies[0] < deps < copies[1] and "'flower'" in lines[deps - 1] + lines[deps]
    install = next(line for line in lines if line.startswith("RUN pip install"))
    assert install.split() == ["RUN", "pip", "install", "--no-deps", "."], install  # installed, not linked
    assert lines.index(install) > lines.index("COPY tasktree_dist ./tasktree_dist")
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_make_flower_binds_loopback() -> None:
    recipe = make_recipe("flower")
    assert "celery -A worker flower" in recipe and "--address=127.0.0.1" in recipe and "--port=5555" in recipe
    assert "0.0.0.0" not in recipe
    phony = next(line for line in MAKEFILE.read_text().splitlines() if line.startswith(".PHONY:"))
    assert "flower" in phony.split()
    make_names = set(re.findall(r"\bTASKTREE_[A-Z_]+\b", recipe))
    assert make_names == TASKTREE_VARS, make_names

