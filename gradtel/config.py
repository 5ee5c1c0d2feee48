"""gradtel's configuration, read from the environment (the OpenTelemetry variables plus GRADTEL_*).

Every variable is documented in the README's configuration table. This module is the one place settings are
parsed and checked (the CLI's options go through the same parsers). Values are parsed, never evaluated, and a bad
one never raises: it becomes a :class:`Problem`, one warning line naming the setting, the value and what was
expected, and the job goes on without the part that cannot work (see ``docs/settings.md``): a bad threshold falls
back to its default; a bad Prometheus setting turns the pull endpoint off, a bad OTLP one the OTLP push, a bad
exporter name is ignored. A configuration mistake never stops training and never prints a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gradtel import identity, series
from gradtel.logonce import log_once
from gradtel.naming import PatternSet
from gradtel.series import SeriesPolicy

log = logging.getLogger("gradtel")

EXPORTERS = ("prometheus", "otlp", "console", "none")
#: The name of gradtel's Prometheus reader among the SDK's metrics exporters, and what it is here.
PROMETHEUS_PLUGIN = {"gradtel_prometheus": "prometheus"}
OTLP_PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464
#: The pull endpoint's collections: at least this many seconds apart, and at most this share of one core's time
#: (scrapes in between get the previous collection; see exposition.PrometheusReader).
DEFAULT_MIN_INTERVAL_S = 1.0
DEFAULT_CPU_SHARE = 0.01
#: Default SDK cardinality limit per metric: far above a model's series count, so nothing folds silently
#: into the SDK's overflow series (opentelemetry-sdk's own default is 2,000).
DEFAULT_MAX_SERIES = 100_000
#: The periodic (OTLP, console) reader's push interval and timeout, the SDK's defaults; gradtel reads
#: OTEL_METRIC_EXPORT_INTERVAL/_TIMEOUT itself so that a bad value is one gradtel line.
DEFAULT_EXPORT_INTERVAL_MS = 60_000
DEFAULT_EXPORT_TIMEOUT_MS = 30_000

#: What the job does without a setting it cannot use (the end of a problem's line).
PROMETHEUS_OFF = "the Prometheus pull endpoint is off; training and the report go on"
OTLP_OFF = "the OTLP push is off; training and the report go on"

T = TypeVar("T")


class Invalid(ValueError):
    """A value that does not parse; its message, if any, says why (shown after what was expected)."""


@dataclass(frozen=True)
class Problem:
    """A setting gradtel cannot use: one warning line, and what the job does without it."""

    setting: str
    value: str | None  # None: the setting is missing (it must be set together with another one)
    expected: str
    consequence: str

    def __str__(self) -> str:
        given = " is not set" if self.value is None else f"={self.value!r}"
        return f"gradtel: {self.setting}{given}: expected {self.expected}; {self.consequence}."


def warn(problems: Iterable[Problem]) -> None:
    """Log each problem once per process: settings are read by every ``instrument()`` and by the export."""
    for problem in problems:
        line = str(problem)
        log_once(log, logging.WARNING, line, key=line)


# --- parsers: text -> value, or Invalid -------------------------------------------------------------------------
def parse_port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text.strip())
    except ValueError:
        raise Invalid() from None
    if not 0 <= value <= 65535:
        raise Invalid()
    return value


PORT_EXPECTED = "a TCP port 0-65535"


def _integer(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text.strip())
        if value < minimum:
            raise Invalid()
        return value

    return parse


def _number(valid: Callable[[float], bool]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text.strip())
        if not valid(value):
            raise Invalid()
        return value

    return parse


_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _flag(text: str) -> bool:
    try:
        return _BOOLEANS[text.strip().lower()]
    except KeyError:
        raise Invalid() from None


def _choice(options: Iterable[str]) -> Callable[[str], str]:
    options = tuple(options)

    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise Invalid()
        return value

    return parse


def _readable_file(text: str) -> str:
    """A file this process can read (a certificate, a key, a CA bundle, a password)."""
    try:
        with open(text, "rb"):
            pass
    except OSError as error:
        raise Invalid(error.strerror or type(error).__name__) from None
    if os.path.isdir(text):
        raise Invalid("it is a directory")
    return text


def _url(schemes: tuple[str, ...], bare_host_port: bool) -> Callable[[str], str]:
    """An endpoint URL with one of ``schemes`` and a host (gRPC also takes a bare ``host:port``)."""

    def parse(text: str) -> str:
        value = text.strip()
        parsed = urllib.parse.urlsplit(value)
        if parsed.scheme in schemes and parsed.hostname and not any(c.isspace() for c in value):
            parsed.port  # noqa: B018  (raises ValueError for a port that is not a number or out of range)
            return value
        if bare_host_port and re.fullmatch(r"[\w.\-]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", value):
            return value
        raise Invalid()

    return parse


def _headers(text: str) -> str:
    """``key=value`` pairs, comma-separated, values URL-encoded (the OTLP exporter specification)."""
    items = [item for item in text.split(",") if item.strip()]
    for n, item in enumerate(items, 1):
        key, sep, _ = item.partition("=")
        if not sep or not key.strip() or any(c.isspace() for c in key.strip()):
            raise Invalid(f"item {n} of {len(items)} is not key=value")
    return text


def _worker(text: str) -> Worker:
    return Worker.from_tf_config(text)


def _patterns(text: str) -> PatternSet:
    patterns = [p for p in text.split(",") if p.strip()]
    try:
        return PatternSet(patterns)
    except ValueError as error:
        raise Invalid(str(error)) from None


class _Reader:
    """Reads settings from one environment; a bad value is recorded as a :class:`Problem`, never raised."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[Problem] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return None if value is None or value.strip() == "" else value

    def get(
        self,
        name: str,
        default: T,
        parse: Callable[[str], T],
        expected: str,
        consequence: str | None = None,
        *,
        shown: Callable[[str], str | None] | None = None,
    ) -> T:
        """``default`` when unset or blank; else the parsed value, or ``default`` and a problem saying
        ``consequence`` (by default: the default is used). ``shown`` hides a value that may hold a secret."""
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            return parse(raw)
        except (ValueError, OverflowError) as error:
            reason = str(error) if isinstance(error, Invalid) and str(error) else ""
            self.fail(
                name,
                shown(raw) if shown is not None else raw,
                f"{expected} ({reason})" if reason else expected,
                consequence or f"using the default, {_show_default(default)}",
            )
            return default

    def fail(self, name: str, value: str | None, expected: str, consequence: str) -> None:
        self.problems.append(Problem(name, value, expected, consequence))

    def turned_off(self, since: int, consequence: str) -> bool:
        """Whether a problem found after the first ``since`` ones turns off the part ``consequence`` names."""
        return any(p.consequence == consequence for p in self.problems[since:])

    def together(self, first: str, second: str, consequence: str) -> bool:
        """Two settings that only work as a pair: False (and a problem naming the missing one) if one is set
        without the other."""
        a, b = self.raw(first), self.raw(second)
        if (a is None) == (b is None):
            return True
        missing, present = (first, second) if a is None else (second, first)
        self.fail(missing, None, f"it set together with {present}", consequence)
        return False


def _run_id(reader: _Reader, env: Mapping[str, str]) -> str:
    """``GRADTEL_RUN_ID``, else (or when it is malformed: a problem) the id derived from the job's own id."""
    explicit = reader.get(
        "GRADTEL_RUN_ID",
        "",
        lambda raw: identity.check_run_id(raw.strip()),
        identity.RUN_ID_EXPECTED,
        "the run id is derived from the job's own id instead",
    )
    return explicit or identity.derive_run_id(env, strict=False)


def _show_default(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Worker):
        return "a single process (no worker label)"
    return str(value)


def _hidden(raw: str) -> str:
    return f"<{len(raw)} characters, hidden>"


def _max_abs(reader: _Reader) -> bool:
    return reader.get("GRADTEL_MAX_ABS", False, _flag, "true or false")


def max_abs_default(env: Mapping[str, str] | None = None) -> bool:
    """``GRADTEL_MAX_ABS``: measure max |g| per variable too (off by default: see gradtel.stats for its cost).
    A bad value is the default, with its one warning line."""
    reader = _Reader(os.environ if env is None else env)
    value = _max_abs(reader)
    warn(reader.problems)
    return value


def _exporters(reader: _Reader) -> tuple[str, ...]:
    raw = reader.raw("OTEL_METRICS_EXPORTER") or "prometheus"
    # gradtel's Prometheus reader is also the SDK's ``gradtel_prometheus`` exporter (see gradtel/sdk_reader.py): in
    # gradtel's own export the two names are the same reader, as one variable serves both.
    kinds = [PROMETHEUS_PLUGIN.get(k.strip().lower(), k.strip().lower()) for k in raw.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in EXPORTERS]
    known = tuple(dict.fromkeys(k for k in kinds if k in EXPORTERS and k != "none"))
    if unknown:
        consequence = (
            f"{', '.join(unknown)} ignored, exporting through {', '.join(known)}"
            if known
            else "no metrics are exported; training and the report go on"
        )
        reader.fail("OTEL_METRICS_EXPORTER", raw, f"a comma-separated list of {', '.join(EXPORTERS)}", consequence)
    return known


def _most_specific(env: Mapping[str, str], specific: str, general: str) -> str:
    """The variable the SDK reads: the metrics-specific one when it is set."""
    return specific if (env.get(specific) or "").strip() else general


def _otlp(reader: _Reader, env: Mapping[str, str]) -> tuple[str, bool]:
    """The OTLP protocol, and whether every OTLP setting the SDK's exporter will read is usable: it reads them
    itself, so a bad one (a wrong endpoint, a missing certificate) would fail every push, or (grpc) raise."""
    names = {
        setting: _most_specific(env, "OTEL_EXPORTER_OTLP_METRICS_" + setting, "OTEL_EXPORTER_OTLP_" + setting)
        for setting in (
            "PROTOCOL",
            "ENDPOINT",
            "HEADERS",
            "TIMEOUT",
            "COMPRESSION",
            "CERTIFICATE",
            "CLIENT_CERTIFICATE",
            "CLIENT_KEY",
            "INSECURE",
        )
    }
    before = len(reader.problems)
    protocol = reader.get(
        names["PROTOCOL"], "http/protobuf", _choice(OTLP_PROTOCOLS), " or ".join(OTLP_PROTOCOLS), OTLP_OFF
    )
    grpc = protocol == "grpc"
    reader.get(
        names["ENDPOINT"],
        "",
        _url(("http", "https"), bare_host_port=grpc),
        "an http:// or https:// URL with a host" + (", or host:port" if grpc else ""),
        OTLP_OFF,
    )
    reader.get(
        names["HEADERS"], "", _headers, "comma-separated key=value pairs, values URL-encoded", OTLP_OFF, shown=_hidden
    )
    reader.get(names["TIMEOUT"], 0.0, _number(lambda v: 0 < v < float("inf")), "a number of seconds > 0", OTLP_OFF)
    reader.get(names["COMPRESSION"], "", _choice(("gzip", "deflate", "none")), "gzip, deflate or none", OTLP_OFF)
    for setting in ("CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"):
        reader.get(names[setting], "", _readable_file, "a readable file", OTLP_OFF)
    reader.get(names["INSECURE"], False, _flag, "true or false", OTLP_OFF)
    reader.get(
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
        "",
        _choice(("cumulative", "delta", "lowmemory")),
        "cumulative, delta or lowmemory",
        OTLP_OFF,
    )
    return protocol, not reader.turned_off(before, OTLP_OFF)


def _prometheus(reader: _Reader) -> dict[str, Any]:
    """The pull endpoint's settings, and ``ok``: False when one it needs is unusable (then it is off: serving
    on another port, or without the TLS or authentication asked for, is not what was configured)."""
    before = len(reader.problems)
    values: dict[str, Any] = {
        "prometheus_host": (reader.raw("OTEL_EXPORTER_PROMETHEUS_HOST") or DEFAULT_HOST).strip(),
        "prometheus_port": reader.get(
            "OTEL_EXPORTER_PROMETHEUS_PORT", DEFAULT_PORT, parse_port, PORT_EXPECTED, PROMETHEUS_OFF
        ),
        "prometheus_min_interval_s": reader.get(
            "GRADTEL_PROMETHEUS_MIN_INTERVAL",
            DEFAULT_MIN_INTERVAL_S,
            _number(lambda v: 0 <= v < float("inf")),
            "a number of seconds >= 0",
        ),
        "prometheus_cpu_share": reader.get(
            "GRADTEL_PROMETHEUS_CPU_SHARE",
            DEFAULT_CPU_SHARE,
            _number(lambda v: 0 < v <= 1),
            "a fraction of one core, > 0 and <= 1",
        ),
    }
    if reader.together("GRADTEL_TLS_CERT_FILE", "GRADTEL_TLS_KEY_FILE", PROMETHEUS_OFF):
        for name, key in (("GRADTEL_TLS_CERT_FILE", "tls_certfile"), ("GRADTEL_TLS_KEY_FILE", "tls_keyfile")):
            values[key] = reader.get(name, None, _readable_file, "a readable PEM file", PROMETHEUS_OFF)
    values["tls_client_cafile"] = reader.get(
        "GRADTEL_TLS_CLIENT_CA_FILE", None, _readable_file, "a readable PEM file of CA certificates", PROMETHEUS_OFF
    )
    if reader.raw("GRADTEL_TLS_CLIENT_CA_FILE") and not reader.raw("GRADTEL_TLS_CERT_FILE"):
        reader.fail(
            "GRADTEL_TLS_CERT_FILE",
            None,
            "it set (client certificates need TLS) with GRADTEL_TLS_CLIENT_CA_FILE",
            PROMETHEUS_OFF,
        )
    values.update(_basic_auth(reader))
    values["ok"] = not reader.turned_off(before, PROMETHEUS_OFF)
    return values


def _password_file(text: str) -> str:
    """The password in a file (a mounted secret), without its final newline."""
    try:
        with open(text, encoding="utf-8") as f:
            return f.read().rstrip("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise Invalid(getattr(error, "strerror", None) or type(error).__name__) from None


def _basic_auth(reader: _Reader) -> dict[str, str | None]:
    """Username and password of the endpoint: both, or neither."""
    username = reader.raw("GRADTEL_BASIC_AUTH_USERNAME")
    password = reader.env.get("GRADTEL_BASIC_AUTH_PASSWORD") or None
    if reader.raw("GRADTEL_BASIC_AUTH_PASSWORD_FILE"):
        password = reader.get(
            "GRADTEL_BASIC_AUTH_PASSWORD_FILE", None, _password_file, "a readable UTF-8 file", PROMETHEUS_OFF
        )
        if password is None:
            return {}
    if username is None and password is not None:
        reader.fail(
            "GRADTEL_BASIC_AUTH_USERNAME",
            None,
            "it set together with GRADTEL_BASIC_AUTH_PASSWORD (or _PASSWORD_FILE)",
            PROMETHEUS_OFF,
        )
    elif username is not None and password is None:
        reader.fail(
            "GRADTEL_BASIC_AUTH_PASSWORD",
            None,
            "it (or GRADTEL_BASIC_AUTH_PASSWORD_FILE) set together with GRADTEL_BASIC_AUTH_USERNAME",
            PROMETHEUS_OFF,
        )
    return {"basic_auth_username": username, "basic_auth_password": password}


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
        """ValueError (from :class:`Config`: a problem line) when ``raw`` is not TF_CONFIG's JSON."""
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            task = data.get("task") or {}
            task_type, index = str(task.get("type") or ""), int(task.get("index") or 0)
            cluster = data.get("cluster") or {}
        except (ValueError, TypeError, AttributeError):
            raise Invalid() from None
        # The chief is the "chief" task, or worker 0 when the cluster has none (TensorFlow's rule).
        chief = task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in cluster)
        return cls(task_type, index, chief or not task_type)


TF_CONFIG_EXPECTED = 'JSON like {"cluster": {...}, "task": {"type": "worker", "index": 0}}'


def _series_policy(reader: _Reader, worker: Worker) -> SeriesPolicy:
    mode = reader.get("GRADTEL_VARIABLE_SERIES", "auto", _choice(series.MODES), f"one of {', '.join(series.MODES)}")
    on = reader.get("GRADTEL_VARIABLE_SERIES_WORKERS", "chief", _choice(("chief", "all")), "chief or all")
    empty = PatternSet(None)
    return SeriesPolicy(
        mode=mode,
        budget=reader.get("GRADTEL_SERIES_BUDGET", series.DEFAULT_BUDGET, _integer(1), "an integer >= 1"),
        top_k=reader.get("GRADTEL_TOPK", series.DEFAULT_TOP_K, _integer(1), "an integer >= 1"),
        include=reader.get(
            "GRADTEL_INCLUDE", empty, _patterns, "comma-separated globs or re:REGEX", "every variable is included"
        ),
        exclude=reader.get(
            "GRADTEL_EXCLUDE", empty, _patterns, "comma-separated globs or re:REGEX", "no variable is excluded"
        ),
        exporting_worker=worker.is_chief or on == "all",
    )


@dataclass(frozen=True)
class Config:
    """Where and how gradtel exports; ``problems``: the settings that could not be used (see the module)."""

    exporters: tuple[str, ...] = ("prometheus",)
    prometheus_host: str = DEFAULT_HOST
    prometheus_port: int = DEFAULT_PORT
    prometheus_min_interval_s: float = DEFAULT_MIN_INTERVAL_S
    prometheus_cpu_share: float = DEFAULT_CPU_SHARE
    otlp_protocol: str = "http/protobuf"
    export_interval_ms: int = DEFAULT_EXPORT_INTERVAL_MS
    export_timeout_ms: int = DEFAULT_EXPORT_TIMEOUT_MS
    #: The job's id, the same for every restart of the job (gradtel.identity.derive_run_id).
    run_id: str = field(default_factory=lambda: identity.derive_run_id(strict=False))
    max_series: int = DEFAULT_MAX_SERIES
    max_abs: bool = False
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    tls_client_cafile: str | None = None
    basic_auth_username: str | None = None
    basic_auth_password: str | None = None
    worker: Worker = field(default_factory=Worker)
    series: SeriesPolicy = field(default_factory=SeriesPolicy)
    problems: tuple[Problem, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """The configuration of ``env`` (default: this process's). Never raises: see ``problems``."""
        env = os.environ if env is None else env
        reader = _Reader(env)
        exporters = _exporters(reader)
        prometheus: dict[str, Any] = {}
        if "prometheus" in exporters:
            prometheus = _prometheus(reader)
            if not prometheus.pop("ok"):
                exporters = tuple(k for k in exporters if k != "prometheus")
        protocol = "http/protobuf"
        if "otlp" in exporters:
            protocol, usable = _otlp(reader, env)
            if not usable:
                exporters = tuple(k for k in exporters if k != "otlp")
        periodic: dict[str, Any] = {}
        if {"otlp", "console"} & set(exporters):
            periodic = {
                "export_interval_ms": reader.get(
                    "OTEL_METRIC_EXPORT_INTERVAL",
                    DEFAULT_EXPORT_INTERVAL_MS,
                    _integer(1),
                    "milliseconds, an integer >= 1",
                ),
                "export_timeout_ms": reader.get(
                    "OTEL_METRIC_EXPORT_TIMEOUT",
                    DEFAULT_EXPORT_TIMEOUT_MS,
                    _integer(1),
                    "milliseconds, an integer >= 1",
                ),
            }
        worker = reader.get(
            "TF_CONFIG",
            Worker(),
            _worker,
            TF_CONFIG_EXPECTED,
            "this process is taken as a single worker (no worker label)",
            shown=lambda raw: raw[:200],
        )
        policy = _series_policy(reader, worker)
        max_series = reader.get("GRADTEL_MAX_SERIES", DEFAULT_MAX_SERIES, _integer(1), "an integer >= 1")
        # instrument() reads it (max_abs_default); checked here too, so that a process whose optimizers all
        # set max_abs themselves still hears of a bad value.
        max_abs = _max_abs(reader)
        return cls(
            exporters=exporters,
            otlp_protocol=protocol,
            run_id=_run_id(reader, env),
            max_series=max_series,
            max_abs=max_abs,
            worker=worker,
            series=policy,
            problems=tuple(reader.problems),
            **prometheus,
            **periodic,
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
            attributes.update(
                {"gradtel.task.type": self.worker.task_type, "gradtel.task.index": self.worker.task_index}
            )
        resource = Resource.create(attributes)
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "gradtel"}))
        return resource


def load(env: Mapping[str, str] | None = None) -> Config:
    """:meth:`Config.from_env`, its problems logged (once per process each)."""
    config = Config.from_env(env)
    warn(config.problems)
    return config
