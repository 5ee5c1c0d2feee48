"""How variables and optimizers are named in gradtel's series and report.

Names are labels, so they must be stable across steps and distinct within an optimizer: two variables that
share a path (two models built from the same function) get a ``#2``, ``#3`` suffix in first-seen order.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any


def variable_path(variable: Any) -> str:
    """Keras 3: ``variable.path`` (``dense_1/kernel``); tf_keras and plain tf.Variable: name without ``:0``."""
    path = getattr(variable, "path", None)
    if isinstance(path, str) and path:
        return path
    name = str(getattr(variable, "name", "") or "variable")
    return re.sub(r":\d+$", "", name)


def layer_of(path: str) -> str:
    """The parent path of a variable (``model/dense_1/kernel`` -> ``model/dense_1``), or ``""`` at top level."""
    return path.rpartition("/")[0]


def unique_names(paths: Iterable[str], taken: dict[str, int]) -> list[str]:
    """Distinct display names for ``paths``; ``taken`` counts names already in use and is updated."""
    names = []
    for path in paths:
        count = taken.get(path, 0) + 1
        taken[path] = count
        names.append(path if count == 1 else f"{path}#{count}")
    return names


class PatternSet:
    """Glob patterns (``fnmatch``) or ``re:``-prefixed regular expressions matched against variable paths."""

    def __init__(self, patterns: Iterable[str] | str | None) -> None:
        if isinstance(patterns, str):
            patterns = [patterns]
        # Globs match the whole path; regular expressions search it (anchor them with ^ and $ if needed).
        self._regexes: list[re.Pattern[str]] = []
        for pattern in patterns or ():
            if not isinstance(pattern, str):
                raise TypeError(f"expected a glob or 're:' pattern string, got {type(pattern).__name__}")
            regex = pattern[3:] if pattern.startswith("re:") else r"\A" + fnmatch.translate(pattern)
            self._regexes.append(re.compile(regex))

    def __bool__(self) -> bool:
        return bool(self._regexes)

    def matches(self, path: str) -> bool:
        return any(r.search(path) for r in self._regexes)
