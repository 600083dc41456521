"""`distserve profile [MODEL]`: measure our engine on this device, fit the artifact's forms,
write a profile JSON in the artifact's schema and show the fit error.

The measuring half (distserve.planner.profile_engine) imports torch, so it is imported only
inside the handler; registering the command costs nothing.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from distserve.planner.profiles import PipelineCost, ProfileEntry, fit_decode, fit_prefill

DEFAULT_PREFILL_LENS = "16,32,64,128,256,512,1024"
DEFAULT_BATCHES = "1,2,4,8,16,32,64,96,128"
DEFAULT_CONTEXTS = "64,256,1024"


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} needs integers >= 1, got {text!r}")
    return values


def register(sub) -> None:
    p = sub.add_parser("profile", help="measure this device's prefill and decode times, fit a "
                       "latency profile (the DistServe artifact's schema)")
    p.add_argument("model", nargs="?", default=None, help="HF folder or .gguf (default: built-in SmolLM2)")
    p.add_argument("-o", "--output", default="profile.json", help="profile JSON to write (merged "
                   "into the file when it exists)")
    p.add_argument("--name", default=None, help="model key in the profile (default: the model's name)")
    p.add_argument("--hardware-name", default=None, help="the _hardware tag (default: from the device)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if present)")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads per worker")
    p.add_argument("--prefill-lens", default=DEFAULT_PREFILL_LENS, help="prompt lengths to time")
    p.add_argument("--prefill-batches", default="1,2,4", help="prompts per prefill batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="skip bigger prefill batches")
    p.add_argument("--batch-sizes", default=DEFAULT_BATCHES, help="decode batch sizes to time")
    p.add_argument("--context-lens", default=DEFAULT_CONTEXTS, help="decode context lengths to time")
    p.add_argument("--max-decode-tokens", type=int, default=65536, help="skip bigger decode batches "
                   "(batch x context)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds through all the shapes (the median per shape is kept)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (a one-thread CPU engine on a "
                   "machine shared with other jobs: their time on its core is not counted)")
    p.add_argument("--mixed-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="also time decode batches of mixed contexts (shows whether decode "
                   "attention pays for the sum of the contexts or pads to the longest)")
    p.add_argument("--engine-overhead", action=argparse.BooleanOptionalAction, default=True,
                   help="also time what a whole engine step (scheduling, sampling, "
                   "detokenisation) adds to the model runner, and add it to the fits")
    p.add_argument("--tp", default="1", help="tensor-parallel degrees to profile, e.g. 1,2: "
                   "each gets its own fitted entry (TP workers of --num-threads each) and "
                   "its speed-up K over TP 1")
    p.add_argument("--pp", default="1", help="pipeline degrees to time, e.g. 1,2: their "
                   "measured stage cost and decode factor go to the planner's PP model")
    p.add_argument("--json", action="store_true", help="print the written profile as JSON")
    p.set_defaults(func=run_profile)


def fit_entry(prefill: list[tuple[list[int], float]], decode: list[tuple[list[int], float]],
              threshold: int = 95, overhead: list[tuple[int, float]] | None = None
              ) -> tuple[ProfileEntry, dict]:
    """Fit the three forms on measurements [(lengths, ms)] and report their relative errors.
    The decode context term is sum(ctx + 1), or batch * (max ctx + 1) when that fits the
    measurements clearly better (an engine that pads decode attention; only mixed-context
    batches can tell them apart). The decode batch threshold (where the artifact's "largebs"
    coefficients take over) is `threshold`, or the measured batch size that splits the
    measurements into two pieces that fit clearly better: a step that streams the weights
    costs the same for a few requests and grows with the batch only once it is bound by
    compute (one CPU core: from about 16 requests of SmolLM2 on). `overhead` [(batch, ms)],
    what an engine step adds to the model runner, is fitted as oa + oc * batch and added to
    the decode fits' a and c and to the prefill fit's a (as oa + oc: one prompt)."""
    if len(prefill) < 3 or len(decode) < 3:
        raise ValueError("need at least 3 prefill and 3 decode measurements to fit")
    pf = fit_prefill([x for x, _ in prefill], [t for _, t in prefill])
    fits = {form: _fit_decode_pieces(pf, decode, threshold, form) for form in ("sum", "max")}
    if fits["sum"] is None:
        raise ValueError("need at least 3 decode measurements on one side of the batch threshold")
    single = fits["max"] if fits["max"][0] < 0.8 * fits["sum"][0] else fits["sum"]
    best = single
    for b in sorted({len(c) for c, _ in decode}):   # a knee in the batch size?
        split = _fit_decode_pieces(pf, decode, b, single[1].decode_context, both=True)
        if split is not None and split[0] < min(0.8 * single[0], best[0]):
            best = split
    entry = best[1]
    errors = {"prefill": [abs(entry.prefill_ms(x) / t - 1) for x, t in prefill],
              "decode": [abs(entry.decode_ms(c) / t - 1) for c, t in decode]}
    report = {k: {"mean": sum(v) / len(v), "max": max(v)} for k, v in errors.items()}
    report["decode_mean_by_context_form"] = {form: fit[0] for form, fit in fits.items()}
    report["decode_threshold"] = entry.threshold
    if overhead:
        x = np.array([[1.0, float(b)] for b, _ in overhead])
        oa, oc = (float(v) for v in np.linalg.lstsq(x, np.array([ms for _, ms in overhead]), rcond=None)[0])
        if len(overhead) == 1:
            oa, oc = overhead[0][1], 0.0
        pf, ds, dl = entry.prefill, entry.decode_small, entry.decode_large
        entry = ProfileEntry((pf[0] + oa + oc, pf[1], pf[2]), (ds[0] + oa, ds[1], ds[2] + oc),
                             (dl[0] + oa, dl[1], dl[2] + oc), entry.threshold, entry.decode_context)
        report["engine_overhead_ms"] = {"per_step": oa, "per_request": oc}
    return entry, report


def _fit_decode_pieces(pf, decode, threshold: int, form: str, both: bool = False
                       ) -> tuple[float, ProfileEntry] | None:
    """(mean relative error, entry) of decode fitted below and from `threshold` separately
    (one piece serves both when a side has fewer than 3 measurements; `both`: each side
    must have 3, over at least 2 batch sizes, and no negative per-token or per-request
    cost), or None."""
    small = [(c, t) for c, t in decode if len(c) < threshold]
    large = [(c, t) for c, t in decode if len(c) >= threshold]
    if both and any(len(side) < 3 or len({len(c) for c, _ in side}) < 2 for side in (small, large)):
        return None
    ds = fit_decode([c for c, _ in small], [t for _, t in small], form) if len(small) >= 3 else None
    dl = fit_decode([c for c, _ in large], [t for _, t in large], form) if len(large) >= 3 else None
    if both and min(ds[1:] + dl[1:]) < 0:
        return None   # a piece in which more context or more requests cost less: fitting noise
    ds, dl = ds or dl, dl or ds
    if ds is None:
        return None
    entry = ProfileEntry(pf, ds, dl, threshold, form)
    return _decode_error(entry, decode), entry


def _decode_error(entry: ProfileEntry, decode) -> float:
    return sum(abs(entry.decode_ms(c) / t - 1) for c, t in decode) / len(decode)


def speedup(base: list, measured: list) -> float:
    """The paper's K: the median over shapes measured both ways of base ms / measured ms."""
    ms = {json.dumps(x): t for x, t in base}
    ratios = [ms[json.dumps(x)] / t for x, t in measured if json.dumps(x) in ms and t > 0]
    if not ratios:
        raise ValueError("no shape was measured both ways")
    return float(np.median(ratios))


def _paired(entry: ProfileEntry, base: dict, measured: dict, phase: str):
    """The PP shapes of `phase` that TP 1 ran too: (shape, PP ms, TP-1 ms, the TP-1 step's
    fixed part from `entry`, tokens (prefill) or rows (decode)) each."""
    tp1 = {json.dumps(x): t for x, t in base[phase]}
    for x, t in measured[phase]:
        one = tp1.get(json.dumps(x))
        if one is None or t <= 0:
            continue
        fixed = entry.prefill[0] if phase == "prefill" else \
            (entry.decode_small if len(x) < entry.threshold else entry.decode_large)[0]
        yield x, t, one, min(fixed, one), sum(x) if phase == "prefill" else len(x)


def pipeline_fit(entry: ProfileEntry, base: dict, measured: dict, pp: int) -> dict:
    """The synchronous pipeline's cost per phase (PipelineCost: bottleneck, hop_ms,
    hop_ms_per_token) from a PP instance's step times and TP 1's on the same shapes
    ({"prefill": [(lens, ms)], "decode": [(contexts, ms)]} each). A shape of r rows runs as
    m = min(pp, r) micro-batches; its TP-1 time is `entry`'s fixed cost plus the rest, which
    splits over the micro-batches. Fitted by non-negative least squares on relative error;
    without a shape of two micro-batches or more the stages are taken as even."""
    from distserve.planner.roofline import _nnls
    out = {}
    for phase in ("prefill", "decode"):
        rows, ys, ws = [], [], []
        for x, t, one, fixed, tokens in _paired(entry, base, measured, phase):
            m = min(pp, len(x))
            t1 = fixed + (one - fixed) / m
            rows.append([(m - 1) / pp * t1, m + pp - 2, (m + pp - 2) * tokens / m])
            ys.append(t - t1)
            ws.append(1 / t)
        if not rows:
            raise ValueError(f"PP {pp}: no {phase} shape was measured at TP 1 and PP {pp} both")
        a, w = np.array(rows, dtype=float), np.array(ws)
        coef = _nnls(a * w[:, None], np.array(ys) * w)
        bottleneck = float(coef[0]) if a[:, 0].any() else 1.0
        out[phase] = PipelineCost(bottleneck, float(coef[1]), float(coef[2])).to_dict()
    return out


def pipeline_errors(entry: ProfileEntry, base: dict, measured: dict, pp: int, fit: dict) -> dict:
    """The fitted PP model against the measured PP times: {phase: {"mean", "max"}} relative."""
    from distserve.planner.latency import InstanceLatency
    lat = InstanceLatency(entry, 1, pp)
    out = {}
    for phase in ("prefill", "decode"):
        pipe = PipelineCost(**{k: fit[phase][k] for k in PipelineCost().to_dict()})
        errs = [abs(lat.pipelined(pipe, fixed, one - fixed, len(x), tokens) / t - 1)
                for x, t, one, fixed, tokens in _paired(entry, base, measured, phase)]
        out[phase] = {"mean": float(np.mean(errs)), "max": float(np.max(errs))}
    return out


def run_profile(args: argparse.Namespace) -> int:
    tps, pps = _ints(args.tp, "--tp"), _ints(args.pp, "--pp")
    lens = _ints(args.prefill_lens, "--prefill-lens")
    pbatches = _ints(args.prefill_batches, "--prefill-batches")
    batches = _ints(args.batch_sizes, "--batch-sizes")
    contexts = _ints(args.context_lens, "--context-lens")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.clock == "cpu" and args.num_threads != 1:
        raise ValueError("--clock cpu counts the CPU time of every thread: use it with --num-threads 1")
    from distserve.planner.profile_engine import measure   # torch from here on
    decode_shapes = [(b, c) for b in batches for c in contexts if b * c <= args.max_decode_tokens]
    lo, hi = min(contexts), max(contexts)
    if args.mixed_decode and lo < hi:   # one long request among short ones, per batch size
        decode_shapes += [[lo] * (b - 1) + [hi] for b in batches
                          if b >= 4 and (b - 1) * lo + hi <= args.max_decode_tokens]
    overhead_batches = sorted({b for b in (1, 8, 32) if b <= max(batches)}) if args.engine_overhead else []
    prefill_shapes = [[n] * k for n in lens for k in pbatches if n * k <= args.max_num_batched_tokens]
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    m = measure(args.model, args.dtype, args.device, args.num_threads, prefill_shapes,
                decode_shapes, args.repeats, progress=progress,
                overhead_batches=overhead_batches, clock=args.clock)
    entry, errors = fit_entry(m["prefill"], m["decode"], overhead=m["overhead"] or None)
    name = args.name or m["model"]
    parallel = {}   # (tp, pp) -> measurements, for the degrees above 1
    for tp, pp in [(tp, 1) for tp in tps if tp > 1] + [(1, pp) for pp in pps if pp > 1]:
        progress(f"TP {tp} x PP {pp} instance:")
        parallel[tp, pp] = measure(args.model, args.dtype, args.device, args.num_threads,
                                   prefill_shapes, decode_shapes, args.repeats,
                                   progress=progress, tp=tp, pp=pp)
    try:
        with open(args.output, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        doc = {}
    doc["_hardware"] = args.hardware_name or m["hardware"]
    doc["_device"] = m["device"]
    if m.get("transfer"):   # the KV link between instances on this host, as measured
        doc["_transfer"] = m["transfer"]
    doc.setdefault("_clock", {})[name] = args.clock
    doc.setdefault("_fit_error", {})[name] = errors
    doc.setdefault("_measurements", {})[name] = {"prefill": m["prefill"], "decode": m["decode"],
                                                 "engine_overhead": m["overhead"]}
    doc.setdefault(name, {})["1"] = entry.to_dict()
    for (tp, pp), pm in parallel.items():
        key = f"tp{tp}" if pp == 1 else f"pp{pp}"
        doc["_measurements"][name][key] = {"prefill": pm["prefill"], "decode": pm["decode"]}
        k = {phase: speedup(m[phase], pm[phase]) for phase in ("prefill", "decode")}
        doc.setdefault("_speedup", {}).setdefault(name, {})[key] = k
        if pp == 1:   # the TP entry, with the engine's own step cost measured at TP 1
            tp_entry, tp_errors = fit_entry(pm["prefill"], pm["decode"],
                                            overhead=m["overhead"] or None)
            doc[name][str(tp)] = tp_entry.to_dict()
            doc["_fit_error"].setdefault(f"{name} tp{tp}", tp_errors)
        else:
            fit = pipeline_fit(entry, m, pm, pp)
            fit["error"] = pipeline_errors(entry, m, pm, pp, fit)
            doc.setdefault("_pipeline", {}).setdefault(name, {})[str(pp)] = fit
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"profile of {name} on {m['device']} written to {args.output} (tag {doc['_hardware']})")
    print(f"  prefill_ms = {entry.prefill[0]:.4g} + {entry.prefill[1]:.4g} * sum(len) + "
          f"{entry.prefill[2]:.4g} * sum(len^2)")
    term = "sum(ctx + 1)" if entry.decode_context == "sum" else "batch * (max ctx + 1)"
    th = entry.threshold
    for label, c in ((f"decode (batch < {th})", entry.decode_small), (f"decode (batch >= {th})", entry.decode_large)):
        print(f"  {label}: {c[0]:.4g} + {c[1]:.4g} * {term} + {c[2]:.4g} * batch")
    for phase in ("prefill", "decode"):
        e = errors[phase]
        print(f"  fit error {phase}: mean {e['mean']:.1%}, max {e['max']:.1%}")
    if m.get("transfer"):
        t = m["transfer"]
        print(f"  KV pull ({t['backend']}): {t['bytes_per_s'] / 1e9:.2f} GB/s (the planner's KV "
              "link between instances here)")
    forms = errors["decode_mean_by_context_form"]
    print(f"  decode context term: {entry.decode_context} (mean error with sum(ctx + 1) "
          f"{forms['sum']:.1%}, with batch * max ctx {forms['max']:.1%}, one piece below batch 95)")
    if "engine_overhead_ms" in errors:
        o = errors["engine_overhead_ms"]
        print(f"  engine step overhead (included above): {o['per_step']:.3g} ms + "
              f"{o['per_request']:.3g} ms per request")
    for tp, pp in parallel:
        k = doc["_speedup"][name][f"tp{tp}" if pp == 1 else f"pp{pp}"]
        print(f"  TP {tp} x PP {pp}: speed-up K over TP 1 (median over the shapes): prefill "
              f"{k['prefill']:.2f}, decode step {k['decode']:.2f}")
    for pp, fit in doc.get("_pipeline", {}).get(name, {}).items():
        for phase in ("prefill", "decode"):
            f, e = fit[phase], fit.get("error", {}).get(phase)
            print(f"  PP {pp} {phase}: slowest stage {f['bottleneck']:.2f} x even, handover "
                  f"{f['hop_ms']:.3g} ms + {f['hop_ms_per_token']:.3g} ms per "
                  f"{'token' if phase == 'prefill' else 'request'}"
                  + (f" (fit error mean {e['mean']:.1%}, max {e['max']:.1%})" if e else ""))
    return 0
