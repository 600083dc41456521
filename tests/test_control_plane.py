"""The control plane (HTTP server, controller, their tokenizer) runs without torch, and its
tokenizer gives transformers' token ids, text and chat prompts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distserve.tokenizer import Tokenizer, load_tokenizer

TEXTS = ["Hello, my name is", " leading space", "½ ١٢٣ numbers 12345", "emoji 🤗 done",
         "<|im_start|>user\nhi<|im_end|>", "a  b   c\n\n\td", "it 's , you 're ."]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]


def test_the_server_and_the_controller_import_no_torch():
    code = ("import sys, distserve.server.app, distserve.controller, distserve.tokenizer, "
            "distserve.cluster.messages; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def _agrees(ours: Tokenizer, theirs) -> None:
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == \
                theirs.encode(text, add_special_tokens=special), text
        ids = theirs.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == \
                theirs.decode(ids, skip_special_tokens=skip)
    for generation_prompt in (True, False):
        assert ours.apply_chat_template(CHAT, add_generation_prompt=generation_prompt) == \
            theirs.apply_chat_template(CHAT, tokenize=False,
                                       add_generation_prompt=generation_prompt)
    assert ours.get_vocab() == theirs.get_vocab()
    assert (ours.vocab_size, len(ours)) == (theirs.vocab_size, len(theirs))
    assert ours.all_special_ids == theirs.all_special_ids
    assert ours.eos_token_id == theirs.eos_token_id


def test_the_built_in_models_tokenizer_agrees_with_transformers(tokenizer_dir):
    from helpers.tiny_models import smollm2_tokenizer
    ours = load_tokenizer(None)
    assert isinstance(ours, Tokenizer)
    _agrees(ours, smollm2_tokenizer())


def test_a_folders_tokenizer_agrees_with_transformers(tiny_llama):
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(str(tiny_llama))
    assert isinstance(ours, Tokenizer)
    _agrees(ours, transformers.AutoTokenizer.from_pretrained(str(tiny_llama)))


def test_a_template_file_and_the_template_helpers(tmp_path, tiny_llama):
    """chat_template.jinja wins over the config's template, as in transformers; tojson,
    raise_exception and {% generation %} work as there."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_llama / name).read_bytes())
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}")
    tok = load_tokenizer(str(tmp_path))
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == \
        json.dumps({"role": "user", "content": "é"}, ensure_ascii=False)
    with pytest.raises(Exception, match="no tools"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
