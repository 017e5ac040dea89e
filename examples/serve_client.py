"""Talk to `lsaq-run serve` with the official OpenAI client (`pip install openai`).

    lsaq-run serve BUNDLE --port 8080          # in another terminal (pip install "lsaq[serve]")
    python examples/serve_client.py [http://127.0.0.1:8080] ["question"]

Any OpenAI-compatible client works the same way: point its base URL at the server's /v1.
"""

import json
import sys
import urllib.request

from openai import OpenAI


def main(base: str, question: str) -> None:
    # The api_key is only checked when the server runs with --api-key.
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    model = client.models.list().data[0].id          # the server serves one model
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}],
        max_tokens=48, temperature=0, stream=True)   # greedy; leave temperature out to sample
    variant = None
    for chunk in stream:
        variant = chunk.system_fingerprint            # lsaq-<variant>: which one answered
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    # The server re-plans as free memory changes; /health says what it holds now and why.
    with urllib.request.urlopen(f"{base}/health") as r:
        health = json.load(r)
    print(f"[answered by {variant}; now {health['status']} with {health['variant']}]",
          file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080",
         sys.argv[2] if len(sys.argv) > 2 else "What is the capital of France?")
