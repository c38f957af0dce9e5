"""The three child processes of a rank: one ``ChildSpec`` each, the only table of their identity.

Each child is started by name (``target`` is ``"module:function"``, so the rank main never
imports torch), shows up in ``/proc/<pid>/comm`` as ``comm_name``, and listens on ``input``:
the rank main's PUSH socket to it carries its work and, at the end, ``Shutdown``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpinfer.config import LocalSocket


@dataclass(frozen=True)
class ChildSpec:
    name: str
    target: str
    """``"module:function"``; called as ``target(config, report_ready, **kwargs)``."""
    comm_name: str
    input: LocalSocket
    """The socket the rank main sends this child's messages (and its ``Shutdown``) to."""


TOKENIZER = ChildSpec(
    "tokenizer", "dpinfer.tokenizer.process:run_tokenizer_process", "dpinfer-tok", LocalSocket.TOKENIZER_IN
)
SCHEDULER = ChildSpec(
    "scheduler",
    "dpinfer.scheduler.process:run_scheduler_process",
    "dpinfer-sched",
    LocalSocket.SCHEDULER_CONTROL,
)
DETOKENIZER = ChildSpec(
    "detokenizer",
    "dpinfer.tokenizer.detokenizer_process:run_detokenizer_process",
    "dpinfer-detok",
    LocalSocket.DETOKENIZER_IN,
)
CHILDREN: tuple[ChildSpec, ...] = (TOKENIZER, SCHEDULER, DETOKENIZER)
