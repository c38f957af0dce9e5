"""Ask about an image (serve a vision-language model, e.g. `dpinfer serve --model tiny-llava`)."""

import sys

import numpy as np

from dpinfer import InferenceClient, SamplingParams

address = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"
red = np.zeros((64, 64, 3), dtype=np.uint8)
red[..., 0] = 255  # any PIL image, HWC uint8 array, file path or encoded bytes works

with InferenceClient(address) as client:
    result = client.generate(
        {"prompt": "<image> What color is this?", "images": [red]},
        SamplingParams(max_new_tokens=12, temperature=0.0),
    )[0]
    print(f"rank {result.rank}: {result.text!r} ({result.finish_reason}: {result.error or 'ok'})")
