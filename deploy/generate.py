"""Regenerate every generated deployment file: ``python -m deploy.generate [--check]``.

One entry point, so the dashboards, the Prometheus rule file and the Kubernetes manifests always come from
the same build of the same sources (gradtel/metrics.py, dashboards/*.py, deploy/alerts.py,
deploy/rule_tests.py, deploy/kubernetes.py). ``--check`` writes nothing and exits 1 when a committed file is
stale (the test suite runs the same comparison).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploy import alerts, kubernetes, rule_tests, yamlio

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS_DIR = ROOT / "dashboards"
RULES_FILE = ROOT / "deploy" / "prometheus" / "gradtel-rules.yml"
#: promtool unit tests of the rules, one file per scenario (``promtool test rules deploy/prometheus/tests/*.yml``).
RULE_TESTS_DIR = ROOT / "deploy" / "prometheus" / "tests"
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"


def dashboard_models() -> list[dict[str, Any]]:
    """The JSON models of gradtel's dashboards (imported here: they need grafana-foundation-sdk)."""
    from dashboards import overview, variables

    return [overview.build(), variables.build()]


def render_dashboard(model: dict[str, Any]) -> str:
    """A dashboard's file text: sorted keys, so regeneration is byte-stable."""
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def outputs() -> dict[Path, str]:
    """Every generated file and its expected content."""
    dashboards = {f"{model['uid']}.json": render_dashboard(model) for model in dashboard_models()}
    groups = alerts.rule_groups()
    manifests = {
        "podmonitor.yaml": kubernetes.pod_monitor(),
        "prometheusrule.yaml": kubernetes.prometheus_rule(groups),
        "dashboards-configmap.yaml": kubernetes.dashboards_config_map(dashboards),
        "training-job.yaml": kubernetes.training_job(),
    }
    files = {DASHBOARDS_DIR / name: text for name, text in dashboards.items()}
    files[RULES_FILE] = yamlio.dump({"groups": groups})
    files.update(
        {
            RULE_TESTS_DIR / f"{name}.yml": yamlio.dump(rule_tests.promtool_tests(cases))
            for name, cases in rule_tests.SCENARIOS.items()
        }
    )
    files.update({KUBERNETES_DIR / name: yamlio.dump(doc) for name, doc in manifests.items()})
    files[KUBERNETES_DIR / "kustomization.yaml"] = yamlio.dump(kubernetes.kustomization(list(manifests)))
    return files


def stale(files: dict[Path, str]) -> list[Path]:
    """Generated files whose committed content differs from ``files``."""
    return [path for path, text in files.items() if not path.is_file() or path.read_text() != text]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale")
    args = parser.parse_args(argv)
    files = outputs()
    if args.check:
        for path in stale(files):
            print(f"stale: {path.relative_to(ROOT)} (run python -m deploy.generate)", file=sys.stderr)
        return 1 if stale(files) else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
