"""A prototype of a cheaper Prometheus exposition, to size the change proposed to the lead.

Why: every scrape through the OpenTelemetry SDK builds an attribute dict, an ``Observation``, an aggregation
entry and a label tuple per series (under the GIL, tens of microseconds each), then prometheus_client formats them
again. The labels of a variable never change, so a collector can pre-render each table's label sets once and, per
scrape, only format the numbers of one snapshot. This renders the per-variable gauges and counters that dominate
the response (4 series per variable); it is a sizing prototype, not a complete exporter (no causes, merges or
HELP text).
"""

from __future__ import annotations

from gradtel import instrumenting, layout

_SERIES = (
    ("gradtel_gradient_zero_total", layout.ZERO),
    ("gradtel_gradient_nonfinite_total", layout.NONFINITE),
    ("gradtel_gradient_norm", layout.NORM),
    ("gradtel_gradient_max_abs", layout.MAX_ABS),
)


class Renderer:
    """Renders exposition text from snapshots; label strings are cached per table (they never change)."""

    def __init__(self, run_id: str) -> None:
        self._run = run_id
        self._labels: dict[int, list[str]] = {}

    def _table_labels(self, handle: object, table: object) -> list[str]:
        key = id(table)
        if key not in self._labels:
            self._labels[key] = [
                f'{{run="{self._run}",optimizer="{handle.name}",variable="{name}",layer="{layer}"}} '  # type: ignore[attr-defined]
                for name, layer in zip(table.names, table.layers, strict=True)  # type: ignore[attr-defined]
            ]
        return self._labels[key]

    def render(self) -> bytes:
        chunks: list[str] = []
        for handle in instrumenting.handles():
            for table, snap in handle._snapshot_tables():
                labels = self._table_labels(handle, table)
                for metric, row in _SERIES:
                    values = snap.rows[row].tolist()
                    chunks.append("".join(f"{metric}{lab}{v!r}\n" for lab, v in zip(labels, values, strict=True)))
        return "".join(chunks).encode()
