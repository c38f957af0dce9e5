"""``dpinfer bench ...``: one module per benchmark, each a command that prints tables or ``--json``.

Benchmarks compare side by side in one run and report ratios (the machines are shared and
noisy); they are never timed assertions in tests. Top layer: may import everything, the test
fixtures of ``dpinfer.testing`` included (the null ranks are the benchmark's echo engines).
"""
