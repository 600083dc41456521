"""Prompts to token ids off the event loop, refusing texts that can never fit before any work.

Tokenising a long text takes seconds and hundreds of MB; on the event loop it stalls every
other client, /health included. So it runs on one thread of its own (one: a fast tokenizer
must not be used from two threads at once, and this one is our own copy), and a text longer
than the context could hold whatever it says is refused first: no token of the vocabulary
spells more than `longest_token_chars` characters.
"""
from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from distserve.server.errors import bad_request


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for (byte-level vocabularies spell each
    byte as one character, so this bounds the decoded text too)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


class PromptEncoder:
    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = copy.deepcopy(tokenizer)
        self.max_chars = longest_token_chars(tokenizer) * max_model_len
        self.max_model_len = max_model_len
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    def check_length(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            raise bad_request(f"the {param} has {chars} characters: more tokens than this "
                              f"server's context of {self.max_model_len} can hold", param)

    async def encode(self, text: str, param: str = "prompt") -> list[int]:
        self.check_length(len(text), param)
        return await self._run(self.tokenizer.encode, text)

    async def encode_chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """Through the chat template, whose special tokens are already in the text."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions")
        self.check_length(sum(len(m["content"]) for m in messages), "messages")

        def render_and_encode() -> list[int]:
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            except Exception as e:  # the template rejects the conversation (raise_exception)
                raise bad_request(f"the chat template rejected the messages: {e}",
                                  "messages") from e
            self.check_length(len(text), "messages")
            return self.tokenizer.encode(text, add_special_tokens=False)

        return await self._run(render_and_encode)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
