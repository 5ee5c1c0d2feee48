"""The committed generated files equal a fresh generation (run ``python -m deploy.generate`` to fix)."""

from __future__ import annotations

import pytest

pytest.importorskip("grafana_foundation_sdk", reason="the dashboards are built with grafana-foundation-sdk")

from deploy import generate


def test_generated_files_are_up_to_date() -> None:
    files = generate.outputs()
    stale = [str(path.relative_to(generate.ROOT)) for path in generate.stale(files)]
    assert not stale, f"stale generated files, run `python -m deploy.generate`: {stale}"


def test_generation_is_deterministic() -> None:
    assert generate.outputs() == generate.outputs()


def test_check_mode_reports_success_on_fresh_files() -> None:
    assert generate.main(["--check"]) == 0
