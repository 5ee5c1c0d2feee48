"""The dependency matrix: the test suite on the declared minimum versions and on the latest releases.

``nox -s minimum`` installs gradtel with every floor of pyproject.toml pinned exactly (``name>=X`` becomes
``name==X``: the floors are what this session proves), ``nox -s latest`` with the newest releases, and both run
the same tests: the fast part of the suite (``-m "not slow"``) plus ``gradtel demo`` scraped for real. The
README's test command (scripts/test.sh) runs ``minimum`` after the full suite on the latest versions.
docs/compatibility.md records which floors were tried and why each is where it is.
"""

from __future__ import annotations

import re
from pathlib import Path

import nox
import tomllib

ROOT = Path(__file__).resolve().parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

#: The oldest Python gradtel declares; scripts/test.sh forces a 3.10 that runs, else the machine's python3.
MINIMUM_PYTHON = PYPROJECT["project"]["requires-python"].removeprefix(">=")
#: Extras whose floors the minimum session pins, and the test tools whose floors follow the OpenTelemetry,
#: TensorFlow and Keras ones (an exporter built for a newer SDK, a tf_keras for a newer TF, would not install).
PINNED_EXTRAS = ("tensorflow", "stack")
PINNED_TOOLS = ("tf-keras", "opentelemetry-exporter-prometheus", "opentelemetry-instrumentation", "prometheus-client")
#: Unpinned test tools.
TOOLS = ("pytest",)

#: Tests that need more than the minimum versions offer, and why (each runs in ``latest`` and the full suite):
DESELECTED = (
    # compare gradtel's producer with the SDK's own cardinality limit, a View keyword of opentelemetry-sdk 1.45+
    "tests/core/test_producer.py::test_the_producer_exports_what_the_sdk_instruments_export",
    # compare with opentelemetry-exporter-prometheus's registry= keyword (newer than its 0.49b0 floor)
    "tests/core/test_exposition.py::test_series_equal_the_official_exporters_series_by_series",
    "tests/core/test_exposition.py::test_other_kinds_are_left_out_with_one_warning",
    # OTLP: opentelemetry-proto 1.28 needs protobuf 5, TensorFlow 2.16 allows protobuf < 5 (see otlp in pyproject)
    "tests/faults/test_process_ends.py::test_the_shutdown_flush_reads_the_final_state_even_right_after_a_push",
)
#: Also run, though marked slow: the demo served and scraped for real by an installed gradtel.
DEMO_TEST = "tests/core/test_cli.py::test_demo_serves_the_disconnected_head_while_training_and_prints_the_table"


def floors(requirements: list[str], only: tuple[str, ...] | None = None) -> list[str]:
    """``name==X`` for every ``name>=X`` in ``requirements`` (of the names in ``only``, when given)."""
    pins = []
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([^,;\s]+)", requirement.strip())
        if match and (only is None or match.group(1) in only):
            pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


def minimum_pins() -> list[str]:
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    pins = floors(project["dependencies"])
    for extra in PINNED_EXTRAS:
        pins += floors(extras[extra])
    return pins + floors(extras["dev"], PINNED_TOOLS)


def _pytest(session: nox.Session, deselected: tuple[str, ...] = ()) -> None:
    deselect = [f"--deselect={node}" for node in deselected]
    env = {"TF_CPP_MIN_LOG_LEVEL": "2"}
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "not slow",
        "--ignore=tests/packaging",
        *deselect,
        *session.posargs,
        env=env,
    )
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", DEMO_TEST, env=env)


@nox.session(python=MINIMUM_PYTHON)
def minimum(session: nox.Session) -> None:
    """The suite's fast part on every declared floor, pinned exactly."""
    pins = minimum_pins()
    constraints = Path(session.create_tmp()) / "minimum.txt"
    constraints.write_text("\n".join(pins) + "\n")
    # The constraints make pip prove that the floors install together with gradtel's own requirements.
    session.install("-c", str(constraints), ".[tensorflow,stack]", *PINNED_TOOLS, *TOOLS)
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    _pytest(session, DESELECTED)


@nox.session
def latest(session: nox.Session) -> None:
    """The same tests on the newest releases of everything."""
    session.install("--upgrade", ".[tensorflow,stack,otlp]", *PINNED_TOOLS, *TOOLS)
    _pytest(session)
