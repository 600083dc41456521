"""The OpenAI-compatible HTTP front end: routes, wire formats, errors, metrics, `serve`.

It talks to requests only through an `EngineClient` (one in-process engine today, the
disaggregated controller next); it holds no tensors and never touches an engine directly.
"""
from distserve.server.app import build_app

__all__ = ["build_app"]
