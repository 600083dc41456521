"""Engine throughput against Hugging Face transformers, and the decode step against the
memory-bandwidth and compute floors, measured side by side in one run.

    python benchmarks/engine.py [--quick] [--out benchmarks/results/engine.json]

For each model (the built-in SmolLM2-135M and a random-weight Llama of about 1.1 GB of
bf16 weights) and each batch size, both engines generate the same number of tokens from the
same prompts, greedily. Every step is timed inside one generation (our engine's steps; a
streamer's clock in transformers' `generate`), so a run gives its prefill time (start to
first token) and the median of its decode steps. The machine may be shared, so each run
waits for a quiet moment (Linux CPU pressure), runs of the two engines alternate, and each
engine keeps its best run: noise from other processes only ever slows a run down. Decode
tokens/s = batch / median step; prefill tokens/s = prompt tokens / prefill time. The floor
of a decode step is weight bytes / read bandwidth, the fastest streaming read of a buffer
far larger than the caches, measured in the same run (the best of all its readings, those
around our batch-1 runs included; and, for each batch-1 run of ours, the reading just before
or after it, whichever is faster: this host's memory speed moves by up to 2x from minute to
minute); at batch 32 also its FLOPs / the
fastest large bf16 matmul measured in the same run (oneDNN's or ours): a batch-32 step is
as much compute as memory on two cores.

An AVX2-only CPU, on a CPU with AVX-512 (every library held to AVX2; recorded in the JSON):

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        DISTSERVE_CPU_ISA=avx2 python benchmarks/engine.py --out /tmp/engine_avx2.json
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from distserve import LLM, SamplingParams, doctor
from distserve.models import huge_pages, paged_kernel
from distserve.models.loader import resolve_dtype
from distserve.models.packed_linear import _onednn_bf16 as native_bf16
from distserve.models.packed_linear import amx_pack, block_kernel, block_linear_op

ROOT = pathlib.Path(__file__).resolve().parent.parent
ADJACENT_GIB = 0.5   # the read around each batch-1 run: 16x the L3 cache, ~50 ms
ISA_OVERRIDES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "DISTSERVE_CPU_ISA")


def read_bandwidth(gib: float = 2.0, passes: int = 5) -> float:
    """Bytes per second of the fastest of a few full reads of a `gib` GiB buffer.

    Kernels that read every byte once, on every thread torch uses: a sum, a matrix-vector
    product over the same bytes (MKL's gemv streams faster than torch's reduction on some
    CPUs) and, where it is built, our linear kernel (AMX, AVX512-BF16 or AVX2) at one row over
    the buffer taken as a packed weight (on an AMX machine it outran both).
    Each over a buffer from torch's allocator and one on huge pages (where our packed weights
    live: see models/huge_pages.py). The floor is meant to be unbeatable, so the best pass of
    any counts.
    """
    nbytes = int(gib * 2**30) // 4 * 4
    kernel = block_kernel(2048)
    readers = []
    for buf in (torch.ones(nbytes // 4), huge_pages.zeroed_bytes(nbytes).view(torch.float32).fill_(1.0)):
        mat, vec = buf.view(-1, 1024), torch.ones(1024)
        readers += [buf.sum, lambda mat=mat, vec=vec: torch.mv(mat, vec)]
        if kernel:
            blocks = nbytes // (32 * 2048 * 2)
            packed = buf[: blocks * 32 * 1024].view(torch.bfloat16).view(blocks, 64, 16, 32, 2)
            x, out = torch.zeros(1, 2048, dtype=torch.bfloat16), torch.empty(1, blocks * 32, dtype=torch.bfloat16)
            readers.append(lambda op=block_linear_op(kernel), out=out, x=x, packed=packed: op(out, x, packed, None))
    return nbytes / fastest(readers, passes)


def matmul_peak(rows: int = 1024, passes: int = 5) -> float:
    """FLOP/s of the fastest of a few large matmuls ([rows, 2048] x [2048, 4096]): float32 by
    torch, bf16 by oneDNN (on its own weight layout) where the CPU has native bf16, and by our
    linear kernel where it is built: the rate no decode step can beat, since a step's FLOPs
    are at least 2 x batch x parameters."""
    x = torch.randn(rows, 2048, dtype=torch.bfloat16)
    w = torch.randn(4096, 2048, dtype=torch.bfloat16) * 0.02
    xf, wf = x.float(), w.float()
    runs = [lambda: torch.mm(xf, wf.T)]   # float32: what CPUs without bf16 compute in
    if native_bf16():
        onednn = torch.ops.mkldnn._reorder_linear_weight(w, 32)
        runs.append(lambda: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], ""))
    kernel = block_kernel(2048)
    if kernel:
        packed, out = amx_pack(w), torch.empty(rows, 4096, dtype=torch.bfloat16)
        op = block_linear_op(kernel)
        runs.append(lambda: op(out, x, packed, None))
    return 2 * rows * 2048 * 4096 / fastest(runs, passes)


def fastest(fns: list, passes: int) -> float:
    """Seconds of the fastest call of any of `fns`, each called `passes` times, in turn."""
    best = float("inf")
    for _ in range(passes):
        for fn in fns:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


def wait_for_quiet(limit_s: float = 30.0, threshold: float = 5.0) -> float:
    """Wait (at most `limit_s`) until other processes stop competing for the CPU.

    Reads Linux's CPU pressure (the share of the last 10 s in which a runnable task waited
    for a core); returns the last reading, or -1 where the kernel does not report it.
    """
    path = pathlib.Path("/proc/pressure/cpu")
    if not path.exists():
        return -1.0
    deadline = time.monotonic() + limit_s
    while True:
        pressure = float(path.read_text().split()[1].split("=")[1])
        if pressure < threshold or time.monotonic() > deadline:
            return pressure
        time.sleep(1.0)


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


def clock_ours(llm: LLM, prompts: list[list[int]], new_tokens: int, steps: int = 1) -> list[float]:
    """Start time, then the time each token was done: the end of every step that produced
    tokens, where a step that gave each request k tokens (`steps` a call: the engine's
    num_scheduler_steps) counts as k steps of equal length."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    engine = llm.engine
    before, engine.config.num_scheduler_steps = engine.config.num_scheduler_steps, steps
    marks = [time.perf_counter()]
    for p in prompts:
        engine.add(p, params)
    while engine.has_unfinished:
        outputs = engine.step().outputs
        if outputs:
            now, last = time.perf_counter(), marks[-1]
            k = max(collections.Counter(o.request_id for o in outputs).values())
            marks.extend(last + (now - last) * (i + 1) / k for i in range(k))
    engine.config.num_scheduler_steps = before
    return marks


class _Clock(BaseStreamer):
    """A streamer that only notes when `generate` hands over each step's tokens."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def put(self, value) -> None:
        self.marks.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def clock_hf(model, prompts: list[list[int]], new_tokens: int) -> list[float]:
    ids = torch.tensor(prompts)
    clock = _Clock()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock)
    return [start] + clock.marks[1:]  # the first put is the prompt itself


def measure(clocks: dict, prompts: list[list[int]], new_tokens: int, repeats: int,
            floor_around: tuple = ()) -> list[dict]:
    """Alternate the engines' runs; keep each engine's fastest prefill and decode. Around
    each run of the engines `floor_around` names, the read bandwidth of that moment too."""
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in clocks}
    adjacent: dict[str, list[float]] = {name: [] for name in floor_around}
    for name, clock in clocks.items():  # warm-up at these shapes: kernels are picked and built
        clock(prompts, new_tokens)
    for _ in range(repeats):
        for name, clock in clocks.items():
            pressure = wait_for_quiet()
            before = read_bandwidth(ADJACENT_GIB, 2) if name in adjacent else None
            marks = clock(prompts, new_tokens)
            if before is not None:
                adjacent[name].append(max(before, read_bandwidth(ADJACENT_GIB, 2)))
            if len(marks) != new_tokens + 1:
                raise RuntimeError(f"{name}: {len(marks) - 1} steps for {new_tokens} tokens")
            steps = [b - a for a, b in itertools.pairwise(marks[1:])]
            runs[name].append((marks[1] - marks[0], statistics.median(steps), pressure))
    b, plen = len(prompts), len(prompts[0])
    rows = []
    for name, rs in runs.items():
        prefill, step = min(r[0] for r in rs), min(r[1] for r in rs)
        rows.append({"engine": name, "batch": b, "prompt_len": plen, "new_tokens": new_tokens,
                     "prefill_tokens_per_s": b * plen / prefill, "decode_step_ms": step * 1e3,
                     "decode_tokens_per_s": b / step,
                     "decode_step_ms_per_run": [round(r[1] * 1e3, 2) for r in rs],
                     "cpu_pressure_at_start_per_run": [r[2] for r in rs]})
        if name in adjacent:
            rows[-1]["adjacent_read_GBps_per_run"] = [round(b / 1e9, 2) for b in adjacent[name]]
    return rows


def bench_model(label: str, ours: LLM, hf, batches: list[int], prompt_len: int,
                new_tokens: int, repeats: int, ours_float32: LLM | None = None,
                steps: int = 1) -> dict:
    # transformers lists a tied embedding once: these are the bytes a decode step reads, at
    # our engine's dtype (transformers may run float32 where the CPU has no native bf16)
    itemsize = torch.empty((), dtype=ours.engine.executor.worker.dtype).element_size()
    weight_bytes = sum(p.numel() * itemsize for p in hf.parameters())
    c = hf.config  # K and V bytes per token of context, read again at every decode step
    kv_bytes_per_token = (2 * c.num_hidden_layers * c.num_key_value_heads
                          * (c.hidden_size // c.num_attention_heads) * 2)
    base = ours.tokenizer.encode("The history of the city begins with a small market by the river. " * 40)
    clocks = {"distserve": lambda p, n: clock_ours(ours, p, n),
              "transformers": lambda p, n: clock_hf(hf, p, n)}
    if ours_float32 is not None:
        clocks["distserve-float32"] = lambda p, n: clock_ours(ours_float32, p, n)
    multi = f"distserve-{steps}-steps"   # the same engine, `steps` tokens a call
    if steps > 1:
        clocks[multi] = lambda p, n: clock_ours(ours, p, n, steps)
    rows = []
    for b in batches:
        prompts = [base[i:i + prompt_len] for i in range(b)]
        around = ("distserve", multi) if b == 1 else ()
        for r in measure(clocks, prompts, new_tokens, repeats, around):
            rows.append(r)
            print(f"  {label:<22} {r['engine']:<13} batch {b:>3}: decode {r['decode_tokens_per_s']:8.1f}"
                  f" tok/s (step {r['decode_step_ms']:7.1f} ms), prefill"
                  f" {r['prefill_tokens_per_s']:8.1f} tok/s", flush=True)
    # each run's step over the floor at the bandwidth read just before and after it: the host's
    # memory speed moves by up to 2x from minute to minute, the run's best may not be this one's
    for r in rows:
        if "adjacent_read_GBps_per_run" in r:
            over = [ms / (weight_bytes / (gbps * 1e9) * 1e3)
                    for ms, gbps in zip(r["decode_step_ms_per_run"], r["adjacent_read_GBps_per_run"])]
            r["step_over_adjacent_floor_per_run"] = [round(a, 3) for a in over]
            r["step_over_adjacent_floor_median"] = statistics.median(over)
    ours1 = next(r for r in rows if r["engine"] == "distserve" and r["batch"] == 1)
    step1 = ours1["decode_step_ms"]
    multi1 = next((r for r in rows if r["engine"] == multi and r["batch"] == 1), None)
    return {"model": label, "weight_bytes": weight_bytes, "rows": rows,
            "kv_bytes_per_token": kv_bytes_per_token,
            "attention_width": c.num_hidden_layers * c.num_attention_heads * (c.hidden_size // c.num_attention_heads), "prompt_len": prompt_len,
            "new_tokens": new_tokens, "decode_step_b1_ms": step1,
            "step_over_adjacent_floor_per_run": ours1["step_over_adjacent_floor_per_run"],
            "step_over_adjacent_floor_median": ours1["step_over_adjacent_floor_median"],
            "scheduler_steps": steps,
            "decode_step_b1_ms_multi_step": multi1["decode_step_ms"] if multi1 else None,
            "dtype": str(ours.engine.executor.worker.dtype).removeprefix("torch."),
            "transformers_dtype": str(hf.dtype).removeprefix("torch."),
            "decode_speedup_vs_transformers": {b: _ratio(rows, b) for b in batches}}


def _ratio(rows: list[dict], batch: int) -> float:
    get = lambda e: next(r["decode_tokens_per_s"] for r in rows if r["engine"] == e and r["batch"] == batch)
    return get("distserve") / get("transformers")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/engine.json"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="auto", help="our engine's dtype (auto: what it picks here)")
    ap.add_argument("--models", default="smollm2,llama-1g", help="which of smollm2 and "
                    "llama-1g (the random 1.1 GB Llama) to run")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes (the batch-32 floor needs 32)")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each engine (default 4; 2 with --quick)")
    ap.add_argument("--num-scheduler-steps", type=int, default=8, help="also our engine at "
                    "this many greedy tokens a call, per token (1: not)")
    ap.add_argument("--with-float32", action="store_true",
                    help="also our engine in float32 (what CPUs without native bf16 ran before "
                         "the AVX2 kernels)")
    args = ap.parse_args(argv)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    # transformers at its fastest dtype here: bf16 needs native bf16 (else it is emulated)
    hf_dtype = torch.bfloat16 if native_bf16() else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens, repeats = (8, 2) if args.quick else (32, 4)
    repeats = args.repeats or repeats
    batches = [int(b) for b in args.batches.split(",")]
    models = set(args.models.split(","))
    if not models <= {"smollm2", "llama-1g"} or 1 not in batches:
        ap.error(f"--models takes smollm2 and/or llama-1g, --batches must include 1; got "
                 f"{args.models!r} and {args.batches!r}")
    results = []
    bandwidths, peaks = [], []

    def measure_bandwidth() -> None:  # before each model; the best of the run is the floor
        wait_for_quiet()
        bandwidths.append(read_bandwidth())
        peaks.append(matmul_peak())
        print(f"read bandwidth {bandwidths[-1] / 1e9:.1f} GB/s, bf16 matmul {peaks[-1] / 1e9:.0f} GFLOP/s, "
              f"{torch.get_num_threads()} threads", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        measure_bandwidth()
        if "smollm2" in models:
            small = LLM(None, dtype=dtype, num_kv_blocks=1024)
            small32 = LLM(None, dtype="float32", num_kv_blocks=1024) if args.with_float32 else None
            from distserve.models.locate import find_default_gguf
            gguf = find_default_gguf()
            # dequantised (else transformers may keep the GGUF blocks)
            hf_small = transformers.AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=hf_dtype,
                quantization_config=transformers.GgufConfig(gguf_file=gguf.name, dequantize=True)).eval()
            results.append(bench_model(f"SmolLM2-135M ({_short(dtype)})", small, hf_small, batches,
                                       64, new_tokens, repeats, small32, args.num_scheduler_steps))
            del small, small32, hf_small
        if "llama-1g" in models:
            folder = build_random_llama(pathlib.Path(tmp) / "llama-1g", transformers_tokenizer())
            big = LLM(str(folder), dtype=dtype, num_kv_blocks=512)
            big32 = LLM(str(folder), dtype="float32", num_kv_blocks=512) if args.with_float32 else None
            hf_big = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=hf_dtype).eval()
            if "smollm2" in models:
                measure_bandwidth()
            results.append(bench_model("random Llama 1.1 GB", big, hf_big, batches, 64,
                                       new_tokens, repeats, big32, args.num_scheduler_steps))
    # the floor is the fastest read of the whole run, the reads around each batch-1 run included:
    # the two long reads alone may both fall in one of this host's slow minutes
    adjacent = [gbps * 1e9 for m in results for r in m["rows"] for gbps in r.get("adjacent_read_GBps_per_run", [])]
    best_bw, peak = max(bandwidths + adjacent), max(peaks)
    for m in results:
        m["bandwidth_floor_ms"] = m["weight_bytes"] / best_bw * 1e3
        m["step_over_floor"] = m["decode_step_b1_ms"] / m["bandwidth_floor_ms"]
        if m["decode_step_b1_ms_multi_step"]:
            m["step_over_floor_multi_step"] = m["decode_step_b1_ms_multi_step"] / m["bandwidth_floor_ms"]
        m["batch32"] = batch32_floor(m, best_bw, peak) if 32 in batches else None
    report = {"machine": doctor._cpu_name(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "read_bandwidth_GBps": best_bw / 1e9,
              "read_bandwidth_GBps_per_measurement": [round(b / 1e9, 2) for b in bandwidths],
              "read_bandwidth_GBps_around_batch1_runs": [round(b / 1e9, 2) for b in adjacent],
              "matmul_peak_GFLOPs": peak / 1e9, "matmul_peak_GFLOPs_per_measurement": [round(p / 1e9) for p in peaks],
              "linear_kernel": block_kernel(2048) or "onednn", "kernel_isa": paged_kernel.kernel_isa(),
              "cpu_features": sorted(f for f, on in doctor.report()["cpu_features"].items() if on),
              "isa_overrides": {k: os.environ[k] for k in ISA_OVERRIDES if k in os.environ},
              "quick": args.quick, "new_tokens": new_tokens, "repeats": repeats, "models": results}
    print()
    for m in results:
        s = m["decode_speedup_vs_transformers"]
        print(f"{m['model']}: decode speed-up vs transformers " +
              ", ".join(f"batch {b}: {v:.2f}x" for b, v in s.items()) +
              f"; batch-1 step {m['decode_step_b1_ms']:.1f} ms = {m['step_over_floor']:.2f}x the "
              f"bandwidth floor ({m['bandwidth_floor_ms']:.1f} ms at {best_bw / 1e9:.1f} GB/s); each run's "
              f"over the floor read around it: {m['step_over_adjacent_floor_per_run']} "
              f"(median {m['step_over_adjacent_floor_median']:.2f}x)")
        if m["decode_step_b1_ms_multi_step"]:
            r = next(r for r in m["rows"] if r["engine"].endswith("-steps") and r["batch"] == 1)
            print(f"  {m['scheduler_steps']} tokens a call: batch-1 {m['decode_step_b1_ms_multi_step']:.1f} ms "
                  f"a token = {m['step_over_floor_multi_step']:.2f}x the floor; each run's over the "
                  f"read around it: {r['step_over_adjacent_floor_per_run']} (median "
                  f"{r['step_over_adjacent_floor_median']:.2f}x)")
        b32 = m["batch32"]
        if b32 is None:
            continue
        print(f"  batch 32: step {b32['step_ms']:.1f} ms, floor {b32['floor_ms']:.1f} ms (weights + "
              f"mean context K/V at {best_bw / 1e9:.1f} GB/s); compute floor {b32['compute_floor_ms']:.1f} ms "
              f"({b32['gflop']:.1f} GFLOP at {peak / 1e9:.0f} GFLOP/s); 3x transformers needs "
              f"{b32['step_for_3x_ms']:.1f} ms = {b32['step_for_3x_over_floor']:.2f}x the bandwidth floor, "
              f"{b32['step_for_3x_over_compute_floor']:.2f}x the compute floor")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"saved {out}")
    return 0


def batch32_floor(m: dict, bandwidth: float, peak_flops: float) -> dict:
    """What a batch-32 decode step must read at least (every weight once and every request's
    K/V, mean context over the run) and compute at least (2 FLOPs per weight per request,
    the tied embedding once as the output layer, and attention's q.k and p.v over the
    context), and the step that 3x transformers' throughput needs."""
    row = lambda e: next(r for r in m["rows"] if r["engine"] == e and r["batch"] == 32)
    context = m["prompt_len"] + m["new_tokens"] / 2
    floor_s = (m["weight_bytes"] + 32 * context * m["kv_bytes_per_token"]) / bandwidth
    flops = 32 * (2 * m["weight_bytes"] / 2 + 4 * context * m["attention_width"])
    compute_s = flops / peak_flops
    target_ms = row("transformers")["decode_step_ms"] / 3
    return {"step_ms": row("distserve")["decode_step_ms"], "floor_ms": floor_s * 1e3,
            "gflop": flops / 1e9, "compute_floor_ms": compute_s * 1e3,
            "step_for_3x_ms": target_ms, "step_for_3x_over_floor": target_ms / (floor_s * 1e3),
            "step_for_3x_over_compute_floor": target_ms / (compute_s * 1e3),
            "step_over_floor": row("distserve")["decode_step_ms"] / (floor_s * 1e3),
            "step_over_compute_floor": row("distserve")["decode_step_ms"] / (compute_s * 1e3)}


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]


def transformers_tokenizer():
    from distserve.models.loader import find_model, load_tokenizer_for
    return load_tokenizer_for(find_model(None))


if __name__ == "__main__":
    sys.exit(main())
