"""The wheel: what the docs send users to is in it, its metadata is complete, and it installs and runs bare."""

from __future__ import annotations

import email
import re
import subprocess
import venv
from pathlib import Path

import pytest

import gradtel
from gradtel import assets
from tests.packaging.conftest import ROOT, wheel_files

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

#: Paths the docs mention that are not shipped, and why: generator sources, and the image build (a checkout).
NOT_SHIPPED = re.compile(r"^(deploy|dashboards)/[\w-]+\.py$|^deploy/trainer/Dockerfile$|^deploy/trainer/?$")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _shipped_files() -> dict[str, bytes]:
    return {relative: path.read_bytes() for relative, path in assets.files(ROOT).items()}


def _metadata(files: dict[str, bytes]) -> email.message.Message:
    name = next(n for n in files if n.endswith(".dist-info/METADATA"))
    return email.message_from_bytes(files[name])


def test_force_include_is_exactly_the_shipped_list() -> None:
    force = _pyproject()["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert force == {path: f"gradtel/_assets/{path}" for path in assets.SHIPPED}


def test_every_shipped_file_is_in_the_wheel_byte_for_byte(repo_wheel: Path) -> None:
    files = wheel_files(repo_wheel)
    shipped = _shipped_files()
    assert len(shipped) >= 15  # dashboards, rules, Alertmanager, Kubernetes, Collector, compose, Grafana, runbooks
    for relative, data in shipped.items():
        assert files.get(f"gradtel/_assets/{relative}") == data, relative
    packaged = {n.removeprefix("gradtel/_assets/") for n in files if n.startswith("gradtel/_assets/")}
    assert packaged == set(shipped)


def _doc_paths() -> set[str]:
    """Every repository path the README and docs/*.md name in backquotes (a file, a directory or a glob)."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = set()
    for text in (p.read_text() for p in texts):
        for candidate in re.findall(r"`((?:deploy|dashboards|docs)/[\w./*-]*)`", text):
            found.add(candidate)
        for candidate in re.findall(r"\]\((?:docs/)?([\w-]+\.md)\)", text):  # [runbooks.md](docs/runbooks.md)
            found.add(f"docs/{candidate}")
    return found


def test_every_file_the_docs_send_users_to_is_in_the_wheel(repo_wheel: Path) -> None:
    files = {n.removeprefix("gradtel/_assets/") for n in wheel_files(repo_wheel) if n.startswith("gradtel/_assets/")}
    mentioned = _doc_paths()
    assert {
        "deploy/kubernetes",
        "deploy/docker-compose.yml",
        "dashboards/gradtel-overview.json",
        "deploy/prometheus/gradtel-rules.yml",
    } <= {m.rstrip("/") for m in mentioned}, mentioned
    missing = []
    for mention in sorted(mentioned):
        targets = sorted(ROOT.glob(mention.rstrip("/"))) or [ROOT / mention.rstrip("/")]
        for target in targets:
            relative = target.relative_to(ROOT).as_posix()
            if NOT_SHIPPED.search(relative) or (relative.startswith("docs/") and relative != "docs/runbooks.md"):
                continue  # documentation is read on the project's site; the runbooks are what alerts link to
            assert target.exists(), f"the docs name {mention}, which does not exist"
            wanted = (
                [relative]
                if target.is_file()
                else [
                    p.relative_to(ROOT).as_posix()
                    for p in target.rglob("*")
                    if p.is_file() and not NOT_SHIPPED.search(p.relative_to(ROOT).as_posix())
                ]
            )
            missing += [w for w in wanted if w not in files]
    assert not missing, f"the docs send users to files the wheel lacks: {missing}"


def test_metadata_declares_what_the_code_imports_and_one_version(repo_wheel: Path) -> None:
    files = wheel_files(repo_wheel)
    meta = _metadata(files)
    assert meta["Version"] == gradtel.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    requires = meta.get_all("Requires-Dist")
    unconditional = {re.split(r"[<>=!~; ]", r)[0] for r in requires if "extra ==" not in r}
    assert unconditional == {"numpy", "opentelemetry-api", "opentelemetry-sdk"}
    assert any(c.startswith("Programming Language :: Python :: 3.10") for c in meta.get_all("Classifier"))
    assert "Typing :: Typed" in meta.get_all("Classifier")
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert urls["Source"].startswith("https://")
    license_files = [n for n in files if n.endswith(".dist-info/licenses/LICENSE")]
    assert len(license_files) == 1 and files[license_files[0]] == (ROOT / "LICENSE").read_bytes()
    assert b"Apache License" in files[license_files[0]] and b"Version 2.0, January 2004" in files[license_files[0]]
    assert files["gradtel/py.typed"] == b""
    assert "version" not in _pyproject()["project"]  # the one source is gradtel/__init__.py


@pytest.mark.slow
def test_the_wheel_installs_bare_and_runs(repo_wheel: Path, tmp_path: Path) -> None:
    """A fresh virtualenv, the wheel without extras (its dependencies from the package index or pip's cache):
    ``--help``, ``--version`` and ``gradtel assets`` work from the installed files, without TensorFlow."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", repo_wheel],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    gradtel_bin = env_dir / "bin" / "gradtel"
    outside = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}  # no PYTHONPATH: the wheel only
    help_ = subprocess.run(
        [gradtel_bin, "--help"], capture_output=True, text=True, timeout=120, env=outside, cwd=tmp_path
    )
    assert help_.returncode == 0, help_.stderr
    assert "assets" in help_.stdout and "demo" in help_.stdout
    version = subprocess.run(
        [gradtel_bin, "--version"], capture_output=True, text=True, timeout=120, env=outside, cwd=tmp_path
    )
    assert (version.returncode, version.stdout.strip()) == (0, f"gradtel {gradtel.__version__}")
    no_tf = subprocess.run(
        [python, "-c", "import gradtel, sys; print('tensorflow' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
        env=outside,
        cwd=tmp_path,
    )
    assert no_tf.stdout.strip() == "False", no_tf.stderr
    demo = subprocess.run(
        [gradtel_bin, "demo", "--steps", "1"], capture_output=True, text=True, timeout=120, env=outside, cwd=tmp_path
    )
    assert (demo.returncode, demo.stderr) == (
        2,
        "gradtel demo needs tensorflow and keras: pip install 'gradtel[tensorflow]'\n",
    )
    written = subprocess.run(
        [gradtel_bin, "assets", tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=120,
        env=outside,
        cwd=tmp_path,
    )
    assert written.returncode == 0, written.stderr
    out = {
        p.relative_to(tmp_path / "out").as_posix(): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()
    }
    assert out == _shipped_files()
