"""The README documents every metric exactly as gradtel/metrics.py defines it, and every variable gradtel reads."""

from __future__ import annotations

import pathlib
import re

from gradtel import config, metrics

README = (pathlib.Path(__file__).parents[2] / "README.md").read_text()


def test_every_metric_is_in_the_readme_table_with_its_type_and_labels():
    rows = {
        m.group(1): (m.group(2), m.group(3))
        for m in re.finditer(r"^\| `(gradtel_\w+)` \| (\w+) \| ([\w, ]+) \|", README, re.M)
    }
    assert set(rows) == {m.name for m in metrics.ALL}
    for metric in metrics.ALL:
        kind, labels = rows[metric.name]
        assert kind == metric.kind.value
        assert tuple(label.strip() for label in labels.split(",")) == metric.labels


def test_every_environment_variable_read_by_gradtel_is_documented():
    source = "".join(p.read_text() for p in pathlib.Path(config.__file__).parent.glob("*.py"))
    read = set(re.findall(r"\"((?:OTEL|GRADTEL)_[A-Z_]+)\"", source))
    assert read, "no environment variables found: the pattern is wrong"
    missing = [name for name in read if name not in README]
    assert not missing
