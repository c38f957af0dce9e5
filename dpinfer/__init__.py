"""dpinfer: serve a language model on N data-parallel replicas behind one coordinator.

The public API is imported lazily so that ``dpinfer --help`` starts at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "InferenceClient": "dpinfer.client.sync_client",
    "AsyncInferenceClient": "dpinfer.client.async_client",
    "ControlAcknowledgement": "dpinfer.client.session",
    "SamplingParams": "dpinfer.sampling",
    "GenerationResult": "dpinfer.outputs",
    "StreamDelta": "dpinfer.outputs",
}

__all__ = [
    "AsyncInferenceClient",
    "ControlAcknowledgement",
    "GenerationResult",
    "InferenceClient",
    "SamplingParams",
    "StreamDelta",
    "__version__",
]

if TYPE_CHECKING:
    from dpinfer.client.async_client import AsyncInferenceClient
    from dpinfer.client.session import ControlAcknowledgement
    from dpinfer.client.sync_client import InferenceClient
    from dpinfer.outputs import GenerationResult, StreamDelta
    from dpinfer.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpinfer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
