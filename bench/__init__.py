"""expertlens benchmarks: ``python bench/run.py`` (full, a few minutes) or ``python bench/run.py --quick``.

See docs/performance.md for the latest table and how to read it.
"""
