"""A tokenizer for processes that run no model: encode, decode and the chat template, with
neither torch nor transformers (importing transformers' tokenizers imports torch).

The controller and the HTTP server need only this. It reads what a Hugging Face fast
tokenizer reads (tokenizer.json, tokenizer_config.json, chat_template.jinja) or the
tokenizer inside a GGUF file, and renders chat templates in the sandboxed Jinja environment
transformers uses (same options, filters and globals), so that the text and the token ids
are the same as transformers' (tests check it). A folder with no tokenizer.json, or a GGUF
file with a SentencePiece vocabulary, falls back to transformers.
"""
from __future__ import annotations

import functools
import json
import pathlib
from datetime import datetime
from typing import Any

from tokenizers import Tokenizer as Backend

from distserve.models.locate import locate_model

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                  "cls_token", "mask_token")


class Tokenizer:
    def __init__(self, backend: Backend, chat_template: str | None = None,
                 special: dict[str, str] | None = None,
                 clean_up_tokenization_spaces: bool = False) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens_map = dict(special or {})
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        eos = self.special_tokens_map.get("eos_token")
        self.eos_token_id = backend.token_to_id(eos) if eos else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        clean = (self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None
                 else clean_up_tokenization_spaces)
        return _clean_up(text) if clean else text

    @property
    def vocab_size(self) -> int:
        """Without the added tokens, as transformers counts it; len() counts them too."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        ids = (self.backend.token_to_id(t) for t in self.special_tokens_map.values())
        return list(dict.fromkeys(i for i in ids if i is not None))

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str | list[int]:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = _compiled(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **self.special_tokens_map)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load_tokenizer(model: str | None) -> Any:
    """The tokenizer of a model argument (None: the built-in SmolLM2), without torch where
    the files allow it."""
    _, path, is_gguf = locate_model(model)
    if is_gguf:
        from distserve.models.gguf_tokenizer import open_gguf, tokenizer_parts
        parts = tokenizer_parts(open_gguf(path))
        if parts is not None:
            return Tokenizer(parts.backend, parts.chat_template, parts.special)
    elif (path / "tokenizer.json").exists():
        return _from_folder(path)
    from transformers import AutoTokenizer  # imports torch: only for the files above
    if is_gguf:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def _from_folder(path: pathlib.Path) -> Tokenizer:
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    template = config.get("chat_template")
    if (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    if isinstance(template, list):  # several named templates: the default one
        template = {t["name"]: t["template"] for t in template}.get("default")
    special = {}
    for name in _SPECIAL_NAMES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special[name] = value
    return Tokenizer(Backend.from_file(str(path / "tokenizer.json")), template, special,
                     bool(config.get("clean_up_tokenization_spaces", False)))


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """The template in transformers' environment: sandboxed, trim_blocks and lstrip_blocks,
    loop controls, its tojson filter and its raise_exception and strftime_now globals."""
    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %} marks assistant text: rendered as it is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
