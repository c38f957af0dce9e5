"""Ten lines: send prompts to a running `dpinfer serve` and print the answers."""

import sys

from dpinfer import InferenceClient, SamplingParams

address = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"
with InferenceClient(address) as client:
    results = client.generate(
        ["Hello, my name is", "The capital of France is"], SamplingParams(max_new_tokens=16)
    )
    for result in results:
        print(f"rank {result.rank}: {result.text!r} ({result.finish_reason})")
