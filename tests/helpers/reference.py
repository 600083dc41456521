"""What transformers generates greedily: the reference the engine's tokens must equal."""
from __future__ import annotations

import torch
import transformers


def transformers_greedy(model_dir, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The new token ids of greedy decoding of each prompt, exactly max_new_tokens of them."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            gen = hf.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=0)
            out.append(gen[0, ids.shape[1]:].tolist())
    return out
