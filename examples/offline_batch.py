"""Offline batch generation with `distserve.LLM`: a list of prompts in, their completions out,
no server. The engine batches them as it would a server's requests.

    python examples/offline_batch.py                  # the built-in SmolLM2-135M-Instruct
    python examples/offline_batch.py /path/to/model   # any Llama / Mistral / Qwen2 / OPT folder or .gguf
"""
import sys

import distserve

QUESTIONS = [
    "Write a haiku about autumn.",
    "What is the capital of France?",
    "Give me three names for a grey cat.",
    "Explain in one sentence why the sky is blue.",
]


def main(argv: list[str]) -> int:
    model = argv[1] if len(argv) > 1 else None
    # a batch of short prompts needs little KV cache; the default budget is 2 GiB
    with distserve.LLM(model, kv_cache_memory_gib=0.25) as llm:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                     tokenize=False, add_generation_prompt=True)
                   for q in QUESTIONS]
        # sampling, not greedy: greedy decoding of a model this small repeats itself
        params = distserve.SamplingParams(temperature=0.8, top_p=0.95, top_k=40, max_tokens=48,
                                          seed=0)
        for question, out in zip(QUESTIONS, llm.generate(prompts, params, use_tqdm=True)):
            print(f"### {question}")
            print(out.text.strip())
            print(f"({len(out.token_ids)} tokens, finished by {out.finish_reason})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
