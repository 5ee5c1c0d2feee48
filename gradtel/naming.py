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
    """The name users know a variable by, the one every series, report line and diagnosis message uses.

    Keras 3: ``variable.path`` (``dense_1/kernel``); tf_keras and plain ``tf.Variable``: ``.name`` without the
    ``:0`` TensorFlow appends (the output index of the variable's op, always 0). Only that suffix goes: a variable
    the user named ``v:1`` is ``v:1:0`` to TensorFlow and ``v:1`` here, and a name that is not TensorFlow's keeps
    any ``:N`` it has.
    """
    path = getattr(variable, "path", None)
    if isinstance(path, str) and path:
        return path
    return str(getattr(variable, "name", "") or "variable").removesuffix(":0")


def layer_of(path: str) -> str:
    """The parent path of a variable (``model/dense_1/kernel`` -> ``model/dense_1``), or ``""`` at top level."""
    return path.rpartition("/")[0]


def unique_names(paths: Iterable[str], taken: dict[str, int]) -> list[str]:
    """Distinct display names for ``paths``, in order: a repeated path gets ``#2``, ``#3``...

    ``taken`` maps every name handed out so far to the next suffix to try for it, and is updated; a path that
    itself looks suffixed (``twin#2``) never collides with a generated one.
    """
    names = []
    for path in paths:
        name = path
        if name in taken:
            n = taken[path]
            while (name := f"{path}#{n}") in taken:
                n += 1
            taken[path] = n + 1
        taken.setdefault(name, 2)
        names.append(name)
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
            try:
                self._regexes.append(re.compile(regex))
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({error})") from None

    def __bool__(self) -> bool:
        return bool(self._regexes)

    def matches(self, path: str) -> bool:
        return any(r.search(path) for r in self._regexes)
