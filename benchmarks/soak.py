"""Soak: thousands of mixed requests against a real disaggregated deployment, one instance
killed with SIGKILL halfway (the controller restarts it), then the books are checked.

    python benchmarks/soak.py [--requests 2000] [--concurrency 24] [--quick]

Requests: streamed and whole completions and chat completions of the built-in model with
short outputs; 10% of the streams are dropped by the client after their first token, 5% are
malformed (broken JSON, a bad field, a wrong type) and must get a 4xx. Prints and saves
(benchmarks/results/soak_<victim>.json): completed, failed (an error event or a 503 while a role had
no instance), re-run (from /metrics), 4xx for the malformed, 5xx otherwise (must be 0), hung
(no answer within --request-timeout: must be 0), leaked KV blocks once idle (must be 0), and
each process's RSS growth from after warm-up to the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import signal
import sys
import tempfile
import time

import httpx
from serving import free_port, start_server, stop_server  # benchmarks/serving.py

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks/results"
WORDS = ("the river market bridge city stone lamp evening harbour winter garden road tower "
         "bell window story").split()
MALFORMED = [b'{"prompt": "hi", "max_tokens": ', b'{"prompt": 5, "max_tokens": "many"}',
             b'{"prompt": "hi", "temperature": -3}', b'{"messages": "not a list"}',
             b'{"prompt": "hi", "n": 0}', b'\xff\xfe not json']


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def family(pid: int) -> dict[int, str]:
    """The server and its instance processes: pid -> name."""
    out = {pid: "server"}
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        kids = []
    for kid in kids:
        try:
            cmd = open(f"/proc/{kid}/cmdline").read().split("\0")
            out[kid] = cmd[cmd.index("--instance-id") + 1]
        except (OSError, ValueError, IndexError):
            pass
    return out


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


class Soak:
    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        self.counts = {"completed": 0, "failed": 0, "dropped_by_client": 0, "malformed_4xx": 0,
                       "malformed_other": 0, "5xx": 0, "503_no_instance": 0, "429": 0, "hung": 0,
                       "connection_dropped": 0}

    def body(self, rng: random.Random, chat: bool, stream: bool) -> dict:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        common = {"max_tokens": rng.randint(4, 24), "temperature": rng.choice([0, 0.7]),
                  "stream": stream}
        return ({"messages": [{"role": "user", "content": text}], **common} if chat
                else {"prompt": text, **common})

    async def one(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        chat, stream = rng.random() < 0.5, rng.random() < 0.6
        path = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            await asyncio.wait_for(self._one(http, rng, path, chat, stream), self.timeout)
        except asyncio.TimeoutError:
            self.counts["hung"] += 1
        except httpx.HTTPError:   # the server dropped the connection: as bad as a 5xx
            self.counts["connection_dropped"] += 1

    async def _one(self, http, rng, path, chat, stream) -> None:
        if rng.random() < 0.05:
            r = await http.post(path, content=rng.choice(MALFORMED),
                                headers={"content-type": "application/json"})
            self.counts["malformed_4xx" if 400 <= r.status_code < 500 else "malformed_other"] += 1
            return
        body = self.body(rng, chat, stream)
        if not stream:
            r = await http.post(path, json=body)
            self._status(r.status_code)
            return
        drop = rng.random() < 0.10
        async with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                self._status(r.status_code)
                return
            async for line in r.aiter_lines():
                if drop and line.startswith("data: {"):
                    self.counts["dropped_by_client"] += 1
                    return   # leaving the block closes the connection mid-stream
                if line.startswith("data: ") and '"error"' in line:
                    self.counts["failed"] += 1
                    return
                if line == "data: [DONE]":
                    self.counts["completed"] += 1
                    return
        self.counts["failed"] += 1   # ended without [DONE]

    def _status(self, code: int) -> None:
        if code == 200:
            self.counts["completed"] += 1
        elif code == 503:
            self.counts["503_no_instance"] += 1
        elif code == 429:
            self.counts["429"] += 1
        elif code >= 500:
            self.counts["5xx"] += 1
        else:
            self.counts["failed"] += 1


async def drive(url: str, n: int, concurrency: int, timeout: float, on_half, seed: int) -> Soak:
    soak = Soak(url, timeout)
    rng = random.Random(seed)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    done = 0

    async def worker() -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=url, timeout=timeout + 5) as http:
            while not queue.empty():
                queue.get_nowait()
                await soak.one(http, random.Random(rng.random()))
                done += 1
                if done == n // 2:
                    on_half()

    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return soak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--victim", default="decode-0", help="the instance killed halfway")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="300 requests")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests = 300
    port = free_port()
    log = pathlib.Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
    flags = ["--prefill-instances", "1", "--decode-instances", "2", "--no-pin-cpus",
             "--kv-cache-memory", "0.5", "--max-queued-requests", "256"]
    proc = start_server(flags, port, log)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        asyncio.run(drive(url, min(50, args.requests), 8, args.request_timeout, lambda: None, 99))
        procs = family(proc.pid)
        rss_warm = {name: rss_kib(pid) for pid, name in procs.items()}
        killed = {}

        def kill_victim() -> None:
            pid = next(p for p, name in family(proc.pid).items() if name == args.victim)
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, at_s=round(time.monotonic() - t0, 1))
            print(f"killed {args.victim} (pid {pid}) halfway", flush=True)

        soak = asyncio.run(drive(url, args.requests, args.concurrency, args.request_timeout,
                                 kill_victim, args.seed))
        deadline = time.monotonic() + 120   # the restarted instance rejoins; KV drains
        while time.monotonic() < deadline:
            health = httpx.get(f"{url}/health").json()
            text = httpx.get(f"{url}/metrics").text
            free, total = metric(text, "distserve:kv_cache_free_blocks"), metric(text, "distserve:kv_cache_total_blocks")
            if health.get("status") == "ok" and free == total:
                break
            time.sleep(1)
        rss_end = {name: rss_kib(pid) for pid, name in family(proc.pid).items()}
        growth = {name: round(100 * (rss_end[name] - rss_warm[name]) / rss_warm[name], 1)
                  for name in rss_end if name != args.victim and rss_warm.get(name) and rss_end.get(name)}
        doc = {"requests": args.requests, "concurrency": args.concurrency, **soak.counts,
               "rerun": int(metric(text, "distserve:requests_rerun")),
               "instance_failures": int(metric(text, "distserve:instance_failures")),
               "instance_restarts": int(metric(text, "distserve:instance_restarts")),
               "leaked_blocks": int(total - free), "health_at_end": health.get("status"),
               "killed": {"instance": args.victim, **killed},
               "rss_growth_pct_after_warmup": growth,
               "note": "the killed instance is a new process after its restart: its growth is not counted",
               "seconds": round(time.monotonic() - t0, 1), "machine_cores": os.cpu_count()}
    finally:
        stop_server(proc)
    print(json.dumps(doc, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"soak{'_quick' if args.quick else ''}_{args.victim}.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"saved {out}")
    bad = (doc["5xx"] or doc["hung"] or doc["leaked_blocks"] or doc["malformed_other"]
           or doc["connection_dropped"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
