"""Schema-level checks of deploy/: Kubernetes manifests, compose, Grafana provisioning, Collector, configs.

Each file is checked against the source it must agree with (the rule file, the dashboard JSON, the other
manifests), not only for loading as YAML.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from deploy import alerts, kubernetes
from tests.observability.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _manifest(name: str) -> dict[str, Any]:
    return _yaml(K8S / name)


def test_every_manifest_has_api_version_kind_and_name() -> None:
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"], path.name
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], path.name


def test_kustomization_lists_every_manifest() -> None:
    resources = _manifest("kustomization.yaml")["resources"]
    assert sorted(resources) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_prometheus_rule_spec_equals_the_rule_file() -> None:
    rule = _manifest("prometheusrule.yaml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["spec"] == _yaml(DEPLOY / "prometheus" / "gradtel-rules.yml")
    assert rule["spec"]["groups"] == alerts.rule_groups()
    assert rule["metadata"]["labels"] == kubernetes.RELEASE_LABELS


def test_dashboards_config_map_holds_exactly_the_dashboard_files() -> None:
    config_map = _manifest("dashboards-configmap.yaml")
    assert config_map["kind"] == "ConfigMap"
    assert config_map["metadata"]["labels"] == {"grafana_dashboard": "1"}
    files = {p.name: p.read_text() for p in (ROOT / "dashboards").glob("*.json")}
    assert config_map["data"] == files
    for text in config_map["data"].values():
        json.loads(text)
    # kubectl's client-side apply keeps a copy in a 256 KiB annotation.
    assert len((K8S / "dashboards-configmap.yaml").read_bytes()) < 256 * 1024


def test_pod_monitor_selects_the_job_pods_and_scrapes_their_metrics_port() -> None:
    monitor, job = _manifest("podmonitor.yaml"), _manifest("training-job.yaml")
    assert monitor["kind"] == "PodMonitor" and job["kind"] == "Job"
    pod = job["spec"]["template"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in ports and len(endpoint["port"]) <= 15
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OTEL_EXPORTER_PROMETHEUS_HOST"] == "0.0.0.0"
    assert int(env["OTEL_EXPORTER_PROMETHEUS_PORT"]) == ports[endpoint["port"]]
    assert endpoint["path"] == "/metrics"
    assert pod["spec"]["restartPolicy"] in {"Never", "OnFailure"}
    assert monitor["metadata"]["labels"] == kubernetes.RELEASE_LABELS


def test_pod_monitor_job_name_matches_the_target_down_selector() -> None:
    monitor = _manifest("podmonitor.yaml")
    job_label = f"default/{monitor['metadata']['name']}"  # prometheus-operator's <namespace>/<name>
    pattern = alerts.Config().target_selector.split('"')[1]
    assert re.fullmatch(pattern, job_label)
    assert re.fullmatch(pattern, "gradtel")


def _compose() -> dict[str, Any]:
    return _yaml(DEPLOY / "docker-compose.yml")


def test_compose_services_and_profiles() -> None:
    services = _compose()["services"]
    assert {"trainer", "prometheus", "alertmanager", "grafana", "otel-collector"} <= set(services)
    assert services["otel-collector"]["profiles"] == ["otel"]
    trainer = services["trainer"]
    assert trainer["environment"]["OTEL_EXPORTER_PROMETHEUS_HOST"] == "0.0.0.0"
    assert trainer["command"][:1] == ["demo"] and "--steps" in trainer["command"]
    assert (DEPLOY / trainer["build"]["context"] / trainer["build"]["dockerfile"]).resolve().is_file()


def test_compose_mounts_files_that_exist() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).resolve().exists(), f"{name} mounts missing {source}"


def test_compose_mounts_the_generated_rules_and_every_dashboard() -> None:
    services = _compose()["services"]
    prometheus_sources = {v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert "./prometheus/gradtel-rules.yml" in prometheus_sources
    grafana = {v.split(":")[0]: v.split(":")[1] for v in services["grafana"]["volumes"]}
    dashboards = {f"../dashboards/{p.name}" for p in (ROOT / "dashboards").glob("*.json")}
    assert dashboards <= set(grafana)
    provider = _yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "gradtel.yml")["providers"][0]
    assert all(grafana[d].startswith(provider["options"]["path"] + "/") for d in dashboards)


def test_compose_prometheus_scrapes_the_trainer_port() -> None:
    config = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    gradtel = next(job for job in config["scrape_configs"] if job["job_name"] == "gradtel")
    assert gradtel["static_configs"][0]["targets"] == [f"trainer:{kubernetes.METRICS_PORT}"]
    assert config["rule_files"] == ["gradtel-rules.yml"]


def test_grafana_datasource_is_the_default_prometheus() -> None:
    sources = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    prometheus = next(s for s in sources if s["type"] == "prometheus")
    assert prometheus["isDefault"] is True and prometheus["url"] == "http://prometheus:9090"
    assert (
        prometheus["jsonData"]["timeInterval"]
        == _yaml(DEPLOY / "prometheus" / "prometheus.yml")["global"]["scrape_interval"]
    )


def test_collector_pipelines_reference_defined_components() -> None:
    config = _yaml(DEPLOY / "otel-collector" / "config.yaml")
    service = config["service"]
    assert set(service.get("extensions", [])) <= set(config.get("extensions", {}))
    for name, pipeline in service["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(config.get(kind, {})), f"{name}.{kind}"
    assert "otlp" in service["pipelines"]["metrics"]["receivers"]
    remote_write = config["exporters"]["prometheusremotewrite"]["endpoint"]
    assert remote_write == "http://prometheus:9090/api/v1/write"
    assert "--web.enable-remote-write-receiver" in _compose()["services"]["prometheus"]["command"]


def test_promtool_check_config() -> None:
    promtool = require_binary("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_config_is_valid() -> None:
    amtool = require_binary("amtool")
    path = DEPLOY / "alertmanager" / "alertmanager.yml"
    result = subprocess.run([amtool, "check-config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_groups_and_inhibits_by_labels_the_alerts_carry() -> None:
    config = _yaml(DEPLOY / "alertmanager" / "alertmanager.yml")
    assert {"alertname", "job", "run"} == set(config["route"]["group_by"])
    names = {alert.name for alert in alerts.alerts()}
    for rule in config["inhibit_rules"]:
        assert any(name in rule["source_matchers"][0] for name in names)
