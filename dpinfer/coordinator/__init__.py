"""The coordinator: the one address clients and engine ranks know (DESIGN.md §2).

Files, by concept:

- ``server.py``      ``Coordinator``: the ROUTER socket, the event loop, dispatch by kind
- ``peers.py``       handshakes, registration, liveness, control and status handlers
- ``forwarding.py``  the request path: routing, outputs, aborts, re-dispatch, failures
- ``outbox.py``      per-turn batching and non-blocking sends; the STATUS counters
- ``registry.py``    ranks (liveness, load), clients, the in-flight record, the pending queue
- ``routing.py``     routing policies (``round_robin``, ``least_loaded``, ``cache_aware``) behind
  one base class; ``prefix_index.py`` (what ranks reported holding) and ``pending_prefixes.py``
  (what was sent to them and not reported yet) feed ``cache_aware``
- ``lifecycle.py``   the control state machine and acknowledgement aggregation
- ``process.py``     ``run_coordinator``, ``start_coordinator`` and ``CoordinatorHandle``
- ``commands.py``    ``dpinfer coordinator`` and ``dpinfer keys``

May import: ``protocol`` (its codec and CURVE setup included), ``config``, ``log``, ``errors``,
``procutil``. Never torch, transformers, the runner or the scheduler (an import-linter
contract): the hub decodes headers only and never touches a model.
"""
