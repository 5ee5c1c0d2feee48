"""Fixtures for the diagnosis tests: one installed Diagnoser per test, always uninstalled."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest
import tensorflow as tf

from gradtel.diagnosis import Diagnoser

with contextlib.suppress(RuntimeError):  # already initialised by another conftest
    tf.config.threading.set_inter_op_parallelism_threads(2)


@pytest.fixture
def diagnoser() -> Iterator[Diagnoser]:
    instance = Diagnoser()
    instance.install()
    try:
        yield instance
    finally:
        instance.uninstall()


@pytest.fixture
def instrumented_cleanup() -> Iterator[None]:
    """For tests that instrument optimizers: afterwards every optimizer is uninstrumented and the process's
    diagnoser uninstalled (its GradientTape patches removed), so the next test starts from a clean process."""
    from gradtel import instrumenting

    try:
        yield
    finally:
        instrumenting.uninstrument_all()  # the diagnoser's patches too
