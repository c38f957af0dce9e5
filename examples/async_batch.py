"""Hundreds of requests in flight from one asyncio task, spread over every rank."""

import asyncio
import collections
import sys
import time

from dpinfer import AsyncInferenceClient, SamplingParams


async def main(address: str, num_requests: int = 300) -> None:
    client = AsyncInferenceClient(address)
    await client.start()
    try:
        started = time.perf_counter()
        futures = [
            client.add_request(f"request {i}: count to ten", SamplingParams(max_new_tokens=8, seed=i))
            for i in range(num_requests)
        ]
        results = await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
    finally:
        await client.stop()
    per_rank = collections.Counter(r.rank for r in results)
    failed = [r for r in results if not r.ok]
    print(f"{len(results)} requests in {elapsed:.2f} s, per rank: {dict(sorted(per_rank.items()))}")
    if failed:
        raise SystemExit(f"{len(failed)} request(s) failed, e.g. {failed[0].error}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"))
