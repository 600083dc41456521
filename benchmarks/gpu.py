"""Our engine against Hugging Face transformers on a CUDA GPU, measured side by side in one
run, and the decode step against the HBM floor.

    python benchmarks/gpu.py --tokenizer DIR [--models 1b,8b] [--out benchmarks/results/gpu.json]

Random-weight Llamas (no model hub here) of two shapes: "1b" (hidden 2048, 16 layers, GQA
32/8) and "8b" (Llama-3-8B's layers: hidden 4096, 32 layers, GQA 32/8, FFN 14336), with
SmolLM2's 49152-token vocabulary, bf16. Both engines generate the same number of tokens from
the same prompts, greedily; each keeps its fastest run (benchmarks/engine.py's clocks). The
floor of a batch-1 decode step is weight bytes / HBM read bandwidth, measured in this run.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import engine as cpu_bench  # noqa: E402  (the CPU benchmark's clocks and report)

from distserve import LLM  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,   # a smoke run
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
DEVICE = torch.device("cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def hbm_read_bandwidth(gib: float = 4.0, passes: int = 10) -> float:
    """Bytes per second of the fastest full read (a sum) of a `gib` GiB buffer on the GPU."""
    buf = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=DEVICE)
    best = float("inf")
    for _ in range(passes):
        sync()
        t = time.perf_counter()
        buf.sum(dtype=torch.float32)
        sync()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 2 / best


class _SyncClock(BaseStreamer):
    """When `generate` hands over each step's tokens, once the GPU has computed them."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def put(self, value) -> None:
        sync()
        self.marks.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def clock_hf_on_device(model, prompts: list[list[int]], new_tokens: int) -> list[float]:
    ids = torch.tensor(prompts, device=DEVICE)
    clock = _SyncClock()
    sync()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock)
    return [start] + clock.marks[1:]


def build_random_llama(shape: str, out: pathlib.Path, tokenizer):
    """The transformers model (on the GPU, to compare with) and its saved folder."""
    cfg = transformers.LlamaConfig(vocab_size=49152, max_position_embeddings=4096,
                                   bos_token_id=1, eos_token_id=2, **SHAPES[shape])
    torch.manual_seed(0)
    with DEVICE:
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return model, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="a saved tokenizer folder (SmolLM2's)")
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a smoke run of the script)")
    ap.add_argument("--keep", default=None, help="keep the first model's folder here")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu.json"))
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA GPU here")
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else cpu_bench._cpu_name()
    cpu_bench.wait_for_quiet = lambda *a, **k: -1.0   # GPU-bound: the CPU's pressure is moot
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    batches = [int(b) for b in args.batches.split(",")]
    bandwidth = hbm_read_bandwidth()
    print(f"{name}: memory read {bandwidth / 1e12:.2f} TB/s", flush=True)
    results = []
    for i, shape in enumerate(args.models.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            folder = pathlib.Path(args.keep) if args.keep and i == 0 else pathlib.Path(tmp) / shape
            hf, folder = build_random_llama(shape, folder, tokenizer)
            ours = LLM(str(folder), dtype="bfloat16", device=str(DEVICE), kv_cache_memory_gib=16,
                       max_num_batched_tokens=max(batches) * args.prompt_len)
            clocks = {"distserve": lambda p, n: cpu_bench.clock_ours(ours, p, n),
                      "transformers": lambda p, n: clock_hf_on_device(hf, p, n)}
            base = ours.tokenizer.encode("The history of the city begins with a small market "
                                         "by the river. " * 80)
            rows = []
            for b in batches:
                prompts = [base[j:j + args.prompt_len] for j in range(b)]
                for r in cpu_bench.measure(clocks, prompts, args.new_tokens, args.repeats):
                    rows.append(r)
                    print(f"  {shape} {r['engine']:<13} batch {b:>3}: decode "
                          f"{r['decode_tokens_per_s']:9.1f} tok/s (step {r['decode_step_ms']:6.2f} ms)"
                          f", prefill {r['prefill_tokens_per_s']:10.1f} tok/s", flush=True)
            weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
            step1 = next(r["decode_step_ms"] for r in rows
                         if r["engine"] == "distserve" and r["batch"] == 1)
            floor_ms = weight_bytes / bandwidth * 1e3
            results.append({"model": f"random Llama {shape}", "weight_bytes": weight_bytes,
                            "rows": rows, "decode_step_b1_ms": step1,
                            "bandwidth_floor_ms": floor_ms, "step_over_floor": step1 / floor_ms,
                            "decode_speedup_vs_transformers":
                                {b: cpu_bench._ratio(rows, b) for b in batches}})
            print(f"  {shape}: batch-1 step {step1:.2f} ms = {step1 / floor_ms:.2f}x the HBM "
                  f"floor ({floor_ms:.2f} ms); vs transformers " + ", ".join(
                      f"batch {b}: {v:.2f}x" for b, v in
                      results[-1]["decode_speedup_vs_transformers"].items()), flush=True)
            ours.close()
            ours = hf = clocks = None   # free the GPU for the next model
            torch.cuda.empty_cache()
    report = {"device": name, "torch": torch.__version__,
              "transformers": transformers.__version__, "hbm_read_TBps": bandwidth / 1e12,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "models": results}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
