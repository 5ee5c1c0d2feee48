"""Building gradtel's wheel for the packaging tests: with pip and hatchling, offline, from a given source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def build_wheel(source: Path, out: Path) -> Path:
    """The wheel pip builds from ``source`` into ``out`` (no build isolation: hatchling, a dev dependency, must be
    importable, so the build needs no network)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"the wheel did not build from {source}:\n{done.stdout}\n{done.stderr}"
    wheels = list(out.glob("gradtel-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def wheel_files(wheel: Path) -> dict[str, bytes]:
    """Every file in ``wheel`` by its path inside it."""
    with zipfile.ZipFile(wheel) as archive:
        return {name: archive.read(name) for name in archive.namelist() if not name.endswith("/")}


@pytest.fixture(scope="session")
def repo_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from the repository (what CI's fresh clone holds)."""
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))
