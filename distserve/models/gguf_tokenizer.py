"""A GGUF file's metadata and tokenizer, read without torch or transformers.

Shared by the model loader (gguf_loader.py) and by processes that run no model: the
controller and the HTTP server need only the tokenizer, and must not import torch.
The tokenizer is built from the reader's fields with `tokenizers`: transformers' own GGUF
path re-reads the whole file (5 to 9 s for SmolLM2) and, for SmolLM2, splits non-ASCII
numerals ("½", "١٢٣") differently from the original tokenizer.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

def open_gguf(path: str | pathlib.Path) -> GGUFReader:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    reader = GGUFReader(path)
    arch = meta(reader, "general.architecture")
    if arch not in HF_ARCHITECTURES:
        raise ValueError(f"GGUF file {path} holds a {arch!r} model; this loader reads only "
                         f"{', '.join(HF_ARCHITECTURES)}")
    return reader


MISSING = object()


def meta(reader: GGUFReader, key: str, default: Any = MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is MISSING:
            raise ValueError(f"GGUF file {reader.data.filename} lacks metadata key {key!r}")
        return default
    value = field.contents()
    if field.types == [GGUFValueType.FLOAT32]:
        value = float(str(np.float32(value)))  # 9.999999747e-06 was written as 1e-05
    return value


# How each llama.cpp pre-tokenizer (tokenizer.ggml.pre) splits text before byte-level BPE,
# written as the original Hugging Face tokenizer.json does it.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


_REGEX_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
                 "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_DIGITS_FIRST = {"smollm", "starcoder", "refact"}  # each numeral alone, then GPT-2's split
_GPT2_SPLIT = {"default", "gpt2"}
_NFC_PRE_TOKENIZERS = {"qwen2", "deepseek-r1-qwen"}  # Qwen2's tokenizer.json normalises to NFC
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


@dataclass
class TokenizerParts:
    """What a Hugging Face fast tokenizer is made of: the `tokenizers` backend, the chat
    template, the special tokens by name (bos_token: "<|im_start|>", ...) and whether a
    BOS / EOS is added to each text."""

    backend: Tokenizer
    chat_template: str | None
    special: dict[str, str]
    add_bos: bool
    add_eos: bool


def tokenizer_parts(reader: GGUFReader) -> TokenizerParts | None:
    """The file's tokenizer, or None where it is not a byte-level BPE this module knows
    (SentencePiece vocabularies such as Llama 2's and Mistral's, rarer splits): transformers'
    GGUF converter reads those."""
    kind = meta(reader, "tokenizer.ggml.model", None)
    pre = meta(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in {*_REGEX_SPLITS, *_DIGITS_FIRST, *_GPT2_SPLIT}:
        return None
    return _byte_level_bpe(reader, pre)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _REGEX_SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_REGEX_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    digits = [pre_tokenizers.Digits(individual_digits=True)] if pre in _DIGITS_FIRST else []
    return pre_tokenizers.Sequence(
        [*digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def _byte_level_bpe(reader: GGUFReader, pre: str) -> TokenizerParts:
    tokens = meta(reader, "tokenizer.ggml.tokens")
    types = meta(reader, "tokenizer.ggml.token_type", [])
    merges = [tuple(m.split(" ", 1)) for m in meta(reader, "tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    if pre in _NFC_PRE_TOKENIZERS:
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED])

    ids = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta(reader, f"tokenizer.ggml.{key}", None)
        if token_id is not None:
            ids[name] = token_id
    special = {name: tokens[token_id] for name, token_id in ids.items()}
    add_bos = bool(meta(reader, "tokenizer.ggml.add_bos_token", False)) and "bos_token" in ids
    add_eos = bool(meta(reader, "tokenizer.ggml.add_eos_token", False)) and "eos_token" in ids
    if add_bos or add_eos:
        marked = [name for name, on in (("bos_token", add_bos), ("eos_token", add_eos)) if on]
        first = [special["bos_token"]] if add_bos else []
        last = [special["eos_token"]] if add_eos else []
        backend.post_processor = processors.TemplateProcessing(
            single=[*first, "$A", *last],
            pair=[*first, "$A", *last, *[f"{t}:1" for t in first], "$B:1",
                  *[f"{t}:1" for t in last]],
            special_tokens=[(special[name], ids[name]) for name in marked])
    return TokenizerParts(backend, meta(reader, "tokenizer.chat_template", None), special,
                          add_bos, add_eos)
