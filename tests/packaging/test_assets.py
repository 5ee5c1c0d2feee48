"""``gradtel assets DIR``: the written files are the repository's, the runbook links move where asked, and a
user's edited copy is never overwritten silently."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy import rule_tests
from gradtel import assets, cli
from tests.packaging.conftest import ROOT


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _repository(relative: str) -> bytes:
    return (ROOT / relative).read_bytes()


def test_the_written_files_equal_the_repositorys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["assets", str(tmp_path)]) == 0
    written = _tree(tmp_path)
    assert written == {relative: _repository(relative) for relative in written}
    expected = {
        "dashboards/gradtel-overview.json",
        "dashboards/gradtel-variables.json",
        "deploy/prometheus/gradtel-rules.yml",
        "deploy/prometheus/prometheus.yml",
        "deploy/alertmanager/alertmanager.yml",
        "deploy/kubernetes/kustomization.yaml",
        "deploy/kubernetes/training-job.yaml",
        "deploy/kubernetes/prometheusrule.yaml",
        "deploy/kubernetes/podmonitor.yaml",
        "deploy/kubernetes/dashboards-configmap.yaml",
        "deploy/otel-collector/config.yaml",
        "deploy/docker-compose.yml",
        "deploy/grafana/provisioning/dashboards/gradtel.yml",
        "deploy/grafana/provisioning/datasources/prometheus.yml",
        "docs/runbooks.md",
        *(f"deploy/prometheus/tests/{name}.yml" for name in rule_tests.SCENARIOS),
    }
    assert set(written) == expected
    assert capsys.readouterr().out.strip() == f"gradtel assets: wrote {len(expected)} files under {tmp_path}"


def test_the_compose_mounts_resolve_in_the_written_directory(tmp_path: Path) -> None:
    """The compose file's relative mounts (../dashboards, ./prometheus) find their files in the written layout."""
    assets.write(tmp_path)
    compose = yaml.safe_load((tmp_path / "deploy" / "docker-compose.yml").read_text())
    mounts = [v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", []) if v.startswith(".")]
    assert mounts and all((tmp_path / "deploy" / m).resolve().exists() for m in mounts), mounts


def _runbook_urls(path: Path) -> list[str]:
    text = yaml.safe_load(path.read_text())
    groups = text["spec"]["groups"] if "spec" in text else text["groups"]
    return [rule["annotations"]["runbook_url"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_runbook_url_moves_every_alerts_link_and_nothing_else(tmp_path: Path) -> None:
    base = "https://wiki.example.org/ml/gradtel-runbooks"
    assert cli.main(["assets", str(tmp_path), "--runbook-url", base]) == 0
    for rules in assets.RULE_FILES:
        urls = _runbook_urls(tmp_path / rules)
        original = _runbook_urls(ROOT / rules)
        assert len(urls) == len(original) >= 8
        assert urls == [u.replace(assets.RUNBOOK_BASE_URL, base) for u in original]
        assert all(u.startswith(base + "#gradtel") for u in urls)
        changed = [
            (a, b)
            for a, b in zip(
                (ROOT / rules).read_text().splitlines(), (tmp_path / rules).read_text().splitlines(), strict=True
            )
            if a != b
        ]
        assert len(changed) == len(urls) and all("runbook_url:" in b for _, b in changed)
    rule_tests = {r for r in _tree(tmp_path) if r.startswith(assets.RULE_TESTS_DIR)}
    assert rule_tests, "the promtool tests of the rules are shipped"
    for relative in rule_tests:  # they expect the rules' annotations: moved the same way
        assert (tmp_path / relative).read_text() == _repository(relative).decode().replace(
            f"runbook_url: {assets.RUNBOOK_BASE_URL}#", f"runbook_url: {base}#"
        )
    untouched = set(_tree(tmp_path)) - set(assets.RULE_FILES) - rule_tests
    assert all((tmp_path / r).read_bytes() == _repository(r) for r in untouched)


@pytest.mark.slow
def test_the_rewritten_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found (scripts/test.sh installs the Debian prometheus package)"
    assets.write(tmp_path, runbook_url="https://runbooks.example.org/gradtel")
    done = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "deploy/prometheus/gradtel-rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tests = sorted(str(p) for p in (tmp_path / assets.RULE_TESTS_DIR).glob("*.yml"))
    done = subprocess.run([promtool, "test", "rules", *tests], capture_output=True, text=True, timeout=120)
    assert tests and done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("url", ["wiki.example.org/runbooks", "https://x.org/runbooks#here", "https://x.org/a b"])
def test_a_bad_runbook_url_is_one_line(tmp_path: Path, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["assets", str(tmp_path / "out"), "--runbook-url", url]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("gradtel assets: --runbook-url: expected an http(s) URL") and url in err
    assert not (tmp_path / "out").exists()


def test_an_edited_copy_is_kept_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["assets", str(tmp_path)]) == 0
    assert cli.main(["assets", str(tmp_path)]) == 0  # the same content again: nothing to protect
    edited = tmp_path / "deploy" / "alertmanager" / "alertmanager.yml"
    edited.write_text("# my receivers\n")
    (tmp_path / "docs" / "runbooks.md").unlink()
    capsys.readouterr()
    assert cli.main(["assets", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "1 file(s)" in err and str(edited) in err and "--force" in err
    assert edited.read_text() == "# my receivers\n"
    assert not (tmp_path / "docs" / "runbooks.md").exists()  # all or nothing
    assert cli.main(["assets", str(tmp_path), "--force"]) == 0
    assert edited.read_bytes() == _repository("deploy/alertmanager/alertmanager.yml")
    assert (tmp_path / "docs" / "runbooks.md").read_bytes() == _repository("docs/runbooks.md")


def test_version_flag_prints_the_one_version(capsys: pytest.CaptureFixture[str]) -> None:
    import gradtel

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"gradtel {gradtel.__version__}"
