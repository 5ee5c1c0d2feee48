"""The example Job passes Pod Security "restricted", checked by the profile's rules written out below (the
Kubernetes Pod Security Standards, baseline and restricted, as of Kubernetes 1.30), and names its run."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

import gradtel

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "deploy" / "kubernetes" / "training-job.yaml"

#: Volume types "restricted" allows.
ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What in a pod spec breaks Pod Security "restricted" (which includes "baseline"); empty when it passes."""
    found: list[str] = []
    pod_sc = pod.get("securityContext") or {}
    containers = [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"{key} is true")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            found.append(f"volume {volume['name']} has type {sorted(kinds - ALLOWED_VOLUMES)}")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"unsafe sysctl {sysctl['name']}")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        found.append("pod windowsOptions.hostProcess")
    if pod_sc.get("runAsUser") == 0:
        found.append("pod runAsUser is 0")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        found.append(f"pod seccompProfile {pod_seccomp}")
    for container in containers:
        name, sc = container["name"], container.get("securityContext") or {}
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{name}: windowsOptions.hostProcess")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount {sc['procMount']}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            found.append(f"{name}: AppArmor Unconfined")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot is not true (on the container or the pod)")
        if sc.get("runAsUser") == 0:
            found.append(f"{name}: runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile is {seccomp}, not RuntimeDefault or Localhost")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {capabilities['add']}")
    return found


def _job() -> dict[str, Any]:
    return yaml.safe_load(JOB.read_text())


def test_the_example_job_passes_pod_security_restricted() -> None:
    assert restricted_violations(_job()["spec"]["template"]["spec"]) == []


def test_the_check_finds_what_the_issue_found() -> None:
    """The Job as it was (no capabilities.drop, no seccompProfile) fails, rule by rule."""
    pod = copy.deepcopy(_job()["spec"]["template"]["spec"])
    pod.pop("securityContext")
    container = pod["containers"][0]
    for key in ("capabilities", "seccompProfile", "runAsNonRoot"):
        container["securityContext"].pop(key)
    container["securityContext"]["allowPrivilegeEscalation"] = True
    pod["volumes"] = [{"name": "host", "hostPath": {"path": "/"}}]
    assert sorted(restricted_violations(pod)) == sorted(
        [
            "trainer: allowPrivilegeEscalation is not false",
            "trainer: runAsNonRoot is not true (on the container or the pod)",
            "trainer: seccompProfile is None, not RuntimeDefault or Localhost",
            "trainer: capabilities do not drop ALL",
            "volume host has type ['hostPath']",
        ]
    )


def test_the_run_id_is_the_jobs_name() -> None:
    container = _job()["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["GRADTEL_RUN_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['job-name']"


def test_the_images_carry_gradtels_version() -> None:
    container = _job()["spec"]["template"]["spec"]["containers"][0]
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())["services"]
    images = {container["image"], compose["trainer"]["image"], compose["trainer-otlp"]["image"]}
    assert images == {f"gradtel-demo:{gradtel.__version__}"}
