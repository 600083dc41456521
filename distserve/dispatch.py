"""Where a new request goes: the one rule the controller follows and the simulator models.

A prefill instance is loaded by the prompt tokens it was given and has not turned into first
tokens yet (a long prompt weighs what it costs); a decode or colocated instance by the requests
it holds until they finish. The least-loaded instance takes the request; a tie goes to the
first, so the choice is deterministic.
"""
from __future__ import annotations

from typing import Sequence


def least_loaded(loads: Sequence[float]) -> int:
    """Index of the smallest load (the first one on a tie)."""
    if not loads:
        raise ValueError("no instance to dispatch to")
    return min(range(len(loads)), key=loads.__getitem__)
