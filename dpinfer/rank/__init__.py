"""One engine rank's main process: the rank's only link to the coordinator (DESIGN.md §3).

- ``main.py``          ``run_rank``: build -> children ready -> register -> loop -> shutdown
- ``loop.py``          ``RankMain``: relay requests and outputs, forward control, heartbeat
- ``connection.py``    ``EngineConnection``: register, re-register, heartbeat, send, receive
- ``children.py``      the ``ChildSpec`` table: each child's target, process name and socket
- ``supervisor.py``    spawn the children, wait for their ready messages, notice deaths
- ``inflight.py``      the book of in-flight requests (exactly one final each) and the STOP plan
- ``signal_wakeup.py`` SIGTERM/SIGINT as a pollable file descriptor

May import: ``protocol``, ``transport`` (for the tensor-queue handle it creates for its
children), ``config``, ``log``, ``errors``, ``procutil``. Never torch: the children import it
(their targets are named by string in ``children.py``). Started only by
``dpinfer.launcher.worker``.
"""
