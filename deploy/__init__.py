"""gradtel's deployment files: Prometheus rules, Alertmanager, Grafana, Compose, Kubernetes, OTel Collector.

``python -m deploy.generate`` regenerates every generated file (see docs/deploy.md); the rest are written by
hand and checked against the same sources by tests/observability.
"""
