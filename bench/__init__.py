"""
Benchmarks of the relay, the bridge and the whole system, with baselines run in the
same invocation (``python -m bench --help``; docs/performance.md has the results).

Run by hand, not in the test suite (tests/test_bench.py only smoke-runs each one at
tiny sizes).  This package imports nothing heavy, so that its helper entry points
(``python -m bench.bridge_main`` and the others) start fast.
"""
