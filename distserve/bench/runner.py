"""One benchmark run: send a workload's requests on their arrival schedule, at most
`max_concurrency` at a time, and collect one record per request.

Records land in the caller's list as the run goes, so an interrupted run still leaves every
request accounted for: finished ones as they ended, the rest as failures ("cancelled")."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass

import httpx

from distserve.bench.arrivals import arrival_offsets
from distserve.bench.client import build_payload, send_request
from distserve.bench.metrics import RequestRecord
from distserve.bench.workload import BenchRequest


@dataclass
class RunConfig:
    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = False
    request_timeout: float | None = 3600.0
    api_key: str | None = None
    progress: bool = True
    desc: str = ""

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def chat(self) -> bool:
        return "chat" in self.endpoint

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def make_client(timeout: float | None = None) -> httpx.AsyncClient:
    """No pool limit: the load generator, not the connection pool, decides concurrency."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, connect=10.0))


async def run_requests(cfg: RunConfig, requests: list[BenchRequest], records: list,
                       count_tokens=None) -> float:
    """Fill `records` (one RequestRecord per request, in workload order); return the run's
    duration in seconds, from the first send to the last completion."""
    records[:] = [None] * len(requests)
    offsets = arrival_offsets(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = _progress(cfg, len(requests))
    headers = cfg.headers()

    async def one(i: int, req: BenchRequest, bench_start: float, client: httpx.AsyncClient):
        payload = build_payload(cfg.model, req.prompt, req.output_len, cfg.chat, cfg.ignore_eos)
        if limit is not None:
            await limit.acquire()
        try:
            send_time = time.perf_counter() - bench_start
            record = await send_request(client, cfg.url, payload, req.input_len,
                                        {**headers, "X-Request-Id": f"bench-{cfg.seed}-{i}"},
                                        cfg.request_timeout, cfg.chat, count_tokens)
            record.send_time = send_time
            records[i] = record
        finally:
            if limit is not None:
                limit.release()
            if bar is not None:
                bar.update(1)

    tasks: list[asyncio.Task] = []
    start = time.perf_counter()
    try:
        async with make_client(cfg.request_timeout) as client:
            for i, (req, offset) in enumerate(zip(requests, offsets)):
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, req, start, client)))
            await asyncio.gather(*tasks)
        return time.perf_counter() - start
    finally:
        for task in tasks:
            task.cancel()
        for i, req in enumerate(requests):
            if records[i] is None:
                records[i] = RequestRecord(req.input_len, req.output_len, error="cancelled")
        if bar is not None:
            bar.close()


def _progress(cfg: RunConfig, total: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=cfg.desc or "requests", unit="req", file=sys.stderr,
                dynamic_ncols=True, leave=True)
