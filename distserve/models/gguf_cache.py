"""A GGUF file's converted form (config, float32 tensors, tokenizer) kept on disk, so that a
model is dequantised once, not at every start of every instance.

Reading SmolLM2's GGUF takes 6 s on a quiet 2-core machine and over 20 s on a busy one
(metadata views, dequantisation, tokenizer); its converted tensors load from safetensors in a
fraction of a second. An entry is keyed by the file's resolved path, size and modification
time and by the converter's own source, so a changed file or converter never reads a stale
entry; an entry replaces the one before it for the same file. Entries are written whole under
a temporary name and renamed, so instances that load at once never read half an entry. A cache
that cannot be written only costs the time it would have saved.

Where: gguf/ under distserve.cache_dir.cache_root() ($DISTSERVE_CACHE_DIR, else
$XDG_CACHE_HOME/distserve, else ~/.cache/distserve).
DISTSERVE_GGUF_CACHE=0 turns it off. SmolLM2's entry takes 540 MB.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile

from distserve import cache_dir
from distserve.models import gguf_loader, gguf_tokenizer
from distserve.models.gguf_loader import GGUFModel, load_gguf

log = logging.getLogger(__name__)


def gguf_dir() -> pathlib.Path:
    """This cache's folder: gguf/ under distserve's cache (distserve.cache_dir)."""
    return cache_dir.cache_root() / "gguf"


def entry_key(path: pathlib.Path) -> str:
    """Changes with the file (path, size, mtime) and with the code that converts it."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    for module in (gguf_loader, gguf_tokenizer):
        digest.update(pathlib.Path(module.__file__).read_bytes())
    return f"{path.stem}-{digest.hexdigest()[:16]}"


def load_gguf_cached(path: str | pathlib.Path) -> GGUFModel:
    """load_gguf(path), from the cache when it holds this file, else read and then kept."""
    path = pathlib.Path(path).resolve()
    if os.environ.get("DISTSERVE_GGUF_CACHE", "1") == "0":
        return load_gguf(path)
    from safetensors import SafetensorError
    entry = gguf_dir() / entry_key(path)
    if (entry / "model.safetensors").is_file():
        try:
            model = _read(entry)
            log.info("read %s from the cache at %s", path.name, entry)
            return model
        except (OSError, ValueError, SafetensorError) as e:   # a damaged entry: read the file again, rewrite it
            log.warning("the cached %s at %s cannot be read (%s); reading the file", path.name, entry, e)
            shutil.rmtree(entry, ignore_errors=True)
    model = load_gguf(path)
    try:
        _write(entry, model, path)
    except OSError as e:
        log.warning("cannot cache %s under %s (%s): the next start reads it again", path.name,
                    entry.parent, e)
    return model


def _read(entry: pathlib.Path) -> GGUFModel:
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast
    config = json.loads((entry / "config.json").read_text())
    tensors = load_file(str(entry / "model.safetensors"))
    return GGUFModel(config, tensors, PreTrainedTokenizerFast.from_pretrained(str(entry / "tokenizer")))


def _write(entry: pathlib.Path, model: GGUFModel, source: pathlib.Path) -> None:
    from safetensors.torch import save_file
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(model.config))
        (tmp / "source.json").write_text(json.dumps({"path": str(source)}))
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        save_file(model.tensors, str(tmp / "model.safetensors"))
        os.rename(tmp, entry)   # atomic; fails if another process got there first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not entry.is_dir():
            raise
        return
    _drop_older_entries(entry, source)


def _drop_older_entries(entry: pathlib.Path, source: pathlib.Path) -> None:
    """Other entries of the same file (it changed since): nothing will read them again."""
    for other in entry.parent.glob(f"{source.stem}-*"):
        if other == entry or not (other / "source.json").is_file():
            continue
        try:
            if json.loads((other / "source.json").read_text()).get("path") == str(source):
                shutil.rmtree(other, ignore_errors=True)
        except (OSError, ValueError):
            continue
