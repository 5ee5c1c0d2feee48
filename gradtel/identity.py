"""Who is exporting: the run (the job, stable across its restarts) and the process (new at every start).

Alerts should follow the job, not the process: a training job restarted from a checkpoint, or re-created by
Kubernetes after a crash, is the same run, so its ``run`` label must not change, or every restart becomes a new
alert identity and a dead process keeps its alerts. The run id is therefore taken from the job's own id where
the platform gives one, in this order (the first that applies wins):

1. ``GRADTEL_RUN_ID`` (``gradtel run --run-id``/``gradtel demo --run-id`` set it; the example Kubernetes Job sets
   it from the Job's name through the downward API);
2. a Kubeflow TFJob's name, read from the ``TF_CONFIG`` cluster addresses (``<job>-<replica>-<index>...``);
3. any other ``TF_CONFIG`` cluster: ``tf-`` and a hash of the cluster spec (the same on every worker);
4. a Kubernetes Job's pod (``KUBERNETES_SERVICE_HOST`` set and the hostname ``<job>-<5 chars>``, or
   ``<job>-<index>-<5 chars>`` with ``JOB_COMPLETION_INDEX`` set in an Indexed Job): the Job's name;
5. ``SLURM_JOB_ID``: ``slurm-<id>``;
6. otherwise ``<hostname>-`` and a hash of the working directory and the command line: the same command
   restarted on the same host is the same run.

The process identity is the other half: ``service.instance.id`` (a random id, the OpenTelemetry resource
attribute meant for it; the OTLP to Prometheus translation makes it the ``instance`` label) and the process
start time, exported as ``gradtel_process_start_time_seconds`` so that rules can tell a restart (a new start
time, a counter reset) from a change in training.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Mapping, Sequence

#: Longest accepted run id (it becomes a label value on every series).
MAX_RUN_ID_LENGTH = 128
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]*")
#: What a run id must look like, as the error and the configuration warning say it.
RUN_ID_EXPECTED = f"1-{MAX_RUN_ID_LENGTH} characters: letters, digits and ._:/@+=- (starting with a letter or digit)"
#: Kubeflow training-operator service names: ``<job>-<replica type>-<index>``.
_KUBEFLOW_HOST = re.compile(r"^(?P<job>[a-z0-9]([-a-z0-9]*[a-z0-9])?)-(?:chief|master|worker|ps|evaluator)-\d+$")
#: A Job's pod name: the Job name (and, for an Indexed Job, ``-<completion index>``) and 5 random characters.
_JOB_POD = re.compile(r"^(?P<job>[a-z0-9][-a-z0-9]*)-[bcdfghjklmnpqrstvwxz2456789]{5}$")


def check_run_id(value: str, source: str = "GRADTEL_RUN_ID") -> str:
    """``value`` if it is a usable run id, else a one-line ``ValueError`` saying what was expected."""
    if len(value) > MAX_RUN_ID_LENGTH or not _RUN_ID.fullmatch(value):
        raise ValueError(f"{source} must be {RUN_ID_EXPECTED}, got {value[:200]!r}")
    return value


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _from_tf_config(raw: str | None) -> str | None:
    """The TFJob name shared by every address of the cluster, else a hash of the cluster spec."""
    if not raw:
        return None
    try:
        cluster = json.loads(raw).get("cluster") or {}
        addresses = [str(a) for hosts in cluster.values() for a in hosts]
    except (ValueError, TypeError, AttributeError):
        return None  # Worker.from_tf_config reports a malformed TF_CONFIG
    if not addresses:
        return None
    names = set()
    for address in addresses:
        found = _KUBEFLOW_HOST.match(address.rsplit(":", 1)[0].split(".", 1)[0])
        names.add(found.group("job") if found else None)
    if len(names) == 1 and None not in names:
        return names.pop()
    return "tf-" + _short_hash(json.dumps(cluster, sort_keys=True))


def _from_kubernetes(env: Mapping[str, str], hostname: str) -> str | None:
    if not env.get("KUBERNETES_SERVICE_HOST"):
        return None
    found = _JOB_POD.match(hostname)
    if not found:
        return None
    job, index = found.group("job"), env.get("JOB_COMPLETION_INDEX", "").strip()
    return job.removesuffix(f"-{index}") if index else job


def derive_run_id(
    env: Mapping[str, str] | None = None,
    hostname: str | None = None,
    argv: Sequence[str] | None = None,
    cwd: str | None = None,
    *,
    strict: bool = True,
) -> str:
    """The run id of this process (see the module docstring for the order of the sources). A malformed
    ``GRADTEL_RUN_ID`` is a ``ValueError``, or with ``strict=False`` ignored (the configuration warns of it)."""
    env = os.environ if env is None else env
    explicit = (env.get("GRADTEL_RUN_ID") or "").strip()
    if explicit and (strict or (_RUN_ID.fullmatch(explicit) and len(explicit) <= MAX_RUN_ID_LENGTH)):
        return check_run_id(explicit)
    hostname = socket.gethostname() if hostname is None else hostname
    derived = (
        _from_tf_config(env.get("TF_CONFIG"))
        or _from_kubernetes(env, hostname)
        or (f"slurm-{env['SLURM_JOB_ID']}" if env.get("SLURM_JOB_ID", "").strip() else None)
    )
    if derived:
        return derived[:MAX_RUN_ID_LENGTH]
    argv = sys.argv if argv is None else argv
    cwd = os.getcwd() if cwd is None else cwd
    host = re.sub(r"[^A-Za-z0-9._-]", "-", hostname.split(".", 1)[0]) or "host"
    return f"{host[:60]}-{_short_hash(json.dumps([cwd, list(argv)]))}"


#: This process's identity, fixed when gradtel is imported: a restart is a new id and a new start time.
INSTANCE_ID: str = uuid.uuid4().hex
START_TIME_S: float = time.time()
