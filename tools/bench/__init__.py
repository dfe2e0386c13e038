"""chatapp's benchmark suite: every figure measured beside its baseline in the same run.

Run ``python -m chatapp_tools.bench`` (or ``chatapp-bench``); ``--quick`` for a short run.
See docs/benchmarks.md for what each figure means.
"""
