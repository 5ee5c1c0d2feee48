"""deploy/trainer/Dockerfile builds: the package builds from exactly the files it copies (Docker cannot run in CI,
so its COPY instructions are carried out here as Docker would), and its base image is pinned."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

from tests.packaging.conftest import ROOT, build_wheel, wheel_files

DOCKERFILE = ROOT / "deploy" / "trainer" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and backslash continuations joined."""
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in logical]


def copy_as_docker_does(dockerfile: str, context: Path, image_root: Path) -> None:
    """Carry out the COPY instructions of ``dockerfile`` from ``context`` into ``image_root`` (the image's /):
    a directory source copies its contents, a file source lands in a destination ending in '/' under its own
    name, relative destinations are taken from WORKDIR."""
    workdir = "/"
    for instruction, arguments in instructions(dockerfile):
        if instruction == "WORKDIR":
            workdir = str(Path(workdir, arguments))
        if instruction != "COPY":
            continue
        words = shlex.split(arguments)
        assert not any(w.startswith("--") for w in words), f"COPY flags are not modelled: {arguments}"
        *sources, destination = words
        target = Path(workdir, destination)
        for source in sources:
            assert not any(ch in source for ch in "*?["), f"wildcards are not modelled: {source}"
            origin = context / source
            assert origin.exists(), f"the Dockerfile copies {source}, which the build context lacks"
            into = image_root / target.relative_to("/")
            if origin.is_dir():
                shutil.copytree(origin, into, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                if destination.endswith("/") or len(sources) > 1:
                    into = into / origin.name
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, into)


def _build_dir() -> str:
    """The WORKDIR of the pip install RUN: where the copied sources are built."""
    workdir = "/"
    for instruction, arguments in instructions(DOCKERFILE.read_text()):
        if instruction == "WORKDIR":
            workdir = str(Path(workdir, arguments))
        if instruction == "RUN" and "pip install" in arguments:
            return workdir
    raise AssertionError("the Dockerfile installs nothing with pip")


def test_the_package_builds_from_exactly_the_files_the_dockerfile_copies(repo_wheel: Path, tmp_path: Path) -> None:
    image = tmp_path / "image"
    copy_as_docker_does(DOCKERFILE.read_text(), ROOT, image)
    built = build_wheel(image / _build_dir().lstrip("/"), tmp_path / "dist")
    assert wheel_files(built) == wheel_files(repo_wheel)  # the same files, byte for byte


def test_a_missing_copy_breaks_the_build_check(tmp_path: Path) -> None:
    """The check can fail: without the deploy/ files the build's force-include stops it, as in the original bug."""
    trimmed = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if "deploy/kubernetes" not in line)
    image = tmp_path / "image"
    copy_as_docker_does(trimmed, ROOT, image)
    try:
        build_wheel(image / _build_dir().lstrip("/"), tmp_path / "dist")
    except AssertionError as error:
        assert "deploy/kubernetes" in str(error)
    else:
        raise AssertionError("the wheel built without deploy/kubernetes")


def test_the_base_image_is_pinned_by_exact_tag_and_digest() -> None:
    bases = [arguments for instruction, arguments in instructions(DOCKERFILE.read_text()) if instruction == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*@sha256:[0-9a-f]{64}", base), base


def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    users = [arguments for instruction, arguments in instructions(DOCKERFILE.read_text()) if instruction == "USER"]
    assert users, "the image runs as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0  # runAsNonRoot can only verify a numeric user
