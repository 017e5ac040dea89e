"""Embedding the runtime in an application: load once at startup, then stream replies.

    python examples/embed_runtime.py BUNDLE ["question"]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

import lsaq_runtime  # noqa: E402


def main(bundle: str, question: str) -> None:
    try:
        # Loading is the slow part (graph + weights + KV cache for `context` tokens): do it once.
        model = lsaq_runtime.load(bundle, context=1024, memory_budget=None, device="auto", wait=30)
    except lsaq_runtime.LsaqRuntimeError as e:  # bad bundle, nothing fits, ...: a message for people
        sys.exit(f"cannot start: {e}")
    print(f"[{model.variant} on {model.device.label}: {model.reason}]", file=sys.stderr)

    with model:
        for q in (question, "And in one sentence, why is it famous?"):
            print(f"> {q}")
            # Each call is independent (the KV cache is reused, the conversation is not).
            # Greedy here; pass temperature=0.7, top_p=0.9, seed=0 (say) to sample.
            for piece in model.stream(q, max_new_tokens=64, chat=True):
                print(piece, end="", flush=True)
            print()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "What is the capital of France?")
