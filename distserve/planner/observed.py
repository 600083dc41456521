"""`distserve plan --from-metrics URL`: re-plan from what a running server observed.

A server started with `serve --plan` keeps the lengths of its recent requests and their
arrival rate (server.plan_monitor) and serves them at GET /v1/observed_workload. This reads
them and fills in what `plan` was not told: the model and SLOs of the plan the server runs,
the observed rate as the target, and the observed lengths (written to a JSON file, beside
the plan when `-o` is given, so a server of the new plan can watch for drift against them).
Never imports torch.
"""
from __future__ import annotations

import json
import os
import tempfile

MIN_REQUESTS = 10


def fetch_observed(url: str, timeout: float = 10.0) -> dict:
    """The server's observed workload; url is its root (or its /metrics address)."""
    import httpx
    base = url.rstrip("/").removesuffix("/metrics").removesuffix("/v1")
    try:
        r = httpx.get(f"{base}/v1/observed_workload", timeout=timeout)
    except httpx.HTTPError as e:
        raise ValueError(f"--from-metrics {url}: the server cannot be reached ({e})") from None
    if r.status_code != 200:
        raise ValueError(f"--from-metrics {url}: the server answered {r.status_code} "
                         f"({r.text[:200]}); it must run with --plan")
    doc = r.json()
    n = len(doc.get("lengths") or [])
    if n < MIN_REQUESTS:
        raise ValueError(f"--from-metrics {url}: the server has observed {n} finished requests; "
                         f"at least {MIN_REQUESTS} are needed to plan from")
    return doc


def apply_observed(args, doc: dict) -> str:
    """Fill args (model, SLOs, rate, workload) from the observed workload where the command
    line left them unset; returns the path of the lengths file written."""
    args.model = args.model or doc["model"]
    args.ttft_slo = args.ttft_slo if args.ttft_slo is not None else doc["ttft_slo"]
    args.tpot_slo = args.tpot_slo if args.tpot_slo is not None else doc["tpot_slo"]
    if args.rate is None and doc.get("arrival_rate", 0) > 0:
        args.rate = float(doc["arrival_rate"])
    if args.output:
        path = os.path.splitext(args.output)[0] + ".workload.json"
    else:
        fd, path = tempfile.mkstemp(prefix="observed-workload-", suffix=".json")
        os.close(fd)
    with open(path, "w", encoding="utf-8") as f:
        json.dump([{"input_len": int(i), "output_len": int(o)} for i, o in doc["lengths"]], f)
    args.workload = path
    return path
