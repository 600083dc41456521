"""`distserve serve [MODEL]`: one colocated instance behind the OpenAI-compatible API.

The model loads before the port opens, so /health answers 200 as soon as anyone can reach it.
"""
from __future__ import annotations

import argparse
import os


def register(sub) -> None:
    from distserve.cli import add_engine_args
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("model", nargs="?", default=None,
                   help="HF folder or .gguf file (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the name clients use in 'model' (default: the model's own name)")
    p.add_argument("--api-key", default=os.environ.get("DISTSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes "
                        "(default: $DISTSERVE_API_KEY, which keeps the key out of `ps`)")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from distserve.cli import engine_config_from_args
    from distserve.engine.async_engine import AsyncEngine
    from distserve.engine.colocated import ColocatedEngine
    from distserve.server.app import build_app

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    config = engine_config_from_args(args, args.model)
    print(f"loading {args.model or 'the built-in SmolLM2-135M-Instruct'} ...", flush=True)
    client = AsyncEngine(ColocatedEngine(config))
    app = build_app(client, args.served_model_name, args.api_key)
    name = args.served_model_name or client.model_name
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 "
          f"(context {client.max_model_len} tokens, "
          f"{client.stats().num_blocks} KV blocks)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        client.shutdown()
    return 0
