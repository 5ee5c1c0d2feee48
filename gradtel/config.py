"""gradtel's configuration, read from the environment once (the OpenTelemetry variables plus GRADTEL_*).

Every variable is documented in the README's configuration table. Values are parsed, never evaluated: a bad
value is a clear ``ValueError`` naming the variable and what was expected.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gradtel import identity, series
from gradtel.naming import PatternSet
from gradtel.series import SeriesPolicy

EXPORTERS = ("prometheus", "otlp", "console", "none")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464
#: The pull endpoint's collections: at least this many seconds apart, and at most this share of one core's time
#: (scrapes in between get the previous collection; see exposition.PrometheusReader).
DEFAULT_MIN_INTERVAL_S = 1.0
DEFAULT_CPU_SHARE = 0.01
#: Default SDK cardinality limit per metric: far above a model's series count, so nothing folds silently
#: into the SDK's overflow series (opentelemetry-sdk's own default is 2,000).
DEFAULT_MAX_SERIES = 100_000

T = TypeVar("T")


def _setting(env: Mapping[str, str], name: str, default: T, parse: Callable[[str], T], what: str,
             requirement: str, valid: Callable[[T], bool] | None = None) -> T:
    """One value from the environment: ``default`` when unset or blank, else parsed and checked, with an error
    that names the variable and what was expected."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ValueError(f"{name} must be {what}, got {raw!r}") from None
    if valid is not None and not valid(value):
        raise ValueError(f"{name} must be {requirement}, got {raw!r}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    return _setting(env, name, default, int, "an integer", f">= {minimum}", lambda v: v >= minimum)


def _number(env: Mapping[str, str], name: str, default: float, expected: str, valid: Callable[[float], bool]) -> float:
    return _setting(env, name, default, float, expected, expected, valid)


_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _parse_flag(raw: str) -> bool:
    try:
        return _BOOLEANS[raw.strip().lower()]
    except KeyError:
        raise ValueError(raw) from None


def max_abs_default(env: Mapping[str, str] | None = None) -> bool:
    """``GRADTEL_MAX_ABS``: measure max |g| per variable too (off by default: see gradtel.stats for its cost)."""
    return _setting(os.environ if env is None else env, "GRADTEL_MAX_ABS", False, _parse_flag, "true or false",
                    "true or false")


def _exporters(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("OTEL_METRICS_EXPORTER", "prometheus")
    kinds = tuple(k.strip().lower() for k in raw.split(",") if k.strip()) or ("prometheus",)
    unknown = [k for k in kinds if k not in EXPORTERS]
    if unknown:
        raise ValueError(f"OTEL_METRICS_EXPORTER must be a comma-separated list of {', '.join(EXPORTERS)}; "
                         f"got {raw!r}")
    return tuple(k for k in kinds if k != "none")


def _basic_auth(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """Username and password of the endpoint; the password may come from a file (a mounted secret)."""
    username = env.get("GRADTEL_BASIC_AUTH_USERNAME") or None
    password = env.get("GRADTEL_BASIC_AUTH_PASSWORD")
    password_file = env.get("GRADTEL_BASIC_AUTH_PASSWORD_FILE")
    if password_file:
        try:
            with open(password_file) as f:
                password = f.read().rstrip("\n")
        except OSError as error:
            raise ValueError(f"GRADTEL_BASIC_AUTH_PASSWORD_FILE: cannot read {password_file!r}: {error}") from None
    if (username is None) != (password is None):
        raise ValueError("GRADTEL_BASIC_AUTH_USERNAME and GRADTEL_BASIC_AUTH_PASSWORD (or _PASSWORD_FILE) must be "
                         "set together")
    return username, password


@dataclass(frozen=True)
class Worker:
    """This process's place in a multi-worker job, from TF_CONFIG (``{"cluster": ..., "task": ...}``)."""

    task_type: str = ""
    task_index: int = 0
    is_chief: bool = True

    @property
    def label(self) -> str:
        """The ``worker`` label: ``chief:0``, ``worker:3``, or ``""`` outside a multi-worker job."""
        return f"{self.task_type}:{self.task_index}" if self.task_type else ""

    @classmethod
    def from_tf_config(cls, raw: str | None) -> Worker:
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            task = data.get("task") or {}
            task_type, index = str(task.get("type") or ""), int(task.get("index") or 0)
            cluster = data.get("cluster") or {}
        except (ValueError, TypeError, AttributeError):
            raise ValueError("TF_CONFIG must be JSON like {\"cluster\": {...}, \"task\": {\"type\": \"worker\", "
                             f"\"index\": 0}}}}, got {raw[:200]!r}") from None
        # The chief is the "chief" task, or worker 0 when the cluster has none (TensorFlow's rule).
        chief = task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in cluster)
        return cls(task_type, index, chief or not task_type)


def _series_policy(env: Mapping[str, str], worker: Worker) -> SeriesPolicy:
    mode = (env.get("GRADTEL_VARIABLE_SERIES") or "auto").strip().lower()
    if mode not in series.MODES:
        raise ValueError(f"GRADTEL_VARIABLE_SERIES must be one of {', '.join(series.MODES)}, got {mode!r}")
    on = (env.get("GRADTEL_VARIABLE_SERIES_WORKERS") or "chief").strip().lower()
    if on not in ("chief", "all"):
        raise ValueError(f"GRADTEL_VARIABLE_SERIES_WORKERS must be 'chief' or 'all', got {on!r}")

    def patterns(name: str) -> PatternSet:
        return PatternSet([p for p in (env.get(name) or "").split(",") if p.strip()])

    return SeriesPolicy(
        mode=mode,
        budget=_int(env, "GRADTEL_SERIES_BUDGET", series.DEFAULT_BUDGET, minimum=1),
        top_k=_int(env, "GRADTEL_TOPK", series.DEFAULT_TOP_K, minimum=1),
        include=patterns("GRADTEL_INCLUDE"),
        exclude=patterns("GRADTEL_EXCLUDE"),
        exporting_worker=worker.is_chief or on == "all",
    )


@dataclass(frozen=True)
class Config:
    """Where and how gradtel exports."""

    exporters: tuple[str, ...] = ("prometheus",)
    prometheus_host: str = DEFAULT_HOST
    prometheus_port: int = DEFAULT_PORT
    prometheus_min_interval_s: float = DEFAULT_MIN_INTERVAL_S
    prometheus_cpu_share: float = DEFAULT_CPU_SHARE
    otlp_protocol: str = "http/protobuf"
    #: The job's id, stable across its restarts (gradtel.identity.derive_run_id).
    run_id: str = field(default_factory=identity.derive_run_id)
    max_series: int = DEFAULT_MAX_SERIES
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    tls_client_cafile: str | None = None
    basic_auth_username: str | None = None
    basic_auth_password: str | None = None
    worker: Worker = field(default_factory=Worker)
    series: SeriesPolicy = field(default_factory=SeriesPolicy)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        protocol = (env.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                    or "http/protobuf").strip()
        if protocol not in ("grpc", "http/protobuf"):
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be 'grpc' or 'http/protobuf', got {protocol!r}")
        certfile, keyfile = env.get("GRADTEL_TLS_CERT_FILE"), env.get("GRADTEL_TLS_KEY_FILE")
        if bool(certfile) != bool(keyfile):
            raise ValueError("GRADTEL_TLS_CERT_FILE and GRADTEL_TLS_KEY_FILE must be set together")
        username, password = _basic_auth(env)
        worker = Worker.from_tf_config(env.get("TF_CONFIG"))
        return cls(
            exporters=_exporters(env),
            prometheus_host=env.get("OTEL_EXPORTER_PROMETHEUS_HOST", DEFAULT_HOST) or DEFAULT_HOST,
            prometheus_port=_int(env, "OTEL_EXPORTER_PROMETHEUS_PORT", DEFAULT_PORT),
            prometheus_min_interval_s=_number(env, "GRADTEL_PROMETHEUS_MIN_INTERVAL", DEFAULT_MIN_INTERVAL_S,
                                              "a number of seconds >= 0", lambda v: 0 <= v < float("inf")),
            prometheus_cpu_share=_number(env, "GRADTEL_PROMETHEUS_CPU_SHARE", DEFAULT_CPU_SHARE,
                                         "a fraction of one core, > 0 and <= 1", lambda v: 0 < v <= 1),
            otlp_protocol=protocol,
            run_id=identity.derive_run_id(env),
            max_series=_int(env, "GRADTEL_MAX_SERIES", DEFAULT_MAX_SERIES, minimum=1),
            tls_certfile=certfile or None,
            tls_keyfile=keyfile or None,
            tls_client_cafile=env.get("GRADTEL_TLS_CLIENT_CA_FILE") or None,
            basic_auth_username=username,
            basic_auth_password=password,
            worker=worker,
            series=_series_policy(env, worker),
        )

    def resource(self) -> Any:
        """The run id, host and process, merged over OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME (read by
        the SDK); service.name defaults to ``gradtel`` instead of the SDK's ``unknown_service``."""
        from opentelemetry.sdk.resources import Resource

        attributes: dict[str, str | int] = {
            "gradtel.run_id": self.run_id,
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
        }
        if "service.instance.id=" not in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
            attributes["service.instance.id"] = identity.INSTANCE_ID  # tells this process from its restarts
        if self.worker.task_type:
            attributes.update({"gradtel.task.type": self.worker.task_type,
                               "gradtel.task.index": self.worker.task_index})
        resource = Resource.create(attributes)
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "gradtel"}))
        return resource

    def security(self) -> Any:
        """TLS and basic auth of the pull endpoint."""
        from gradtel.endpoint import Security

        return Security(certfile=self.tls_certfile, keyfile=self.tls_keyfile, client_cafile=self.tls_client_cafile,
                        username=self.basic_auth_username, password=self.basic_auth_password)
