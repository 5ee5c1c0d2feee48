"""gradtel's Grafana dashboards as code.

The dashboards are built with grafana-foundation-sdk from the metric table in :mod:`gradtel.metrics`, so a
metric rename changes the dashboards too. ``python -m deploy.generate`` writes them to ``dashboards/*.json``
(the files Grafana provisioning and the Kubernetes ConfigMap ship); a test fails when those files are stale.
"""
