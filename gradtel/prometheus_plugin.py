"""gradtel's Prometheus reader and endpoint as an exporter the OpenTelemetry SDK can configure.

``opentelemetry-instrument`` (with a distro, such as opentelemetry-distro) builds the application's MeterProvider
from ``OTEL_METRICS_EXPORTER``: each name is looked up in the ``opentelemetry_metrics_exporter`` entry point
group, and the class found is called without arguments; a ``MetricReader`` subclass is used as the reader, an
exporter is wrapped in a periodic (push) reader (opentelemetry-sdk ``_configuration._init_metrics``). A pull
endpoint is a reader, as the official ``prometheus`` one is. So ``OTEL_METRICS_EXPORTER=gradtel_prometheus`` gives
the application's provider gradtel's reader: every metric of the process (sums and gauges: histograms are logged
once and left out) served on ``OTEL_EXPORTER_PROMETHEUS_HOST``/``_PORT`` with gradtel's TLS, basic auth and CPU
share. gradtel then registers its instruments on that provider and starts nothing of its own.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from gradtel import config as settings
from gradtel.endpoint import Endpoint, EndpointError, security
from gradtel.exposition import PrometheusReader

log = logging.getLogger("gradtel")

#: The name to put in OTEL_METRICS_EXPORTER (the entry point's name in pyproject.toml).
NAME = "gradtel_prometheus"


class GradtelPrometheusReader(PrometheusReader):
    """A pull reader serving its collections on gradtel's endpoint, configured from the environment.

    Never raises: the SDK builds every reader of the application in one go, so a port already in use (or a bad
    setting) is one warning line and a reader without an endpoint, never the application's telemetry lost.
    """

    def __init__(self, **reader_options: Any) -> None:
        # Only the Prometheus settings concern this reader: the SDK reads the rest of OTEL_METRICS_EXPORTER itself.
        config = settings.load({**os.environ, "OTEL_METRICS_EXPORTER": "prometheus"})
        super().__init__(config.prometheus_min_interval_s, config.prometheus_cpu_share, **reader_options)
        self.endpoint: Endpoint | None = None
        if "prometheus" not in config.exporters:
            return  # a Prometheus setting is unusable: settings.load() said which, and that the endpoint is off
        try:
            self.endpoint = Endpoint(self.exposition, config.prometheus_host, config.prometheus_port, security(config))
        except EndpointError as error:
            log.warning("gradtel: %s; the application goes on without this endpoint.", error)
            return
        log.info(
            "gradtel: serving metrics on %s://%s:%d/metrics",
            self.endpoint.scheme,
            config.prometheus_host,
            self.endpoint.port,
        )

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Close the endpoint (the SDK shuts its readers down with the MeterProvider)."""
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
