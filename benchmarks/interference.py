"""How much the processes sharing a machine slow an instance's model steps: the two effects
the simulator's instances do not see by themselves.

    python benchmarks/interference.py [--model PATH] [--rounds 20] [--out benchmarks/results/interference.json]

1. A neighbour instance on the other core (contention for memory bandwidth and the shared
   cache): a victim engine on core 0 times its prefill and decode steps while a neighbour
   engine on core 1 runs prefill steps, or decode steps, without pause. The neighbour is
   stopped (SIGSTOP) and resumed (SIGCONT) in alternate windows, so every ratio compares
   windows seconds apart and the machine's drift cancels: `contention[victim][neighbour]` is
   the median over the rounds of (step time with the neighbour running) / (without).
2. Host work on the instance's own core (the server's HTTP process, the bench client): a
   process doing bursts of Python work (JSON, as a server does) on core 0, paused and resumed
   the same way. `host_cost[victim]` is the victim's extra time over the host process's
   CPU time in the same window: 1 is pure displacement, more is the cost of the caches the
   host work leaves cold.

One thread per engine, as the instances of benchmarks/sim_vs_real.py run, at the shapes they
run most: prompts of 128 tokens, decode batches of 4 (in its runs 79-85% of the decode steps
had 1-4 requests). The batch matters: a small decode batch streams the weights hardest, and a
prefill step next to one slowed x1.06-1.07, against x1.03-1.05 next to a batch of 16. Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from sim_vs_real_real import cpu_seconds

ROOT = pathlib.Path(__file__).resolve().parent.parent
PREFILL_LEN, DECODE_BATCH, CONTEXT = 128, 4, 128   # the victim's and the neighbour's steps
PROMPT = "The history of the city begins with a small market by the river. " * 60


def _engine(model: str | None, core: int):
    os.sched_setaffinity(0, {core})
    from distserve import LLM
    return LLM(model, dtype="bfloat16", num_threads=1, num_kv_blocks=1024)


def neighbour_loop(model: str | None, phase: str, core: int, prefill_len: int, batch: int, context: int) -> None:
    """A neighbour engine: prefill steps, or decode steps of a full batch, for ever."""
    from distserve import SamplingParams
    llm = _engine(model, core)
    ids = llm.tokenizer.encode(PROMPT)
    steps = DecodeBatch(llm, ids, batch, context) if phase == "decode" else None
    print("ready", flush=True)
    while True:
        if steps is not None:
            steps.step()
        else:
            llm.engine.add(ids[:prefill_len], SamplingParams(max_tokens=1, ignore_eos=True))
            while llm.engine.has_unfinished:
                llm.engine.step()


def host_loop(core: int, burst_ms: float, period_ms: float) -> None:
    """Host-like work: `burst_ms` of JSON encoding and decoding every `period_ms`."""
    os.sched_setaffinity(0, {core})
    doc = [{"id": i, "text": f"token {i} " * 20, "logprobs": [0.1 * i] * 8} for i in range(400)]
    print("ready", flush=True)
    while True:
        t = time.perf_counter()
        while time.perf_counter() - t < burst_ms * 1e-3:
            json.loads(json.dumps(doc))
        time.sleep(max(period_ms - burst_ms, 0.0) * 1e-3)


class DecodeBatch:
    """`batch` requests decoding together from `context`-token prompts, refilled (untimed) when
    they finish, so every timed step is a decode step of the full batch."""

    def __init__(self, llm, ids: list[int], batch: int, context: int, max_tokens: int = 256) -> None:
        from distserve import SamplingParams
        self.engine, self.batch = llm.engine, batch
        self.prompts = [ids[i:i + context] for i in range(batch)]
        self.params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        self.requests, self.left = [], 0

    def refill_unless(self, steps: int) -> None:
        """A fresh batch (its prefill untimed) unless the running one has `steps` steps left:
        a window then times decode steps only, not a refill's prefill."""
        if self.left >= steps:
            return
        for req in self.requests:
            self.engine.abort(req.request_id)
        self.requests = [self.engine.add(p, self.params) for p in self.prompts]
        while self.engine.scheduler.waiting:
            self.engine.step()
        self.left = self.params.max_tokens - 1

    def step(self) -> float | None:
        """One step; its seconds when it was a decode step of the whole batch."""
        self.refill_unless(1)
        sched = self.engine.scheduler
        decoding = not sched.waiting and len(sched.running) == self.batch
        t = time.perf_counter()
        self.engine.step()
        self.left -= 1
        return time.perf_counter() - t if decoding else None


class Victim:
    """The measured engine, on core 0: mean prefill or decode step time over a window."""

    def __init__(self, model: str | None, prefill_len: int, batch: int, context: int) -> None:
        from distserve import SamplingParams
        self.llm = _engine(model, 0)
        ids = self.llm.tokenizer.encode(PROMPT)
        self.ids = ids[:prefill_len]
        self.once = SamplingParams(max_tokens=1, ignore_eos=True)
        self.decode = DecodeBatch(_engine(model, 0), ids, batch, context)

    def prefill_s(self) -> float:
        eng = self.llm.engine
        eng.add(self.ids, self.once)
        t = time.perf_counter()
        eng.step()
        took = time.perf_counter() - t
        while eng.has_unfinished:
            eng.step()
        return took

    def decode_s(self) -> float:
        while (took := self.decode.step()) is None:
            pass
        return took

    def window(self, phase: str, seconds: float) -> Window:
        """`phase` steps for at least `seconds` (and at least 2 steps)."""
        step = self.prefill_s if phase == "prefill" else self.decode_s
        if phase == "decode":
            self.decode.refill_unless(self.decode.params.max_tokens // 2)
        times, start = [], time.perf_counter()
        while len(times) < 2 or time.perf_counter() < start + seconds:
            times.append(step())
        return Window(statistics.fmean(times), len(times), time.perf_counter() - start)


@dataclass
class Window:
    step_s: float   # mean time of the timed steps
    steps: int
    wall_s: float   # the whole window: the steps and the untimed work between them (a refill)


def _spawn(args: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"interference: the helper process {args} did not start")
    return proc


def _alternate(victim: Victim, other: subprocess.Popen, phase: str, rounds: int,
               window_s: float) -> list[dict]:
    """Per round, one window with `other` stopped ("off") and one with it running ("on"; the
    order flips each round), and `other`'s CPU seconds in the "on" window ("cpu")."""
    out = []
    for r in range(rounds):
        row = {}
        for running in ((False, True) if r % 2 == 0 else (True, False)):
            os.kill(other.pid, signal.SIGCONT if running else signal.SIGSTOP)
            time.sleep(0.05)
            c0 = cpu_seconds(other.pid)
            row["on" if running else "off"] = victim.window(phase, window_s)
            if running:
                row["cpu"] = cpu_seconds(other.pid) - c0
        out.append(row)
    os.kill(other.pid, signal.SIGSTOP)
    return out


def _host_cost(row: dict) -> float:
    """The victim's extra wall time over the window per CPU-second the host process took,
    both over the whole window (the host's CPU cannot be split between timed and untimed work)."""
    on, off = row["on"], row["off"]
    return (on.wall_s / on.steps - off.wall_s / off.steps) * on.steps / max(row["cpu"], 1e-3)


def _summary(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "n": len(xs)}


def measure(model: str | None = None, rounds: int = 20, window_s: float = 0.4, prefill_len: int = PREFILL_LEN,
            batch: int = DECODE_BATCH, context: int = CONTEXT, burst_ms: float = 1.0, period_ms: float = 5.0,
            log=print) -> dict:
    """Both measurements (module docstring). The victim engines run in this process, pinned to
    core 0 with one thread: the caller's affinity and torch threads are restored at the end
    (processes started afterwards inherit them), and the helper processes never outlive the call."""
    import torch
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        return _measure(model, rounds, window_s, prefill_len, batch, context, burst_ms, period_ms, log)
    finally:
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)


def _measure(model, rounds, window_s, prefill_len, batch, context, burst_ms, period_ms, log) -> dict:
    t0 = time.monotonic()
    victim = Victim(model, prefill_len, batch, context)
    for phase in ("prefill", "decode"):   # warm up
        victim.window(phase, window_s)
    shape = [str(model) if model else "", str(prefill_len), str(batch), str(context)]
    doc = {"model": model or "SmolLM2-135M-Instruct (built in)", "rounds": rounds, "window_s": window_s,
           "prefill_len": prefill_len, "decode_batch": batch, "decode_context": context,
           "contention": {"prefill": {}, "decode": {}}, "host_cost": {}, "host_share": {}}
    for neighbour in ("prefill", "decode"):
        proc = _spawn(["--neighbour", neighbour, "--core", "1", "--shape", *shape])
        try:
            for phase in ("prefill", "decode"):
                rows = _alternate(victim, proc, phase, rounds, window_s)
                doc["contention"][phase][neighbour] = s = _summary([r["on"].step_s / r["off"].step_s for r in rows])
                log(f"victim {phase:7s} next to a {neighbour:7s} neighbour: x{s['median']:.3f} "
                    f"(quartiles {s['q1']:.3f}-{s['q3']:.3f})")
        finally:
            proc.kill()
            proc.wait()
    proc = _spawn(["--host-load", str(burst_ms), str(period_ms), "--core", "0"])
    try:
        for phase in ("prefill", "decode"):
            rows = _alternate(victim, proc, phase, rounds, window_s)
            doc["host_cost"][phase] = s = _summary([_host_cost(r) for r in rows])
            doc["host_share"][phase] = statistics.median(r["cpu"] / r["on"].wall_s for r in rows)
            log(f"victim {phase:7s} under host work ({doc['host_share'][phase]:.0%} of its core): "
                f"{s['median']:.2f} s lost per host CPU-second (quartiles {s['q1']:.2f}-{s['q3']:.2f})")
    finally:
        proc.kill()
        proc.wait()
    doc["seconds"] = time.monotonic() - t0
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder or GGUF (default: the built-in SmolLM2)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--window-s", type=float, default=0.4)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/interference.json"))
    ap.add_argument("--neighbour", choices=["prefill", "decode"], help=argparse.SUPPRESS)
    ap.add_argument("--host-load", nargs=2, type=float, help=argparse.SUPPRESS)
    ap.add_argument("--core", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--shape", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.neighbour:   # helper processes (spawned by measure)
        model, *dims = args.shape
        neighbour_loop(model or None, args.neighbour, args.core, *map(int, dims))
    elif args.host_load:
        host_loop(args.core, *args.host_load)
    if args.rounds < 1 or args.window_s <= 0:
        ap.error(f"--rounds must be >= 1 and --window-s > 0 (got {args.rounds}, {args.window_s})")
    doc = measure(args.model, args.rounds, args.window_s)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"saved {out} ({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
