"""The deployment files gradtel ships, and ``gradtel assets DIR``, which writes them where a user wants them.

The docs send users to dashboards, alert rules and manifests (``kubectl apply -k deploy/kubernetes``, import
``dashboards/*.json``). A pip-installed gradtel has no checkout, so the wheel carries those files under
``gradtel/_assets/`` with the repository's layout (pyproject.toml force-includes every path of :data:`SHIPPED`;
a test checks that the two lists agree), and this module writes them out with the same layout, so that the
relative paths inside them (the compose file's ``../dashboards/...`` mounts) and the commands in the docs work
in the written directory as they do in a checkout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: Where the alert rules' ``runbook_url`` annotations point by default: docs/runbooks.md, one heading per alert
#: (GitHub anchors are the lower-cased alert name). deploy/alerts.py builds the rules from it.
RUNBOOK_BASE_URL = "https://github.com/gradtel/gradtel/blob/main/docs/runbooks.md"

#: Every shipped path (a file, or a directory taken whole), relative to the repository root and to the
#: directory ``gradtel assets`` writes. Generator sources (deploy/*.py, dashboards/*.py) and the trainer image's
#: Dockerfile, which builds from a checkout, are not shipped.
SHIPPED: tuple[str, ...] = (
    "dashboards/gradtel-overview.json",
    "dashboards/gradtel-variables.json",
    "deploy/prometheus",
    "deploy/alertmanager",
    "deploy/kubernetes",
    "deploy/otel-collector",
    "deploy/grafana",
    "deploy/docker-compose.yml",
    "docs/runbooks.md",
)

#: The files whose ``runbook_url`` annotations ``--runbook-url`` rewrites.
RULE_FILES: tuple[str, ...] = ("deploy/prometheus/gradtel-rules.yml", "deploy/kubernetes/prometheusrule.yaml")
#: The rules' promtool unit tests: they expect the rules' annotations, so ``--runbook-url`` rewrites them too.
RULE_TESTS_DIR = "deploy/prometheus/tests/"

_PACKAGED = Path(__file__).resolve().parent / "_assets"


class AssetsError(Exception):
    """The files cannot be written as asked (one line, shown to the user without a traceback)."""


def root() -> Path:
    """Where the shipped files are read from: the wheel's ``gradtel/_assets``, else the checkout (editable
    install or source tree), whose layout is the same."""
    return _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent


def files(base: Path | None = None) -> dict[str, Path]:
    """Every shipped file: its relative path (POSIX, sorted) and where it is read from."""
    base = base or root()
    found: dict[str, Path] = {}
    for shipped in SHIPPED:
        path = base / shipped
        if path.is_file():
            found[shipped] = path
        elif path.is_dir():
            found.update(
                {
                    p.relative_to(base).as_posix(): p
                    for p in path.rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts
                }
            )
        else:
            raise AssetsError(f"gradtel's shipped file {shipped} is missing from {base} (a broken installation)")
    return dict(sorted(found.items()))


def with_runbook_url(text: str, runbook_url: str) -> str:
    """``text`` (a rule file) with every alert's runbook link moved from the default page to ``runbook_url``."""
    return text.replace(f"runbook_url: {RUNBOOK_BASE_URL}#", f"runbook_url: {runbook_url}#")


def _checked_url(url: str) -> str:
    if not url.startswith(("http://", "https://")) or "#" in url or any(ch.isspace() for ch in url):
        raise AssetsError(
            f"--runbook-url: expected an http(s) URL of the page holding the runbooks, without "
            f"'#' or spaces (each alert links to URL#<alert name in lower case>), got {url!r}"
        )
    return url


def write(destination: Path, *, runbook_url: str | None = None, force: bool = False) -> list[Path]:
    """Write every shipped file under ``destination``; returns the paths written.

    An existing file with other content is an error unless ``force``: a user's edited copy is never overwritten
    silently. Nothing is written when any such conflict exists.
    """
    url = _checked_url(runbook_url) if runbook_url is not None else None
    planned: dict[Path, bytes] = {}
    for relative, source in files().items():
        data = source.read_bytes()
        if url is not None and (relative in RULE_FILES or relative.startswith(RULE_TESTS_DIR)):
            data = with_runbook_url(data.decode(), url).encode()
        planned[destination / relative] = data
    conflicts = [p for p, data in planned.items() if p.exists() and (not p.is_file() or p.read_bytes() != data)]
    if conflicts and not force:
        raise AssetsError(
            f"{len(conflicts)} file(s) under {destination} differ from gradtel's (first: "
            f"{conflicts[0]}); pass --force to overwrite them"
        )
    for path, data in planned.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return list(planned)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``assets`` subcommand of ``gradtel``."""
    parser = commands.add_parser(
        "assets",
        help="write the dashboards, alert rules, Alertmanager, Kubernetes, Collector, compose and "
        "Grafana provisioning files (and the runbooks) into DIR",
        description="Write gradtel's deployment files into DIR with the repository's layout (dashboards/, "
        "deploy/..., docs/runbooks.md), so that the commands in docs/deploy.md work from DIR.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR")
    parser.add_argument(
        "--runbook-url",
        metavar="URL",
        default=None,
        help=f"the page holding the runbooks (your copy of docs/runbooks.md); each alert's "
        f"runbook_url becomes URL#<alert name in lower case> (default {RUNBOOK_BASE_URL})",
    )
    parser.add_argument("--force", action="store_true", help="overwrite files that differ from gradtel's")


def main(args: argparse.Namespace) -> int:
    """Run ``gradtel assets`` with parsed ``args``: exit 0, or 2 with one line on stderr."""
    try:
        written = write(args.directory, runbook_url=args.runbook_url, force=args.force)
    except (AssetsError, OSError) as error:
        print(f"gradtel assets: {error}", file=sys.stderr)
        return 2
    print(f"gradtel assets: wrote {len(written)} files under {args.directory}")
    return 0
