"""Tests for distserve/cache_dir.py: one setting moves every cache distserve keeps (converted
GGUFs, the exported HF folder, the vLLM peer's venv), read at call time, and the module stays
free of torch because the server and the planner may import it."""
from __future__ import annotations

import subprocess
import sys

from distserve.bench.hf_export import DONE_MARKER, default_export_dir, export_default_model
from distserve.bench.vllm_peer import VLLM_VERSION, default_venv, ensure_vllm
from distserve.cache_dir import cache_root
from distserve.models.gguf_cache import gguf_dir


def test_every_user_resolves_under_distserve_cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("DISTSERVE_CACHE_DIR", str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))   # the explicit setting wins
    assert cache_root() == root
    for path in (gguf_dir(), default_export_dir(), default_venv()):
        assert path.is_relative_to(root) and path != root, path


def test_the_defaults_of_the_callers_follow_the_setting_at_call_time(tmp_path, monkeypatch):
    """ensure_vllm and export_default_model, called with no folder, find finished work under
    the cache root set after import: nothing is installed or converted."""
    monkeypatch.setenv("DISTSERVE_CACHE_DIR", str(tmp_path))
    venv = default_venv()
    venv.mkdir(parents=True)
    (venv / ".distserve-ready").write_text(VLLM_VERSION + "\n")
    assert ensure_vllm() == venv / "bin/python"
    export = default_export_dir()
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    (export / DONE_MARKER).write_text("done\n")
    assert export_default_model() == export


def test_xdg_cache_home_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTSERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "distserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "distserve"
    monkeypatch.setenv("DISTSERVE_CACHE_DIR", "")   # empty counts as unset, as XDG's does
    assert cache_root() == tmp_path / "home" / ".cache" / "distserve"


def test_does_not_import_torch():
    code = "import sys, distserve.cache_dir; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
