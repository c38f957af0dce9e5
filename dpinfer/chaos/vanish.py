"""A client that vanishes: ``python -m dpinfer.chaos.vanish ADDRESS NUM_REQUESTS MAX_NEW_TOKENS``.

It submits streamed requests, prints ``streaming`` once the first token has arrived, and then
waits to be SIGKILLed by the chaos run (the way a crashed API worker disappears mid-request:
no goodbye, no abort).
"""

from __future__ import annotations

import asyncio
import sys

from dpinfer.client.async_client import AsyncInferenceClient
from dpinfer.sampling import SamplingParams

READY_LINE = "streaming"


async def _stream_then_wait(address: str, num_requests: int, max_new_tokens: int) -> None:
    client = AsyncInferenceClient(address, timeout_s=30.0, client_name="chaos-vanishing")
    await client.start()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    streams = [client.add_request_streaming(f"vanishing {i}", params) for i in range(num_requests)]
    await anext(streams[0])
    sys.stdout.write(READY_LINE + "\n")
    sys.stdout.flush()
    await asyncio.Event().wait()  # until killed


def main() -> None:
    address, num_requests, max_new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    asyncio.run(_stream_then_wait(address, num_requests, max_new_tokens))


if __name__ == "__main__":
    main()
