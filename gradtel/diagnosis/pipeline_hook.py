"""tf.data functions (``Dataset.map``, ``filter``...) run outside every GradientTape: remember the variables they read.

A model or layer applied inside ``Dataset.map`` reads its variables in the dataset's own function graph, which no
tape records: the step's gradient for them is None and nothing in the step reads them, so without this they look
"unused". ``StructuredFunctionWrapper.__init__`` (which traces every tf.data function) is wrapped, reversibly, to
note each captured resource handle with the user's line that built the pipeline stage.
"""

from __future__ import annotations

import contextlib
from typing import Any

import tensorflow as tf
from tensorflow.python.data.ops import structured_function

from gradtel.diagnosis.frames import location_of_mapped_stack

#: Handles remembered at most (the oldest are forgotten first): bounded memory in a process that builds many pipelines.
MAX_HANDLES = 100_000


class PipelineHook:
    """Installs the tf.data patch and answers: was this variable read by a tf.data function, and where was it built?"""

    def __init__(self) -> None:
        self._reads: dict[int, str | None] = {}
        self._original: Any = None

    def install(self) -> None:
        """Wrap the tf.data function tracer (idempotent)."""
        if self._original is not None:
            return
        wrapper_class = structured_function.StructuredFunctionWrapper
        original = wrapper_class.__dict__["__init__"]
        hook = self

        def __init__(wrapper: Any, *args: Any, **kwargs: Any) -> None:
            original(wrapper, *args, **kwargs)
            with contextlib.suppress(Exception):
                hook._note(wrapper)

        wrapper_class.__init__ = __init__
        self._original = original

    def uninstall(self) -> None:
        """Restore the tf.data function tracer and forget what was noted."""
        if self._original is not None:
            structured_function.StructuredFunctionWrapper.__init__ = self._original
        self._original = None
        self._reads.clear()

    def _note(self, wrapper: Any) -> None:
        handles = [external for external, _ in wrapper.function.graph.captures if external.dtype == tf.resource]
        if not handles:
            return
        location = location_of_mapped_stack()
        for handle in handles:
            self._reads[handle._id] = location
        while len(self._reads) > MAX_HANDLES:
            del self._reads[next(iter(self._reads))]

    def read_in_pipeline(self, resource: Any) -> tuple[bool, str | None]:
        """(whether a tf.data function captured this variable handle, the line that built that stage)."""
        key = getattr(resource, "_id", None)
        if key is None or key not in self._reads:
            return False, None
        return True, self._reads[key]
