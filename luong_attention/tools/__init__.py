"""The tools: the ``luong-attention`` command line and the benchmarks it runs.

``cli`` (the console script), ``bench`` (``luong-attention bench``: time and memory against
Keras 3, ``jax.nn`` and torch) and ``bench_parallel`` (``luong-attention bench-parallel``).
"""
