"""The client SDK: ``InferenceClient`` (blocking) and ``AsyncInferenceClient`` (asyncio).

Both speak ``dpinfer.protocol`` to a coordinator over one DEALER socket and share
``ClientSession`` (session.py) for the meaning of every message. ``inputs.py`` turns prompts,
chat messages, images and sampling params into request bodies; ``commands.py`` and
``render.py`` are the CLI on top. Both keep a lease with the coordinator (keepalive hellos) and,
unless built with ``reconnect=False``, ride out a lost or restarted coordinator for
``reconnect_window_s``, resubmitting what was in flight once (``ReconnectTimeoutError`` after).

May import: ``protocol``, ``config``, ``sampling``, ``outputs``, ``log``, ``errors``. Never torch,
transformers, the runner or the scheduler (an import-linter contract): the SDK stays light.
"""

from dpinfer.client.async_client import AsyncInferenceClient
from dpinfer.client.handles import RequestFuture, RequestStream
from dpinfer.client.session import ControlAcknowledgement, ControlError
from dpinfer.client.sync_client import InferenceClient

__all__ = [
    "AsyncInferenceClient",
    "ControlAcknowledgement",
    "ControlError",
    "InferenceClient",
    "RequestFuture",
    "RequestStream",
]
