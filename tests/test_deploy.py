"""deploy/: the Dockerfile, the compose stack, the Kubernetes manifests, the Prometheus alert
rules and the Grafana provisioning parse, and refer only to things that exist.

No container engine runs in the test environment, so the image is not built here; instead
the Dockerfile's build steps are checked against the tree (its COPY sources build the wheel),
and every path, port, name and command line that ties the files together is cross-checked.
The alert rules go through promtool (``make test`` installs Debian's ``prometheus``).
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from ratelimit_gw.cli import build_parser
from ratelimit_gw.settings import Settings, build_settings, parse_settings

pytestmark = pytest.mark.ops  # deploy/'s files, cross-checked; the alert rules via promtool

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards/ratelimit-gw.json"
# Provided by the operator, not by these manifests (documented in docs/operations.md).
OPERATOR_SECRETS = {"ratelimit-gw-secrets"}
OPERATOR_SERVICES = {"redis"}
DASHBOARD_ROWS = [
    "Traffic",
    "Rejections",
    "Latency",
    "Tokens and spend",
    "Storage",
    "Configuration",
    "Upstream keys",
    "Webhooks",
    "Budgets",
    "Archive",
]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, (
        "promtool not found: `make test` installs it (Debian package `prometheus`, which "
        "provides both prometheus and promtool)"
    )
    return subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(PROM / "alerts.yml")["groups"] for rule in group["rules"]]


# --- Prometheus rules and config ---------------------------------------------------------------


def test_alert_rules_pass_promtool_check_rules() -> None:
    result = promtool("check", "rules", "deploy/prometheus/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = promtool("test", "rules", "deploy/prometheus/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alert_unit_tests_would_fail_on_a_wrong_expectation(tmp_path: Path) -> None:
    tests = load_yaml(PROM / "alerts_test.yml")
    tests["rule_files"] = [str(PROM / "alerts.yml")]
    firing = next(
        case
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    )
    firing["exp_alerts"] = []  # claim an alert that fires would stay quiet
    (tmp_path / "wrong_test.yml").write_text(yaml.safe_dump(tests))
    result = promtool("test", "rules", "wrong_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test_case() -> None:
    cases: dict[str, set[bool]] = {}
    for test in load_yaml(PROM / "alerts_test.yml")["tests"]:
        for case in test["alert_rule_test"]:
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    assert {rule["alert"]: {True, False} for rule in alert_rules()} == cases


def test_every_alert_has_a_severity_summary_and_description() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["alert"].startswith("Rlgw")


def test_prometheus_config_is_valid_and_its_rule_files_resolve() -> None:
    result = promtool("check", "config", "deploy/prometheus/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_k8s_prometheus_rule_carries_exactly_the_alert_rules() -> None:
    (rule,) = [doc for doc in k8s_documents() if doc["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == load_yaml(PROM / "alerts.yml")["groups"]


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", text)
    out = []
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)
    assert isinstance(parsed, list), f"not exec form: {arguments}"
    return [str(part) for part in parsed]


def docker_instruction(name: str) -> str:
    (found,) = [rest for instruction, rest in dockerfile() if instruction == name]
    return found


def copy_sources() -> list[str]:
    sources = []
    for instruction, rest in dockerfile():
        if instruction == "COPY" and not rest.startswith("--from"):
            sources += shlex.split(rest)[:-1]
    return sources


def cli_config_path(argv: list[str]) -> str:
    args = build_parser().parse_args(argv)
    assert args.command == "serve"
    assert isinstance(args.config, str)
    return args.config


def test_dockerfile_is_slim_non_root_and_runs_the_cli_with_the_mounted_config() -> None:
    bases = [rest for instruction, rest in dockerfile() if instruction == "FROM"]
    assert bases and all(base.startswith("python:3.11-slim") for base in bases)
    user = docker_instruction("USER").split(":")[0]
    assert user not in ("root", "0")
    assert int(user) == k8s_pod_spec()["securityContext"]["runAsUser"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert exec_form(docker_instruction("ENTRYPOINT")) == ["ratelimit-gw"]
    assert "ratelimit-gw" in pyproject["project"]["scripts"]
    assert cli_config_path(exec_form(docker_instruction("CMD"))) == CONFIG_PATH


def test_dockerfile_healthcheck_probes_healthz_on_the_exposed_port() -> None:
    healthcheck = docker_instruction("HEALTHCHECK")
    command = exec_form(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    (url,) = re.findall(r"http://[^'\"]+", command[2])
    assert urlsplit(url).path == "/healthz"
    assert urlsplit(url).port == int(docker_instruction("EXPOSE")) == compose_settings().server.port
    compile(command[2], "healthcheck", "exec")  # the probe is valid Python


def test_dockerfile_copies_exist_and_are_enough_to_build_the_wheel(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    sources = copy_sources()
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the build context"
        if path.is_dir():
            shutil.copytree(path, context / source, symlinks=True)
        else:
            shutil.copy2(path, context / source)
    # What `pip wheel .` does in the build stage, with only what the Dockerfile copied.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", "dist", "."],
        cwd=context,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert list((context / "dist").glob("ratelimit_gw-*.whl"))


def test_dockerignore_keeps_every_copied_source_in_the_context() -> None:
    patterns = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "**"  # everything out, then only what is needed back in
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert {source.rstrip("/").split("/")[0] for source in copy_sources()} <= kept


# --- compose -----------------------------------------------------------------------------------

COMPOSE: dict[str, Any] = load_yaml(DEPLOY / "compose.yaml")
SERVICES: dict[str, Any] = COMPOSE["services"]
CONFIG_PATH = "/etc/ratelimit-gw/gateway.toml"


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment with ${VAR:-default} as compose resolves it (VAR unset)."""
    return {
        name: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))
        for name, value in service.get("environment", {}).items()
    }


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path, for the service's bind mounts (named volumes skipped)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
        else:
            assert source in COMPOSE["volumes"], f"volume {source} is not declared"
    return mounts


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a path inside the container comes from on the host, through a bind mount."""
    for target, source in bind_mounts(service).items():
        inside = PurePosixPath(container_path)
        if inside == PurePosixPath(target) or PurePosixPath(target) in inside.parents:
            return source / inside.relative_to(target)
    raise AssertionError(f"{container_path} is not mounted")


@functools.cache
def compose_settings() -> Settings:
    """deploy/gateway.toml validated by the gateway itself, with compose's environment."""
    gateway = SERVICES["gateway"]
    return build_settings(
        tomllib.loads(host_path(gateway, CONFIG_PATH).read_text()), compose_env(gateway)
    )


def test_compose_runs_two_gateways_redis_the_mock_prometheus_and_grafana() -> None:
    assert set(SERVICES) == {"gateway", "redis", "mock-upstream", "prometheus", "grafana"}
    assert SERVICES["gateway"]["deploy"]["replicas"] == 2
    for name in ("gateway", "mock-upstream"):
        build = SERVICES[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", []):
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"


def test_every_compose_bind_mount_exists() -> None:
    mounts = [(name, source) for name, s in SERVICES.items() for source in bind_mounts(s).values()]
    assert {source.relative_to(DEPLOY).as_posix() for _, source in mounts} == {
        "gateway.toml",
        "prometheus/prometheus.yml",
        "prometheus/alerts.yml",
        "grafana/provisioning",
        "grafana/dashboards",
    }
    for name, source in mounts:
        assert source.exists(), f"{name}: {source} does not exist"


def test_compose_gateway_config_is_mounted_where_the_image_reads_it_and_validates() -> None:
    gateway = SERVICES["gateway"]
    assert host_path(gateway, CONFIG_PATH) == DEPLOY / "gateway.toml"
    settings = compose_settings()
    assert settings.server.host == "0.0.0.0"
    published = [str(port).rsplit(":", 1) for port in gateway["ports"]]
    assert {int(container) for _, container in published} == {settings.server.port}
    first, _, last = published[0][0].partition("-")
    assert int(last) - int(first) + 1 == gateway["deploy"]["replicas"]  # a port per replica
    assert settings.admin_token  # the admin API is on
    assert urlsplit(settings.storage.url).hostname in SERVICES
    assert {m.provider.protocol for m in settings.models.values()} == {
        "openai",
        "anthropic",
        "gemini",
    }


def test_compose_mock_upstream_command_is_valid_and_matches_the_providers() -> None:
    mock = SERVICES["mock-upstream"]
    args = build_parser().parse_args(mock["command"])
    assert (args.command, args.host) == ("mock-upstream", "0.0.0.0")
    for provider in compose_settings().providers.values():
        url = urlsplit(provider.base_url)
        assert (url.hostname, url.port) == ("mock-upstream", args.port)
    probe = " ".join(mock["healthcheck"]["test"])
    assert f"127.0.0.1:{args.port}/mock/stats" in probe


def test_compose_prometheus_loads_the_alert_rules_and_scrapes_every_gateway() -> None:
    prometheus = SERVICES["prometheus"]
    flags = dict(flag.split("=", 1) for flag in prometheus["command"] if "=" in flag)
    config_path = flags["--config.file"]
    assert host_path(prometheus, config_path) == PROM / "prometheus.yml"
    config = load_yaml(PROM / "prometheus.yml")
    for rule_file in config["rule_files"]:
        inside = PurePosixPath(config_path).parent / rule_file
        assert host_path(prometheus, str(inside)) == PROM / "alerts.yml"
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "ratelimit-gw"  # what the alert rules select on
    assert 'up{job="ratelimit-gw"}' in (PROM / "alerts.yml").read_text()
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["gateway"]
    assert discovery["port"] == compose_settings().server.port


def test_grafana_provisioning_points_at_prometheus_and_the_mounted_dashboard() -> None:
    grafana = SERVICES["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning == GRAFANA / "provisioning"
    (datasource,) = load_yaml(provisioning / "datasources/prometheus.yaml")["datasources"]
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and url.hostname in SERVICES
    assert f"{url.port}:{url.port}" in SERVICES["prometheus"]["ports"]
    (provider,) = load_yaml(provisioning / "dashboards/ratelimit-gw.yaml")["providers"]
    dashboards = host_path(grafana, provider["options"]["path"])
    assert (dashboards / DASHBOARD.name).resolve() == DASHBOARD
    home = compose_env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home) == DASHBOARD
    # Every panel queries the provisioned datasource, by its uid.
    uids = {t["datasource"]["uid"] for p in dashboard()["panels"] for t in p.get("targets", [])}
    assert uids == {datasource["uid"]}


# --- Grafana dashboard -------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def test_dashboard_has_its_rows_and_well_formed_panels() -> None:
    board = dashboard()
    assert board["uid"] == "ratelimit-gw"
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == DASHBOARD_ROWS
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(set(refs)) == len(refs) and panel["description"]
    ids = [p["id"] for p in board["panels"]]
    assert len(set(ids)) == len(ids)


# --- Kubernetes --------------------------------------------------------------------------------


def k8s_documents() -> Iterator[dict[str, Any]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
                if document:
                    yield document


def k8s(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in k8s_documents() if doc["kind"] == kind]
    return found


def k8s_pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = k8s("Deployment")["spec"]["template"]["spec"]
    return spec


def k8s_container() -> dict[str, Any]:
    (container,) = k8s_pod_spec()["containers"]
    return dict(container)


def k8s_settings() -> Settings:
    config_map = k8s("ConfigMap")
    env = {e["name"]: "set-by-secret" for e in k8s_container()["env"]}
    return parse_settings(config_map["data"]["gateway.toml"], env)


def test_kustomization_lists_every_manifest_and_the_image() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    (image,) = kustomization["images"]
    assert k8s_container()["image"] == f"{image['name']}:{version}"
    assert str(image["newTag"]) == version


def test_k8s_manifests_are_the_expected_kinds() -> None:
    kinds = sorted(doc["kind"] for doc in k8s_documents())
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Service",
            "ServiceMonitor",
        ]
    )
    for doc in k8s_documents():
        assert doc["apiVersion"] and doc["metadata"]["name"].startswith("ratelimit-gw")


def test_k8s_config_map_is_mounted_where_the_image_reads_it_and_validates() -> None:
    container = k8s_container()
    assert cli_config_path(container["args"]) == CONFIG_PATH
    volumes = {v["name"]: v for v in k8s_pod_spec()["volumes"]}
    (mount,) = [
        m
        for m in container["volumeMounts"]
        if m["name"] in volumes and "configMap" in volumes[m["name"]]
    ]
    source = volumes[mount["name"]]["configMap"]
    assert source["name"] == k8s("ConfigMap")["metadata"]["name"]
    (item,) = source["items"]
    assert item["key"] in k8s("ConfigMap")["data"]
    assert str(PurePosixPath(mount["mountPath"]) / item["path"]) == CONFIG_PATH
    settings = k8s_settings()  # every env reference of the config is set by the Deployment
    assert settings.admin_token and settings.models and settings.server.host == "0.0.0.0"


def test_k8s_secrets_are_referenced_by_key_and_documented_for_the_operator() -> None:
    refs = [
        (e["name"], e["valueFrom"]["secretKeyRef"])
        for e in k8s_container()["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert refs and all("value" not in e for e in k8s_container()["env"])
    defined = {d["metadata"]["name"] for d in k8s_documents() if d["kind"] == "Secret"}
    page = operations_page()
    comments = (K8S / "deployment.yaml").read_text()
    for _env, ref in refs:
        assert ref["name"] in defined | OPERATOR_SECRETS
        assert f"--from-literal={ref['key']}=" in page, f"docs never say to set {ref['key']}"
        assert f"--from-literal={ref['key']}=" in comments
    for name in OPERATOR_SECRETS:
        assert name in page
    # Each secret is read by the config (no secret is mounted for nothing), and vice versa.
    toml = k8s("ConfigMap")["data"]["gateway.toml"]
    used = set(re.findall(r'(?:api_key_env|token_env) = "(\w+)"', toml))
    assert {env for env, _ in refs} == used


def test_k8s_storage_is_an_operator_provided_service_documented_in_the_docs() -> None:
    host = urlsplit(k8s_settings().storage.url).hostname
    defined = {d["metadata"]["name"] for d in k8s_documents() if d["kind"] == "Service"}
    assert host in defined | OPERATOR_SERVICES
    page = operations_page()
    for name in OPERATOR_SERVICES:
        assert f"`{name}`" in page


def test_k8s_probes_hit_healthz_and_readyz_on_the_configured_port() -> None:
    container = k8s_container()
    (port,) = container["ports"]
    assert port["containerPort"] == k8s_settings().server.port

    def probe_target(probe: str) -> tuple[str, int]:
        get = container[probe]["httpGet"]
        number = port["containerPort"] if get["port"] == port["name"] else get["port"]
        return get["path"], number

    assert probe_target("livenessProbe") == ("/healthz", 8080)
    assert probe_target("readinessProbe") == ("/readyz", 8080)
    assert probe_target("startupProbe") == ("/healthz", 8080)


def test_k8s_deployment_sets_resources_and_a_locked_down_security_context() -> None:
    container = k8s_container()
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    assert k8s_pod_spec()["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    # A read-only root still needs a writable /tmp (multiprocess metrics, temp files).
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in k8s_pod_spec()["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_k8s_selectors_ports_and_targets_line_up() -> None:
    deployment = k8s("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    service = k8s("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = k8s_container()["ports"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    pdb = k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = k8s("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # Draining a node never blocks: the PDB always leaves a pod that may be evicted.
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    monitor = k8s("ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == (service_port["name"], "/metrics")
    # Prometheus names the job after the Service: the alert rules' up{job=...} matches it.
    assert service["metadata"]["name"] == "ratelimit-gw"


# --- docs/operations.md ------------------------------------------------------------------------


def operations_page() -> str:
    """The operator's page (it was the README's "Operating it" section)."""
    return (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")


def test_operations_page_documents_every_metric_alert_and_dashboard_row() -> None:
    section = operations_page()
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in section, rule["alert"]
    for row in DASHBOARD_ROWS:
        assert row in section
    from prometheus_client import CollectorRegistry

    from ratelimit_gw.metrics import create_metrics

    registry = CollectorRegistry()
    create_metrics(registry)
    for family in registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        assert f"`{family.name}{suffix}`" in section, family.name
    for path in ("/healthz", "/readyz", "/metrics"):
        assert f"`{path}`" in section


@pytest.mark.parametrize(
    "path",
    sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()),
)
def test_every_deploy_file_parses_and_is_described_in_the_docs(path: str) -> None:
    file = DEPLOY / path
    if file.suffix in (".yaml", ".yml"):
        assert list(yaml.safe_load_all(file.read_text(encoding="utf-8")))
    elif file.suffix == ".json":
        json.loads(file.read_text(encoding="utf-8"))
    elif file.suffix == ".toml":
        tomllib.loads(file.read_text(encoding="utf-8"))
    directory = path.split("/")[0] + "/" if "/" in path else path
    assert f"deploy/{directory}" in operations_page()
