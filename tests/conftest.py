"""Test-wide settings: quiet TensorFlow, and no metrics endpoint unless a test starts one itself."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OTEL_METRICS_EXPORTER", "none")
