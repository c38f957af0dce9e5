"""The coordinator: the one address clients and engine ranks know (DESIGN.md §2).

Files, by concept:

- ``server.py``      ``Coordinator``: the ROUTER socket, the event loop, dispatch by kind
- ``peers.py``       handshakes, registration, liveness, control and status handlers
- ``forwarding.py``  the request path: routing, outputs, aborts, re-dispatch, failures
- ``outbox.py``      per-turn batching and non-blocking sends; the STATUS counters
- ``registry.py``    ranks (liveness, load) and clients
- ``requests.py``    the in-flight record and the queue of requests waiting for a rank
- ``routing.py``     routing policies (``round_robin``, ``least_loaded``) behind one base class
- ``lifecycle.py``   the control state machine and acknowledgement aggregation
- ``auth.py``        CurveZMQ keys and authentication
- ``process.py``     ``run_coordinator``, ``start_coordinator`` and ``CoordinatorHandle``
- ``commands.py``    ``dpinfer coordinator`` and ``dpinfer keys``
"""
