"""Stream one answer token by token, from the sync and the async client."""

import asyncio
import sys

from dpinfer import AsyncInferenceClient, InferenceClient, SamplingParams

address = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"
params = SamplingParams(max_new_tokens=24, temperature=0.0)

with InferenceClient(address) as client:
    pieces = []
    for delta in client.generate_stream("Once upon a time", params):
        print(delta.text, end="", flush=True)
        pieces.append(delta.text)
    print()
    assert "".join(pieces) == delta.result.text


async def main() -> None:
    client = AsyncInferenceClient(address)
    await client.start()
    try:
        async for delta in client.add_request_streaming("Once upon a time", params):
            print(delta.text, end="", flush=True)
        print()
    finally:
        await client.stop()


asyncio.run(main())
