"""Engine throughput against Hugging Face transformers, and the decode step against the
memory-bandwidth floor, measured side by side in one run.

    python benchmarks/engine.py [--quick] [--out benchmarks/results/engine.json]

For each model (the built-in SmolLM2-135M and a random-weight Llama of about 1.1 GB of
bf16 weights) and each batch size, both engines generate the same number of tokens from the
same prompts; decode tokens/s = batch * (N - 1) / (time for N tokens - time for 1 token),
prefill tokens/s = prompt tokens / time for 1 token. The floor of a decode step is weight
bytes / read bandwidth (best of a few passes summing a 1 GiB buffer), measured here.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

import torch
import transformers

from distserve import LLM, SamplingParams

ROOT = pathlib.Path(__file__).resolve().parent.parent


def read_bandwidth(gib: float = 1.0, passes: int = 5) -> float:
    """Bytes per second of the fastest streaming read over a buffer much larger than cache."""
    buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best


def build_random_llama(out: pathlib.Path, tokenizer) -> pathlib.Path:
    """A Llama of 10 layers, hidden 2048, GQA 16/4, vocab 49152: about 1.1 GB in bf16."""
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=10,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def time_ours(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - t


@torch.inference_mode()
def time_hf(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t


def measure(name: str, timer, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    timer(prompts[:1], 2)  # warm-up: first calls pick kernels
    t1 = min(timer(prompts, 1) for _ in range(repeats))
    tn = min(timer(prompts, new_tokens) for _ in range(repeats))
    b, plen = len(prompts), len(prompts[0])
    step = (tn - t1) / (new_tokens - 1)
    return {"engine": name, "batch": b, "prompt_len": plen, "new_tokens": new_tokens,
            "prefill_tokens_per_s": b * plen / t1, "decode_step_ms": step * 1e3,
            "decode_tokens_per_s": b / step}


def bench_model(label: str, ours: LLM, hf, batches: list[int], prompt_len: int,
                new_tokens: int, repeats: int, bandwidth: float) -> dict:
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.engine.worker.model.parameters())
    base = ours.tokenizer.encode("The history of the city begins with a small market by the river. " * 40)
    rows = []
    for b in batches:
        prompts = [base[i:i + prompt_len] for i in range(b)]
        for engine, timer in (("distserve", lambda p, n: time_ours(ours, p, n)),
                              ("transformers", lambda p, n: time_hf(hf, p, n))):
            r = measure(engine, timer, prompts, new_tokens, repeats)
            rows.append(r)
            print(f"  {label:<22} {engine:<13} batch {b:>3}: decode {r['decode_tokens_per_s']:8.1f} tok/s"
                  f" (step {r['decode_step_ms']:7.1f} ms), prefill {r['prefill_tokens_per_s']:8.1f} tok/s",
                  flush=True)
    floor_ms = weight_bytes / bandwidth * 1e3
    step1 = next(r["decode_step_ms"] for r in rows if r["engine"] == "distserve" and r["batch"] == 1)
    speedups = {b: _ratio(rows, b) for b in batches}
    return {"model": label, "weight_bytes": weight_bytes, "rows": rows,
            "bandwidth_floor_ms": floor_ms, "decode_step_b1_ms": step1,
            "step_over_floor": step1 / floor_ms, "decode_speedup_vs_transformers": speedups}


def _ratio(rows: list[dict], batch: int) -> float:
    get = lambda e: next(r["decode_tokens_per_s"] for r in rows if r["engine"] == e and r["batch"] == batch)
    return get("distserve") / get("transformers")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/engine.json"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens, repeats = (8, 1) if args.quick else (32, 2)
    batches = [1, 8, 32]
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        small = LLM(None, dtype="bfloat16", num_kv_blocks=1024)
        from distserve.models.gguf_loader import find_default_gguf
        gguf = find_default_gguf()
        hf_small = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16).eval()
        results.append(bench_model("SmolLM2-135M (bf16)", small, hf_small, batches, 64,
                                   new_tokens, repeats, bandwidth))
        del small, hf_small
        folder = build_random_llama(pathlib.Path(tmp) / "llama-1g", transformers_tokenizer())
        big = LLM(str(folder), dtype="bfloat16", num_kv_blocks=512)
        hf_big = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
        results.append(bench_model("random Llama 1.1 GB", big, hf_big, batches, 64,
                                   new_tokens, repeats, bandwidth))
    report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "read_bandwidth_GBps": bandwidth / 1e9,
              "quick": args.quick, "models": results}
    print()
    for m in results:
        s = m["decode_speedup_vs_transformers"]
        print(f"{m['model']}: decode speed-up vs transformers " +
              ", ".join(f"batch {b}: {v:.2f}x" for b, v in s.items()) +
              f"; batch-1 step {m['decode_step_b1_ms']:.1f} ms = {m['step_over_floor']:.2f}x the "
              f"bandwidth floor ({m['bandwidth_floor_ms']:.1f} ms)")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"saved {out}")
    return 0


def transformers_tokenizer():
    from distserve.models.loader import find_model, load_tokenizer_for
    return load_tokenizer_for(find_model(None))


if __name__ == "__main__":
    sys.exit(main())
