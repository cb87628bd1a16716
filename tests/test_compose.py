"""compose.yaml, the Dockerfile and the Grafana provisioning, checked statically.

No Docker engine runs here, so these tests read the files the way compose and Docker would:
interpolation of ``${VAR}``, bind mounts, build contexts, start-up conditions and images.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROVISIONING = ROOT / "dashboards" / "provisioning"
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME
VAR_RE = re.compile(r"\$\{([A-Za-z_]\w*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_]\w*)")


def compose() -> dict[str, Any]:
    """compose.yaml as compose reads it (YAML anchors resolved, not yet interpolated)."""
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    """The services of compose.yaml."""
    return dict(compose()["services"])


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: defaults, required variables (``:?``) and ``$$`` escapes."""

    def replace(m: re.Match[str]) -> str:
        name, op, arg = m.group(1) or m.group(4), m.group(2) or "", m.group(3) or ""
        value = env.get(name)
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("?") and unset:
            raise ValueError(f"required variable {name} is missing a value: {arg}")
        if op.endswith("-") and unset:
            return arg
        return value or ""

    parts = text.split("$$")  # an escaped dollar reaches the container as one "$"
    return "$".join(VAR_RE.sub(replace, part) for part in parts)


def variables_used(text: str) -> set[str]:
    """Names of every variable compose interpolates in ``text``."""
    return {m.group(1) or m.group(4) for part in text.split("$$") for m in VAR_RE.finditer(part)}


def env_example() -> dict[str, str]:
    """NAME -> value of every assignment in .env.example."""
    pairs = [line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()]
    return {p[0].strip(): p[1] for p in pairs if len(p) == 2 and not p[0].startswith("#")}


def bind_sources(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of each bind mount of a service (short or long syntax)."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                out.append((volume["source"], volume["target"]))
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/", "~")):  # otherwise it names a volume
            out.append((source, target))
    return out


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, whether written as a mapping or as NAME=value items."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_parses_with_the_expected_services() -> None:
    assert {"postgres", "migrate", "tunewatch", "grafana", "otel-collector", "grafana-init"} <= set(
        services()
    )


def test_every_referenced_file_exists() -> None:
    missing = []
    for name, service in services().items():
        for source, _ in bind_sources(service):
            if not (ROOT / source).exists():
                missing.append(f"{name}: bind mount {source}")
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            if not context.is_dir() or not (context / (dockerfile or "Dockerfile")).is_file():
                missing.append(f"{name}: build context {context} / {dockerfile}")
        for env_file in service.get("env_file", []):
            if not (ROOT / env_file).exists():
                missing.append(f"{name}: env_file {env_file}")
    for name, config in {**compose().get("configs", {}), **compose().get("secrets", {})}.items():
        if "file" in config and not (ROOT / config["file"]).exists():
            missing.append(f"config {name}: {config['file']}")
    assert not missing


def test_start_up_conditions_are_valid_and_waitable() -> None:
    all_services = services()
    for name, service in all_services.items():
        depends = service.get("depends_on", {})
        if isinstance(depends, list):  # short syntax: service_started
            depends = {d: {"condition": "service_started"} for d in depends}
        for target, spec in depends.items():
            assert target in all_services, f"{name} depends on unknown service {target}"
            condition = spec.get("condition", "service_started")
            assert condition in CONDITIONS, f"{name} -> {target}: {condition}"
            other = all_services[target]
            if condition == "service_healthy":
                test = other.get("healthcheck", {}).get("test")
                assert test and test != ["NONE"], f"{target} needs a healthcheck ({name} waits)"
            if condition == "service_completed_successfully":
                assert other.get("restart", "no") == "no", f"{target} must run once"


def test_images_are_pinned() -> None:
    for name, service in services().items():
        image = service.get("image", "")
        assert "latest" not in image, f"{name}: {image}"
        if "build" in service:
            continue  # built here from the Dockerfile, whose base image is checked below
        repo, _, tag = image.rpartition(":") if "@" not in image else (image, "", "")
        assert "@sha256:" in image or re.match(r"v?\d+\.\d+", tag), f"{name}: {image}"
        assert repo


def test_every_variable_is_documented_in_env_example() -> None:
    used = variables_used(COMPOSE.read_text())
    documented = env_example()
    assert used - set(documented) == set(), "add them to .env.example"
    assert set(documented) - used == set(), ".env.example documents unused variables"


def test_secrets_are_required_and_empty_in_the_example() -> None:
    text = COMPOSE.read_text()
    required = {m.group(1) for m in VAR_RE.finditer(text) if (m.group(2) or "").endswith("?")}
    assert {"POSTGRES_PASSWORD", "TUNEWATCH_API_TOKEN", "GRAFANA_ADMIN_PASSWORD"} <= required
    assert "GRAFANA_DB_PASSWORD" in required
    example = env_example()
    assert all(example[name] == "" for name in required), "no secret values in .env.example"
    with pytest.raises(ValueError, match="set POSTGRES_PASSWORD"):
        interpolate(text, {k: v for k, v in example.items() if v})


def test_compose_interpolates_completely_with_the_secrets_set() -> None:
    env = {**env_example(), "POSTGRES_PASSWORD": "pg", "TUNEWATCH_API_TOKEN": "tok"}
    env |= {"GRAFANA_ADMIN_PASSWORD": "admin-pw", "GRAFANA_DB_PASSWORD": "reader-pw"}
    data = yaml.safe_load(interpolate(COMPOSE.read_text(), env))
    tw = data["services"]["tunewatch"]
    url = tw["environment"]["TUNEWATCH_DATABASE_URL"]
    assert url == "postgresql+psycopg://tunewatch:pg@postgres:5432/tunewatch"
    assert data["services"]["migrate"]["environment"]["TUNEWATCH_DATABASE_URL"] == url
    # $$ reaches the container as $: the shell there expands it from the environment.
    healthcheck = data["services"]["postgres"]["healthcheck"]["test"][1]
    assert '"${POSTGRES_USER}"' in healthcheck


def test_published_ports_listen_on_loopback_only() -> None:
    for name, service in services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every address"


def test_tunewatch_serves_with_a_token_migrates_first_and_checks_health() -> None:
    svc = services()
    tw, migrate = svc["tunewatch"], svc["migrate"]
    assert tw["command"][:3] == ["serve", "--host", "0.0.0.0"]
    assert migrate["command"] == ["db", "upgrade"] and migrate["image"] == tw["image"]
    env = environment(tw)
    assert ":?" in env["TUNEWATCH_API_TOKEN"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert tw["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    probe = " ".join(tw["healthcheck"]["test"])
    assert f"127.0.0.1:{env['TUNEWATCH_API_PORT']}/healthz" in probe
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_grafana_is_locked_down_and_provisioned_from_the_repository() -> None:
    grafana = services()["grafana"]
    env = environment(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert ":?" in env["GF_SECURITY_ADMIN_PASSWORD"]
    mounts = {Path(source).as_posix(): target for source, target in bind_sources(grafana)}
    assert mounts["dashboards/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounts["dashboards/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "tunewatch.yaml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == mounts["dashboards/json"]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(provider["options"]["path"])
    assert grafana["depends_on"]["grafana-init"]["condition"] == "service_completed_successfully"


def yaml_strings(node: Any) -> list[str]:
    """Every string value in a parsed YAML document (Grafana interpolates values only)."""
    if isinstance(node, dict):
        return [s for v in node.values() for s in yaml_strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in yaml_strings(v)]
    return [node] if isinstance(node, str) else []


def test_provisioning_variables_are_set_for_grafana() -> None:
    env = environment(services()["grafana"])
    for path in PROVISIONING.rglob("*.yaml"):
        values = yaml_strings(yaml.safe_load(path.read_text()))
        missing = {v for text in values for v in variables_used(text)} - set(env)
        assert not missing, f"{path.name} uses {missing}, which the grafana service does not set"


def test_grafana_init_creates_the_role_the_datasource_uses() -> None:
    svc = services()
    init, grafana = svc["grafana-init"], svc["grafana"]
    (source, target) = bind_sources(init)[0]
    assert Path(source).name == "grafana_reader.sql" and target in " ".join(init["command"])
    assert "grafana_password=" in " ".join(init["command"])
    script = (ROOT / source).read_text()
    default_role = re.search(r"\\set grafana_role (\w+)", script)
    assert default_role and environment(grafana)["TUNEWATCH_GRAFANA_DB_USER"] == default_role[1]
    assert (
        environment(init)["GRAFANA_DB_PASSWORD"]
        == environment(grafana)["TUNEWATCH_GRAFANA_DB_PASSWORD"]
    )


def test_otel_collector_config_is_mounted_and_consistent() -> None:
    collector = services()["otel-collector"]
    (source, target) = bind_sources(collector)[0]
    assert f"--config={target}" in collector["command"]
    config = yaml.safe_load((ROOT / source).read_text())
    assert "health_check" in config["service"]["extensions"]
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(config.get(kind, {})), (kind, pipeline)
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")


# --- the Dockerfile ---------------------------------------------------------------------------


def dockerfile_lines() -> list[str]:
    """Instructions of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_dockerfile_base_image_is_pinned() -> None:
    bases = [line.split()[1] for line in dockerfile_lines() if line.upper().startswith("FROM ")]
    assert bases
    for base in bases:
        tag = base.partition(":")[2]
        assert "@sha256:" in base or re.match(r"\d+\.\d+\.\d+", tag), base
        assert "latest" not in base


def test_dockerfile_installs_cpu_torch_runs_as_a_user_and_enters_tunewatch() -> None:
    lines = dockerfile_lines()
    text = "\n".join(lines)
    assert "ARG TORCH_REQUIREMENT=torch==2.13.0" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    torch_install = text.index('--index-url "${TORCH_INDEX_URL}"')
    assert torch_install < text.index("pip install --constraint")  # torch before the project
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert lines[-2:] == ['ENTRYPOINT ["tunewatch"]', 'CMD ["--help"]']


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignored = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip()[:1] != "#"]
    ignored = [p for p in ignored if p]
    for line in dockerfile_lines():
        if not line.startswith("COPY ") or "--from" in line:
            continue
        for source in line.split()[1:-1]:
            assert (ROOT / source).exists(), source
            hits = [p for p in ignored if fnmatch.fnmatch(source, p.lstrip("*/"))]
            assert not hits, f"{source} is excluded by .dockerignore {hits}"
    assert {".git", ".venv", ".env"} <= set(ignored)


def test_prometheus_scrapes_tunewatch_serve() -> None:
    svc = services()
    prom, tw = svc["prometheus"], svc["tunewatch"]
    ((source, target),) = bind_sources(prom)
    assert f"--config.file={target}" in prom["command"]
    config = yaml.safe_load((ROOT / source).read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "tunewatch"]
    (targets,) = [c["targets"] for c in job["static_configs"]]
    assert job.get("metrics_path", "/metrics") == "/metrics"  # the route that needs no token
    assert targets == [f"tunewatch:{environment(tw)['TUNEWATCH_API_PORT']}"]
    assert "/-/ready" in " ".join(prom["healthcheck"]["test"])
    assert prom["depends_on"]["tunewatch"]["condition"] == "service_healthy"
    assert any(v.startswith("prometheus-data:") for v in prom["volumes"])
    assert "prometheus-data" in compose()["volumes"]


def test_grafana_provisions_the_alert_rules() -> None:
    grafana = services()["grafana"]
    mounts = {Path(source).as_posix(): target for source, target in bind_sources(grafana)}
    assert mounts["dashboards/alerting"] == "/etc/grafana/provisioning/alerting"
    rules = list((ROOT / "dashboards" / "alerting").glob("*.yaml"))
    assert rules
    for path in rules:  # Grafana expands $NAME in labels: templates belong in annotations
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                assert "$" not in json.dumps(rule.get("labels", {})), rule["uid"]
