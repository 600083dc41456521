"""Tests for distserve/models/gguf_cache.py on tiny GGUF files written by test_gguf_loader's
writer: the cached load is the file's own load, and a changed file is read again."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from distserve.models.gguf_cache import gguf_dir, load_gguf_cached
from distserve.models.gguf_loader import load_gguf
from test_gguf_loader import write_tiny_gguf


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DISTSERVE_GGUF_CACHE", raising=False)
    return tmp_path / "cache"


def assert_same_model(got, want):
    assert got.config == want.config
    assert got.tensors.keys() == want.tensors.keys()
    for name, tensor in want.tensors.items():
        assert got.tensors[name].dtype == tensor.dtype and torch.equal(got.tensors[name], tensor), name
    for text in ("ab a12", "<|im_start|>ab<|im_end|>", "ba 21 a"):
        assert got.tokenizer(text)["input_ids"] == want.tokenizer(text)["input_ids"]
    chat = [{"role": "user", "content": "ab"}]
    assert (got.tokenizer.apply_chat_template(chat, tokenize=False)
            == want.tokenizer.apply_chat_template(chat, tokenize=False))
    assert (got.tokenizer.bos_token, got.tokenizer.eos_token) == (want.tokenizer.bos_token,
                                                                  want.tokenizer.eos_token)


def test_the_cached_load_is_the_files_own(tmp_path, caplog):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", add_bos=True)
    with caplog.at_level(logging.INFO, logger="distserve.models.gguf_cache"):
        first = load_gguf_cached(path)
        assert "from the cache" not in caplog.text
        second = load_gguf_cached(path)
    assert "read tiny.gguf from the cache" in caplog.text
    (entry,) = gguf_dir().iterdir()
    assert (entry / "model.safetensors").is_file()
    want = load_gguf(path)
    assert_same_model(first, want)
    assert_same_model(second, want)


def test_a_changed_file_is_read_again_and_its_old_entry_dropped(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", tied=True)
    load_gguf_cached(path)
    (old,) = gguf_dir().iterdir()
    write_tiny_gguf(path, "llama", tied=False)   # an output head of its own now
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    got = load_gguf_cached(path)
    assert "lm_head.weight" in got.tensors
    assert_same_model(got, load_gguf(path))
    (new,) = gguf_dir().iterdir()
    assert new != old


def test_a_damaged_entry_is_replaced(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama")
    load_gguf_cached(path)
    (entry,) = gguf_dir().iterdir()
    (entry / "model.safetensors").write_bytes(b"not safetensors")
    assert_same_model(load_gguf_cached(path), load_gguf(path))
    assert_same_model(load_gguf_cached(path), load_gguf(path))   # rewritten whole


def test_a_cache_that_cannot_be_written_costs_only_time(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("DISTSERVE_CACHE_DIR", str(blocked))   # gguf/ cannot be made under a file
    assert_same_model(load_gguf_cached(path), load_gguf(path))


@pytest.mark.slow
def test_smollm2_cached_is_smollm2():
    """The built-in model through the cache: the same tensors, config and tokenizer (non-ASCII
    text and the chat template included) as read from its GGUF."""
    from distserve.models.locate import find_default_gguf
    path = find_default_gguf()
    load_gguf_cached(path)
    got, want = load_gguf_cached(path), load_gguf(path)
    assert got.config == want.config and got.tensors.keys() == want.tensors.keys()
    assert all(torch.equal(got.tensors[name], t) for name, t in want.tensors.items())
    for text in ("Hello, world!  Two spaces\tand a tab\n", "½ ١٢٣ naïve café 日本語 🙂",
                 "<|im_start|>user\nhi<|im_end|>"):
        assert got.tokenizer(text)["input_ids"] == want.tokenizer(text)["input_ids"], text
    chat = [{"role": "user", "content": "Write a haiku about autumn."}]
    assert (got.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == want.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert got.tokenizer.all_special_ids == want.tokenizer.all_special_ids
