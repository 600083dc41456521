"""Chat with a running `distserve serve` through the `openai` client, the answer streamed as
it is generated.

    distserve serve                                        # in another terminal
    python examples/chat_client.py "Write a haiku about autumn."
    python examples/chat_client.py --base-url http://HOST:PORT/v1 "..."   # or $DISTSERVE_URL

The server's address: --base-url, else $DISTSERVE_URL, else http://127.0.0.1:8000/v1.
"""
import argparse
import os
import sys

from openai import OpenAI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("message", nargs="?", default="Write a haiku about autumn.")
    p.add_argument("--base-url", default=os.environ.get("DISTSERVE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    # a server started with --api-key wants it; $DISTSERVE_API_KEY is where serve reads it too
    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("DISTSERVE_API_KEY", "none"))
    model = client.models.list().data[0].id   # the served model's name
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": args.message}],
        max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, stream=True,
        stream_options={"include_usage": True})   # the last chunk carries the token counts
    finish, usage = None, None
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    print(f"\n({model}: {usage.prompt_tokens} prompt tokens, {usage.completion_tokens} "
          f"generated, finished by {finish})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
