"""TEST AND BENCHMARK FIXTURES: never imported by the product (an import-linter contract).

- ``null_rank.py``   ``NullEngine``: a rank with no model that speaks the real rank protocol
- ``null_direct.py`` the same echo engine bound directly (no coordinator): the benchmark floor
- ``echo.py``        the echo "model" both of them run

Used by ``tests/`` and ``dpinfer.bench``. May import: ``rank`` (its ``EngineConnection``),
``protocol``, ``log``, ``errors``, ``procutil``.
"""
