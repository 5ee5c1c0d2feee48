"""gradtel's benchmarks: step overhead, alternatives, export cost, memory and the statistics' floor.

Run them all with ``python -m benchmarks.run [--quick]``; see docs/benchmarks.md.
"""
