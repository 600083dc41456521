"""The one place that decides where distserve keeps what it builds once and reuses (converted
GGUF models, the exported HF folder, the vLLM peer's virtual environment), so that one setting
moves all of them, e.g. off a small home disk.

$DISTSERVE_CACHE_DIR, else $XDG_CACHE_HOME/distserve, else ~/.cache/distserve. Read at each
call, not at import, so a changed environment applies. Standard library only: the server and
the planner import this and must not pull torch in.
"""
from __future__ import annotations

import os
import pathlib


def cache_root() -> pathlib.Path:
    """distserve's cache folder (not created here: each user makes its own subfolder)."""
    explicit = os.environ.get("DISTSERVE_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "distserve"
