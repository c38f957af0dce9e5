"""The OpenAI-compatible HTTP front (DESIGN.md §8): API workers that are coordinator clients.

Each API worker process runs the ASGI app (FastAPI on uvicorn) with one
``AsyncInferenceClient`` of the coordinator; ``--api-workers N`` runs N of them on one port
(SO_REUSEPORT). ``server.py`` spawns the workers (``start_http_front``) and ``app.py`` builds
one worker's app; ``openai_api.py`` and ``sse.py`` serve ``/v1/completions`` and
``/v1/chat/completions`` from requests decoded by ``schemas.py``/``decoding.py`` and turned
into engine requests by ``inputs.py``, answered by ``render.py``; ``control.py`` holds
``/health``, ``/version``, ``/metrics`` and the control endpoints, ``auth.py`` the keys,
``link.py`` the worker's coordinator connection, ``errors.py`` the OpenAI error object and the
status of every failure, ``connection.py`` body limits and disconnects, ``commands.py``
``dpinfer http``. ``metrics.py`` renders the deployment's figures (from the coordinator's
status) as Prometheus text.

May import: ``client``, ``protocol``, ``config``, ``sampling``, ``outputs``, ``log``, ``errors``.
Never torch, transformers, the runner or the scheduler (an import-linter contract).
"""
