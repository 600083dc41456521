"""`distserve` command line: serve | generate | bench | plan | simulate | profile.

Each sub-command lives with its package and registers itself here; a bad value ends with a
message naming it and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _register_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text for prompts with a local model")
    p.add_argument("prompts", nargs="+", help="prompt strings")
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: built-in SmolLM2)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    sampling = ("(default: the model's generation_config.json, else llama.cpp's %s; "
                "see docs/serving.md)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0: greedy " + sampling % "0.8")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass " + sampling % "0.95")
    p.add_argument("--top-k", type=int, default=None, help="-1: no top-k " + sampling % "40")
    p.add_argument("--seed", type=int, default=None, help="seeded sampling (reproducible)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    add_engine_args(p)
    p.set_defaults(func=_run_generate)


MODEL_TOPIC, ENGINE_TOPIC = "model and dtype", "engine and batching"
PARALLEL_TOPIC, TRANSFER_TOPIC = "parallel instances", "KV transfer (disaggregated)"


def arg_group(p: argparse.ArgumentParser, title: str):
    """The parser's argument group of this title, made on first use: flags that several
    modules add share one topic in --help."""
    for group in p._action_groups:
        if group.title == title:
            return group
    return p.add_argument_group(title)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that starts an engine instance, each under its topic."""
    g = arg_group(p, MODEL_TOPIC)
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda if present)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default: the model's)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument("--kv-cache-memory", type=float, default=None, dest="kv_cache_memory_gib",
                   help="KV cache budget in GiB per instance (default 2; serve gives less where "
                        "all instances' KV would take over half the memory available, and an "
                        "instance that decodes no more than --max-num-seqs requests of "
                        "--max-model-len tokens can hold)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="overrides --kv-cache-memory")
    g = arg_group(p, ENGINE_TOPIC)
    g.add_argument("--max-num-seqs", type=int, default=256, help="requests in one batch")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens in one batch (prompt chunks included)")
    g.add_argument("--policy", default="prefill-first", choices=["prefill-first", "chunked"],
                   help="colocated batching: prompts before decodes, or chunked prefill")
    g.add_argument("--num-threads", type=int, default=None, help="torch threads per worker")
    g.add_argument("--enforce-eager", action="store_true", help="CUDA: run every decode step "
                   "op by op instead of replaying it from a CUDA graph captured at start-up")
    g.add_argument("--num-scheduler-steps", type=int, default=1, help="greedy decoding on our "
                   "CPU kernels: tokens each request gets from one call of the model while only "
                   "decodes run and nothing waits (as vLLM's multi-step scheduling): the Python "
                   "between steps runs once per call, tokens stream in bursts, a prompt that "
                   "arrives meanwhile waits for the call; 1 = a call per token")
    g = arg_group(p, PARALLEL_TOPIC)
    g.add_argument("--tensor-parallel-size", "--tp", "-tp", type=int, default=1,
                   dest="tensor_parallel_size", help="workers that split each layer (attention "
                   "heads, FFN columns) of an instance, over torch.distributed")
    g.add_argument("--pipeline-parallel-size", "--pp", "-pp", type=int, default=1,
                   dest="pipeline_parallel_size", help="pipeline stages (layer ranges) of an "
                   "instance; each step runs as micro-batches through them")
    g = arg_group(p, TRANSFER_TOPIC)
    g.add_argument("--kv-checksum", action="store_true", help="disaggregated: verify every KV "
                   "block a decode instance pulls against the prefill side's checksum (CRC-32); "
                   "a request whose KV fails it is computed again, never decoded from bad KV")
    g.add_argument("--kv-pull-failure", choices=["recompute", "rerun"], default="recompute",
                   help="disaggregated: what a decode instance does with a request whose KV "
                   "pull failed twice (its prefill instance died, a checksum failed): compute "
                   "the prompt itself (recompute), or hand it back to run through a prefill "
                   "instance again (rerun: no prefill work on the decode instance)")


def engine_config_from_args(args: argparse.Namespace, model: str | None):
    from distserve.config import EngineConfig
    return EngineConfig(
        model=model, dtype=args.dtype, device=args.device, block_size=args.block_size,
        kv_cache_memory_gib=2.0 if args.kv_cache_memory_gib is None else args.kv_cache_memory_gib,
        num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, policy=args.policy, num_threads=args.num_threads,
        kv_checksum=args.kv_checksum, kv_pull_failure=args.kv_pull_failure,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size, enforce_eager=args.enforce_eager,
        num_scheduler_steps=args.num_scheduler_steps)


def sampling_from_args(args: argparse.Namespace):
    """generate's SamplingParams: each of --temperature/--top-p/--top-k given wins, the rest
    come from the model (greedy decoding of a small model loops); with where they came from."""
    from distserve.models.generation_config import KEYS, sampling_defaults
    from distserve.request import SamplingParams
    chosen = {key: getattr(args, key) for key in KEYS if getattr(args, key) is not None}
    source = "the command line"
    if len(chosen) < len(KEYS):
        defaults, source = sampling_defaults(args.model)
        chosen = {**defaults, **chosen}
    return SamplingParams(max_tokens=args.max_tokens, seed=args.seed, **chosen), source


def _run_generate(args: argparse.Namespace) -> int:
    from distserve.llm import LLM
    params, source = sampling_from_args(args)
    print(f"sampling: temperature {params.temperature:g}, top_p {params.top_p:g}, top_k "
          f"{params.top_k} ({source}; --temperature 0 for greedy)", file=sys.stderr)
    llm = LLM.from_config(engine_config_from_args(args, args.model))
    prompts = args.prompts
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                     tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    for prompt, result in zip(args.prompts, llm.generate(prompts, params)):
        if len(prompts) > 1:
            print(f"--- {prompt!r} ({result.finish_reason})")
        print(result.text)
    return 0


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's default in --help, where argparse's own formatter shows it only for
    options whose help mentions it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "%(default)" not in text and "default" not in text
                and "key" not in action.dest):   # an API key from the environment stays unsaid
            text += (" " if text else "") + "(default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distserve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _register_generate(sub)
    for module in ("distserve.server.cli", "distserve.bench.cli", "distserve.planner.cli",
                   "distserve.tune.cli", "distserve.doctor"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError as e:
            if e.name != module:
                raise
            continue
        mod.register(sub)
    for command in sub.choices.values():
        command.formatter_class = DefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"distserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `distserve plan ... | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
