"""The sampling a model's makers chose for it: the defaults of `distserve generate`.

Greedy decoding of a small model loops on one phrase (SmolLM2-135M answered a haiku request
with one line repeated to max_tokens). As vLLM does, generate samples as the model's own
generation_config.json says; a model without one (the built-in GGUF has none) gets
llama.cpp's and Ollama's defaults. Reads no weights and imports no torch.
"""
from __future__ import annotations

import json
import math

from distserve.models.locate import locate_model

KEYS = ("temperature", "top_p", "top_k")
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": -1}   # what a key the config omits means
FALLBACK = {"temperature": 0.8, "top_p": 0.95, "top_k": 40}  # llama.cpp's server defaults


def sampling_defaults(model: str | None) -> tuple[dict, str]:
    """(temperature, top_p and top_k for `model`, where they come from). A folder whose
    generation_config.json names any of them gives those, the others neutral, as vLLM reads
    it; otherwise the fallback."""
    _, path, is_gguf = locate_model(model)
    config_file = None if is_gguf else path / "generation_config.json"
    if config_file is None or not config_file.is_file():
        return dict(FALLBACK), "llama.cpp's defaults: the model has no generation_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_file} is not a readable JSON file: {e}") from None
    given = {k: config[k] for k in KEYS if config.get(k) is not None}
    if not given:
        return dict(FALLBACK), f"llama.cpp's defaults: {config_file} names no sampling"
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{config_file}: {key} must be a number, got {value!r}")
    return {**NEUTRAL, **given}, str(config_file)
