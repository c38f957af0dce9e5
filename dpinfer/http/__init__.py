"""The OpenAI-compatible HTTP front (DESIGN.md §8): API workers that are coordinator clients.

Each API worker process runs the ASGI app (FastAPI on uvicorn) with one
``AsyncInferenceClient`` of the coordinator; ``--api-workers N`` runs N of them on one port
(SO_REUSEPORT). ``metrics.py`` renders the deployment's figures (from the coordinator's status)
as Prometheus text.

May import: ``client``, ``protocol``, ``config``, ``sampling``, ``outputs``, ``log``, ``errors``.
Never torch, transformers, the runner or the scheduler (an import-linter contract).
"""
