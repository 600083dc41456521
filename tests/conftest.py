"""Shared fixtures: small random-weight Hugging Face models saved as real folders."""
from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from helpers.tiny_models import build_tiny_model, smollm2_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("tokenizer")
    smollm2_tokenizer().save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> pathlib.Path:
    """A Llama with grouped-query attention (4 query heads, 2 KV heads)."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory, tokenizer_dir) -> pathlib.Path:
    return build_tiny_model("opt", tmp_path_factory.mktemp("tiny-opt"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tokenizer_dir) -> pathlib.Path:
    """q/k/v with a bias, head_dim 32, one KV head."""
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"), tokenizer_dir, seed=3)
