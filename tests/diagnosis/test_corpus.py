"""Every reproduction in the corpus, in eager mode and inside tf.function, diagnosed as expected."""

from __future__ import annotations

import os

import pytest
import tensorflow as tf

from gradtel.diagnosis import Diagnoser, Diagnosis
from gradtel.naming import variable_path
from tests.diagnosis import (  # noqa: F401  (register the cases)
    cases_ops,
    cases_public,
    cases_public2,
    cases_structure,
    cases_zero,
)
from tests.diagnosis.corpus import CASES, MODES, Case


def run_case(case: Case, mode: str, diagnoser: Diagnoser) -> tuple[Diagnosis, list, list[bool]]:
    """Run the case's step in ``mode`` and diagnose it as gradtel's optimizer wrapper would."""
    step = case.setup()
    if mode == "eager":
        grads, variables = step()
        return diagnoser.diagnose(list(grads), list(variables)), list(variables), [g is None for g in grads]
    box: dict = {}

    @tf.function
    def traced():
        grads, variables = step()
        box["result"] = diagnoser.diagnose(list(grads), list(variables))
        box["variables"], box["missing"] = list(variables), [g is None for g in grads]
        return tf.constant(0)

    traced()
    return box["result"], box["variables"], box["missing"]


def matching(name: str, keys: dict[str, str]) -> str:
    """The single expectation key that ``name`` ends with."""
    found = [k for k in keys if name == k or name.endswith("/" + k)]
    assert len(found) == 1, f"{name} matches {found} of {sorted(keys)}"
    return found[0]


PARAMS = [pytest.param(c, m, id=f"{c.name}-{m}") for c in CASES for m in MODES if m in c.expect]


def test_corpus_size() -> None:
    assert len(CASES) >= 80
    public = [c for c in CASES if c.setup.__module__.startswith("tests.diagnosis.cases_public")]
    assert len(public) >= 40  # reproductions of public bug reports (issue 12)
    assert {c.name for c in CASES} >= {"seed_loss_from_y_true", "seed_variable_not_trainable", "seed_integer_condition"}


@pytest.mark.parametrize(("case", "mode"), PARAMS)
def test_case(case: Case, mode: str, diagnoser: Diagnoser) -> None:
    expected = case.expect[mode]
    result, variables, missing = run_case(case, mode, diagnoser)
    names = [variable_path(v) for v in variables]

    missing_names = {names[i] for i, m in enumerate(missing) if m}
    assert set(result.causes) == {i for i, m in enumerate(missing) if m}
    assert {matching(n, expected.missing) for n in missing_names} == set(expected.missing), missing_names
    culprit = case.culprit()
    for index, cause in result.causes.items():
        key = matching(names[index], expected.missing)
        assert cause.category == expected.missing[key], (names[index], cause)
        if expected.op is not None:
            assert cause.op == expected.op, (names[index], cause)
        if expected.located:
            assert culprit is not None
            file, line = culprit
            assert cause.location is not None, cause
            assert cause.location.endswith(f"{os.sep}{os.path.basename(file)}:{line}"), (cause.location, line)
        assert cause.explanation and names[index] in cause.explanation

    for key, category in expected.zero_hints.items():
        hinted = [i for i in result.zero_hints if names[i] == key or names[i].endswith("/" + key)]
        assert hinted, (key, {names[i]: c.category for i, c in result.zero_hints.items()})
        for index in hinted:
            hint = result.zero_hints[index]
            assert hint.category == category, (names[index], hint)
            if expected.located and category != "underflow":
                assert culprit is not None and hint.location is not None, hint
                assert hint.location.endswith(f"{os.sep}{os.path.basename(culprit[0])}:{culprit[1]}"), hint
