"""Kubernetes manifests for prometheus-operator / kube-prometheus-stack clusters.

The PrometheusRule carries exactly the rule groups of deploy/prometheus/gradtel-rules.yml and the ConfigMap
exactly the dashboard JSON files, because both are built here from the same objects. The PodMonitor selects
the example Job's pods through one shared label and scrapes the container port the Job names, so the two
cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import gradtel

#: kube-prometheus-stack only picks up monitors and rules carrying its Helm release label.
RELEASE_LABELS: dict[str, str] = {"release": "kube-prometheus-stack"}
#: Pods carrying this label are scraped by the PodMonitor; add it to your training pods.
SCRAPE_LABEL: dict[str, str] = {"gradtel/scrape": "true"}
#: Grafana's dashboard sidecar loads ConfigMaps with this label.
GRAFANA_DASHBOARD_LABEL: dict[str, str] = {"grafana_dashboard": "1"}
#: The container port gradtel serves /metrics on (a named port, so the PodMonitor can refer to it).
METRICS_PORT_NAME = "gradtel-metrics"
METRICS_PORT = 9464
METRICS_PATH = "/metrics"
SCRAPE_INTERVAL = "15s"
#: Image built from deploy/trainer/Dockerfile (tagged with gradtel's version); push it to a registry your
#: cluster pulls from.
DEMO_IMAGE = f"gradtel-demo:{gradtel.__version__}"
#: The label the Job controller puts on its pods (every Kubernetes version; 1.27+ also sets
#: batch.kubernetes.io/job-name): the run id of the example Job comes from it through the downward API.
JOB_NAME_LABEL = "job-name"
#: The numeric non-root user of deploy/trainer/Dockerfile (nobody).
RUN_AS_USER = 65534
#: Kubeflow training-operator pod labels copied onto the series, so alerts name the TFJob and replica.
KUBEFLOW_LABELS: dict[str, str] = {
    "training.kubeflow.org/job-name": "training_job",
    "training.kubeflow.org/replica-type": "replica_type",
    "training.kubeflow.org/replica-index": "replica_index",
}


def _meta_label(pod_label: str) -> str:
    """The service-discovery meta label Prometheus derives from a pod label."""
    sanitized = "".join(ch if ch.isalnum() else "_" for ch in pod_label)
    return f"__meta_kubernetes_pod_label_{sanitized}"


def pod_monitor() -> dict[str, Any]:
    """Scrapes every pod labelled with :data:`SCRAPE_LABEL` in the PodMonitor's namespace.

    Training pods rarely have a Service, hence a PodMonitor rather than a ServiceMonitor. The scrape job is
    named ``<namespace>/gradtel``, which the GradtelTargetDown alert's job selector matches.
    """
    relabelings = [
        {"sourceLabels": [_meta_label(pod_label)], "targetLabel": target, "action": "replace"}
        for pod_label, target in KUBEFLOW_LABELS.items()
    ]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "gradtel", "labels": dict(RELEASE_LABELS)},
        "spec": {
            "selector": {"matchLabels": dict(SCRAPE_LABEL)},
            "podMetricsEndpoints": [
                {
                    "port": METRICS_PORT_NAME,
                    "path": METRICS_PATH,
                    "interval": SCRAPE_INTERVAL,
                    "relabelings": relabelings,
                }
            ],
        },
    }


def prometheus_rule(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The rule file's groups as a PrometheusRule."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "gradtel", "labels": dict(RELEASE_LABELS)},
        "spec": {"groups": groups},
    }


def dashboards_config_map(dashboards: dict[str, str]) -> dict[str, Any]:
    """The dashboard JSON files, keyed by file name, for Grafana's sidecar."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "gradtel-dashboards",
            "labels": dict(GRAFANA_DASHBOARD_LABEL),
            "annotations": {"grafana_folder": "gradtel"},
        },
        "data": dict(sorted(dashboards.items())),
    }


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def training_job() -> dict[str, Any]:
    """An example training Job: gradtel's demo, serving /metrics on all interfaces of the pod."""
    labels = {"app.kubernetes.io/name": "gradtel-demo", **SCRAPE_LABEL}
    container = {
        "name": "trainer",
        "image": DEMO_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        # --linger keeps /metrics up after the last step so Prometheus scrapes the final counts.
        "args": ["demo", "--steps", "20000", "--linger", "60"],
        "env": [
            # The exporter binds 127.0.0.1 by default, which Prometheus cannot reach from outside the pod.
            {"name": "OTEL_EXPORTER_PROMETHEUS_HOST", "value": "0.0.0.0"},
            {"name": "OTEL_EXPORTER_PROMETHEUS_PORT", "value": str(METRICS_PORT)},
            {"name": "OTEL_SERVICE_NAME", "value": "gradtel-demo"},
            # The run id is the Job's name, so every series and the report name the run that made them.
            _field_env("GRADTEL_RUN_ID", f"metadata.labels['{JOB_NAME_LABEL}']"),
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            {
                "name": "OTEL_RESOURCE_ATTRIBUTES",
                "value": "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)",
            },
        ],
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": "1", "memory": "2Gi"},
            "limits": {"memory": "4Gi"},
        },
        # Pod Security "restricted" (tests/packaging/test_pod_security.py checks the profile's rules).
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    pod_security = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "gradtel-demo", "labels": {"app.kubernetes.io/name": "gradtel-demo"}},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": labels},
                "spec": {"restartPolicy": "Never", "securityContext": pod_security, "containers": [container]},
            },
        },
    }


def kustomization(files: list[str]) -> dict[str, Any]:
    """``kubectl apply -k deploy/kubernetes`` applies every manifest."""
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": files}
