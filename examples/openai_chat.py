"""Streaming chat with the `openai` package against `dpinfer serve` (its HTTP front).

dpinfer serve --model smollm2-135m --dp 2
python examples/openai_chat.py --base-url http://127.0.0.1:8000/v1 --model smollm2-135m
"""

import argparse
import os

from openai import OpenAI

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="The front's /v1 URL.")
parser.add_argument("--model", default="smollm2-135m", help="The served model name (see GET /v1/models).")
parser.add_argument("--prompt", default="What is the capital of France?")
parser.add_argument("--max-tokens", type=int, default=64)
args = parser.parse_args()

client = OpenAI(base_url=args.base_url, api_key=os.environ.get("DPINFER_API_KEY", "none"))
stream = client.chat.completions.create(
    model=args.model,
    messages=[{"role": "user", "content": args.prompt}],
    max_tokens=args.max_tokens,
    temperature=0.0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print(f"\n[{chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens]")
