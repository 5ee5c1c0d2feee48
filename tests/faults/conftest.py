"""Fixtures of the fault-injection suite: child processes and in-process exporters that are always cleaned up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.helpers import OtlpReceiver, Processes, free_port


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Start child processes through this; whatever is still running at teardown is killed with its group."""
    group = Processes(tmp_path)
    yield group
    group.close()


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    """An OTLP/HTTP receiver on a reserved free port, NOT started: the test decides when it comes up."""
    receiver = OtlpReceiver(free_port())
    yield receiver
    receiver.stop()


@pytest.fixture
def exporter() -> Iterator[Callable[..., object]]:
    """Start gradtel's export in this process from a Config (``start(**config_fields)``); shut down after.

    Each test gets a fresh exporter on a free port (the export is one per process, so any earlier one is shut
    down first) and an instrumented optimizer is uninstrumented by the test itself.
    """
    from gradtel import export
    from gradtel.config import Config

    export.shutdown()

    def start(**fields: object) -> object:
        fields.setdefault("prometheus_port", free_port())
        started = export.ensure_started(Config(**fields))
        assert started is not None and started.endpoint is not None, "the in-process endpoint did not start"
        return started

    yield start
    export.shutdown()
