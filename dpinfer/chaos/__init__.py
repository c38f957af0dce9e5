"""``dpinfer chaos``: a built-in chaos run against a real deployment.

It starts a coordinator (a process of its own, so it can be killed and started again at the
same address) and ``torchrun`` ranks as ``dpinfer serve`` launches them, drives a mixed
workload through the SDK, injects faults on a schedule drawn from a seed, and checks the
invariants of DESIGN.md §7: every request ends exactly once with its own result, greedy output
equals an undisturbed run, no deadline passes, memory stays bounded, nothing is left behind.

- ``plan.py``        ``ChaosConfig``, the fault kinds and the seeded schedule
- ``cluster.py``     the deployment under test: start, restart the coordinator, stop, leftovers
- ``link.py``        the harness's status line to a coordinator that may die
- ``proc.py``        ``/proc``: descendants, names, resident memory, signals
- ``workload.py``    request pool, references, ``RequestRecord``, the wire-observing client
- ``faults.py``      one injector per fault kind, each waiting until its fault has resolved
- ``vanish.py``      the client process that is killed mid-request
- ``monitor.py``     status counters per coordinator incarnation, memory peaks
- ``invariants.py``  the checks, pure functions of the records
- ``run.py``         the phases of one run
- ``report.py``      the rich tables and the ``--json`` map
- ``commands.py``    the click command

Layer: beside ``bench`` and ``launcher``; it may import the launcher, the client, the
protocol and config, never the rank, scheduler or runner (those run in the ranks it starts).
"""
