"""`distserve bench`: measure goodput of any OpenAI-compatible deployment (ours, vLLM, SGLang).

Builds the workload, checks the server with one test request, runs each rate, prints
vllm bench serve's block plus SLO attainment, and for sweeps the goodput where attainment
crosses the target; saves JSON and a plot. Exit codes: 0 measured, 1 nothing could be measured
(server unreachable, every request failed), 2 bad arguments, 130 interrupted (partial results
saved). `register(subparsers)` plugs it into the `distserve` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field

from distserve.bench.workload import DATASETS, DEFAULT_MAX_TOTAL_LEN, WorkloadError

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default=DEFAULT_BASE_URL, help="server root, e.g. http://127.0.0.1:8000")
    g.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    g.add_argument("--model", help="model name to request (default: the server's first in /v1/models)")
    g.add_argument("--tokenizer", help="tokenizer of the served model (default: --model if it is a "
                   "local path, else the built-in SmolLM2 tokenizer)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)")
    g.add_argument("--num-gpus", type=int, help="GPUs of the deployment, for per-GPU goodput (default: "
                   "the server's num_gpus in /v1/models, else 1)")
    g.add_argument("--request-timeout", type=float, default=1800.0, help="seconds before a request counts as failed")
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=DATASETS, default="sharegpt", help="the workload's prompts")
    g.add_argument("--dataset-path", help="ShareGPT JSON, HumanEval JSONL(.gz) or a jsonl trace of "
                   "{prompt, output_len} (default: the packaged copy)")
    g.add_argument("--num-prompts", type=int, help="requests per run (default 1000; jsonl: all lines)")
    g.add_argument("--max-total-len", type=int, default=DEFAULT_MAX_TOTAL_LEN,
                   help="drop requests whose prompt + output reaches this many tokens")
    g.add_argument("--random-input-len", type=int, default=1024, help="random: prompt tokens")
    g.add_argument("--random-output-len", type=int, default=128, help="random: output tokens")
    g.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in len*(1 -/+ ratio)")
    g.add_argument("--seed", type=int, default=0, help="prompts and arrivals")
    g.add_argument("--dry-run", action="store_true", help="print the workload's length distribution; send nothing")
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", default="inf", help="req/s: one value, a list 0.5,1,2,4, a range "
                   "start:stop:step, or inf (all at once)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    g.add_argument("--max-concurrency", type=int, help="most requests in flight at once")
    g.add_argument("--ignore-eos", action="store_true", help="ask the server to generate exactly max_tokens")
    g = p.add_argument_group("SLOs and output")
    g.add_argument("--ttft-slo", type=float, help="TTFT SLO in seconds")
    g.add_argument("--tpot-slo", type=float, help="TPOT SLO in seconds")
    g.add_argument("--slo-scale", default="1", help="multiply both SLOs: one value or a list/range to sweep")
    g.add_argument("--attainment", type=float, default=90.0, help="attainment target in %% for goodput")
    g.add_argument("--save-result", metavar="FILE", help="write the results as JSON")
    g.add_argument("--plot", metavar="FILE", help="draw attainment vs rate (or SLO scale) as a PNG")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bars")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="measure goodput of an OpenAI-compatible server",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="distserve bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


@dataclass
class State:
    """What a run has produced so far, so an interruption can still save it."""

    results: list = field(default_factory=list)
    records: list = field(default_factory=list)
    current: tuple | None = None  # (RunConfig, Workload, start time) of the run in progress


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run(args) -> int:
    from distserve.bench.sweep import parse_values

    try:
        rates = parse_values(args.request_rate, "--request-rate")
        scales = parse_values(args.slo_scale, "--slo-scale")
    except ValueError as exc:
        return _fail(str(exc), 2)
    has_slo = args.ttft_slo is not None or args.tpot_slo is not None
    if len(rates) > 1 and len(scales) > 1:
        return _fail("sweep either --request-rate or --slo-scale, not both", 2)
    if not args.dry_run and (len(rates) > 1 or len(scales) > 1 or args.plot) and not has_slo:
        return _fail("a sweep or --plot needs --ttft-slo and/or --tpot-slo", 2)
    if not 0 < args.attainment <= 100:
        return _fail(f"--attainment must be in (0, 100], got {args.attainment}", 2)
    for name in ("ttft_slo", "tpot_slo", "num_gpus", "max_concurrency", "request_timeout", "burstiness"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            return _fail(f"--{name.replace('_', '-')} must be > 0, got {value}", 2)
    from distserve.slo import check_slo_seconds
    try:
        check_slo_seconds(args.ttft_slo, args.tpot_slo)
    except ValueError as exc:
        return _fail(str(exc), 2)
    from distserve.bench.workload import load_tokenizer, tokenizer_spec

    try:
        tokenizer = load_tokenizer(tokenizer_spec(args.tokenizer, args.model))
        if args.dry_run:
            return _dry_run(args, tokenizer)
        first = _workload(args, tokenizer, args.seed)  # bad workload input fails before any request
        state = State()
        try:
            return asyncio.run(_bench(args, tokenizer, first, rates, scales, state))
        except KeyboardInterrupt:
            _save_partial(args, state)
            return _fail("interrupted; partial results saved" if args.save_result else "interrupted", 130)
    except WorkloadError as exc:
        return _fail(str(exc), 2)


def _workload(args, tokenizer, seed: int):
    from distserve.bench.workload import build_workload

    return build_workload(args.dataset, tokenizer, args.num_prompts, seed, dataset_path=args.dataset_path,
                          max_total_len=args.max_total_len, random_input_len=args.random_input_len,
                          random_output_len=args.random_output_len, random_range_ratio=args.random_range_ratio)


def _dry_run(args, tokenizer) -> int:
    from distserve.bench.report import save_json
    from distserve.bench.workload import format_length_stats, length_stats

    workload = _workload(args, tokenizer, args.seed)
    print(format_length_stats(workload))
    if args.save_result:
        save_json(args.save_result, {"dry_run": True, "dataset": workload.name, "dataset_note": workload.note,
                                     "seed": args.seed, "lengths": length_stats(workload.requests)})
    return 0


def _save(args, doc: dict) -> None:
    if args.save_result:
        from distserve.bench.report import save_json

        save_json(args.save_result, doc)
        print(f"results saved to {args.save_result}", file=sys.stderr)


async def _bench(args, tokenizer, first_workload, rates, scales, state: State) -> int:
    """Check the server, run every rate, report; the exit code."""
    from distserve.bench.report import format_result
    from distserve.bench.runner import RunConfig, run_requests
    from distserve.bench.sweep import make_result

    def count_tokens(text: str) -> int:  # output length when a server sends no usage
        return len(tokenizer.encode(text))

    if first_workload.note:
        print(f"Dataset: {first_workload.name}: {first_workload.note}")
    checked = await _check_server(args, first_workload, count_tokens)
    if isinstance(checked, int):
        return checked
    model, num_gpus = checked
    scale = scales[0] if len(scales) == 1 else 1.0
    ttft_slo = None if args.ttft_slo is None else args.ttft_slo * scale
    tpot_slo = None if args.tpot_slo is None else args.tpot_slo * scale
    extra = {"tokenizer": _tokenizer_name(args), "num_gpus": num_gpus, "slo_scale": scale}
    for i, rate in enumerate(rates):
        workload = first_workload if i == 0 else _workload(args, tokenizer, args.seed + i)
        cfg = RunConfig(args.base_url.rstrip("/"), model, args.endpoint, rate, args.burstiness,
                        args.max_concurrency, args.seed + i, args.ignore_eos, args.request_timeout,
                        args.api_key, not args.disable_tqdm, f"rate {rate:g} req/s")
        state.records = []
        state.current = (cfg, workload, time.perf_counter(), extra, ttft_slo, tpot_slo)
        duration = await run_requests(cfg, workload.requests, state.records, count_tokens)
        state.current = None
        state.results.append(make_result(cfg, workload, state.records, duration, ttft_slo, tpot_slo, extra))
        print(format_result(state.results[-1]))
    return _report(args, state, rates, scales, model, num_gpus, first_workload.name)


def _tokenizer_name(args) -> str:
    from distserve.bench.workload import tokenizer_spec

    return tokenizer_spec(args.tokenizer, args.model) or "default"


async def _check_server(args, workload, count_tokens):
    """(model, GPU count) from /v1/models and one test request; or the exit code of a failure."""
    import httpx

    from distserve.bench.client import build_payload, send_request, server_info
    from distserve.bench.report import record_json
    from distserve.bench.runner import make_client

    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        async with make_client(10.0) as client:
            info = await server_info(client, base_url, headers)
    except httpx.HTTPError as exc:
        message = f"cannot reach the server at {base_url}: {type(exc).__name__}: {exc}"
        _save(args, {"error": message, "base_url": base_url, "num_success": 0, "num_failed": 0, "requests": []})
        return _fail(message, 1)
    model = args.model or (info["models"][0] if info["models"] else None)
    if not model:
        return _fail(f"{base_url}/v1/models lists no model ({info.get('error', 'empty')}); pass --model", 1)
    chat = "chat" in args.endpoint
    first = workload.requests[0]
    print("Sending a test request...", file=sys.stderr)
    async with make_client(args.request_timeout) as client:
        test = await send_request(client, base_url + args.endpoint,
                                  build_payload(model, first.prompt, first.output_len, chat, args.ignore_eos),
                                  first.input_len, headers, args.request_timeout, chat, count_tokens)
    if not test.success:
        message = f"the test request to {base_url}{args.endpoint} failed: {test.error}"
        _save(args, {"error": message, "base_url": base_url, "model": model, "num_success": 0,
                     "num_failed": 1, "requests": [record_json(test)]})
        return _fail(message, 1)
    return model, args.num_gpus or info["num_gpus"] or 1


def _report(args, state: State, rates, scales, model: str, num_gpus: int, dataset: str) -> int:
    """Sweep table, JSON and plot after the runs; the exit code."""
    from distserve.bench import sweep
    from distserve.bench.report import format_sweep

    target = args.attainment / 100.0
    first = state.results[0]
    doc, sweep_doc = first, None
    if len(rates) > 1:
        sweep_doc = sweep.rate_sweep(state.results, target, num_gpus)
        doc = {**sweep_doc, "model": model, "dataset": dataset,
               "ttft_slo": first["ttft_slo"], "tpot_slo": first["tpot_slo"],
               "num_success": sum(r["num_success"] for r in state.results),
               "num_failed": sum(r["num_failed"] for r in state.results), "runs": state.results}
    elif len(scales) > 1:
        sweep_doc = sweep.scale_sweep(state.records, first, scales, args.ttft_slo, args.tpot_slo, target)
        doc = {**first, "slo_scale_sweep": sweep_doc}
    elif first["slo_attainment"] is not None:
        sweep_doc = sweep.rate_sweep(state.results, target, num_gpus)
    if sweep_doc is not None and len(sweep_doc["points"]) > 1:
        print(format_sweep(sweep_doc))
    _save(args, doc)
    if args.plot and sweep_doc is not None:
        from distserve.bench.plot import plot_sweep

        slos = f"TTFT {args.ttft_slo or '-'} s, TPOT {args.tpot_slo or '-'} s"
        plot_sweep(sweep_doc, args.plot, f"{model} / {dataset} / {slos}")
        print(f"plot saved to {args.plot}", file=sys.stderr)
    if not any(r["num_success"] for r in state.results):
        errors = [r["error"] for res in state.results for r in res["requests"] if r["error"]]
        return _fail(f"no request succeeded (first error: {errors[0] if errors else 'none'})", 1)
    return 0


def _save_partial(args, state: State) -> None:
    """After an interruption: finished runs, plus the run in progress as far as it got."""
    from distserve.bench.sweep import make_result

    results = list(state.results)
    if state.current is not None and state.records:
        cfg, workload, start, extra, ttft_slo, tpot_slo = state.current
        partial = make_result(cfg, workload, state.records, time.perf_counter() - start, ttft_slo, tpot_slo,
                              {**extra, "interrupted": True})
        results.append(partial)
    if results:
        _save(args, results[0] if len(results) == 1 else {
            "kind": "rate_sweep", "interrupted": True, "runs": results,
            "num_success": sum(r["num_success"] for r in results),
            "num_failed": sum(r["num_failed"] for r in results)})


if __name__ == "__main__":
    sys.exit(main())
