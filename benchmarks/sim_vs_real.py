"""Simulator vs reality on this machine: the paper's Table 2 (SLO attainment, real vs
simulated, by rate) for our engine and our planner's simulator.

    python benchmarks/sim_vs_real.py            # full: 5 rates x ~190 requests (~17 min on 2 cores)
    python benchmarks/sim_vs_real.py --quick    # smoke: 2 rates x 30 requests (~4 min)
    python benchmarks/sim_vs_real.py --reuse-profile        # skip profiling (same engine code)
    python benchmarks/sim_vs_real.py --reuse-real           # re-simulate the saved real runs only
    python benchmarks/sim_vs_real.py --repeats 2            # each rate's real run twice, back to back
    options: --workload humaneval|sharegpt, --rates 2,3,4, --num-prompts, --num-rates,
             --ttft-factor, --tpot-factor, --no-host-model, --deployments colocated,disagg

1. Profile: `distserve profile` of the built-in SmolLM2 pinned to core 0 with one thread (what
   every instance below runs with), timed in CPU seconds (`--clock cpu`: another job's time
   slices on the core are not counted), with mixed-context decode batches (the fit picks the
   sum-of-contexts or padded "max" form, whichever the engine follows) and the engine's
   per-step overhead (scheduling, sampling, detokenisation) added to the fits. Cached in
   results/sim_vs_real_profile.json; --reuse-profile reuses it while the engine code hashes
   the same.
2. SLOs from the profile: TTFT = --ttft-factor (4) x the prefill of a mean prompt, TPOT =
   --tpot-factor (2) x a single request's decode step; rates from where the simulator puts
   both deployments at ~99% to where the better one falls to ~35% (or --rates).
3. Real: two deployments over the same 2 cores, served by `distserve serve` and measured by
   `distserve bench` (Poisson arrivals, --ignore-eos, seed + i at the i-th rate for both):
     colocated  `--mode colocated --instances 2 --num-threads 1`   (2 instances, a core each)
     disagg     `--prefill-instances 1 --decode-instances 1 --prefill-threads 1
                 --decode-threads 1`                               (1 prefill + 1 decode)
   with the CPU seconds of every process over each run: the server's HTTP + controller
   process, the bench client, each instance, and everything else on the machine (a run
   during which other jobs used more than 0.1 core is flagged: not a quiet machine).
4. Simulated: the planner's simulator on exactly the arrivals (send times) and lengths each
   real run sent, the instances' batching limits (256 requests, 2048 prefill tokens) and KV
   capacity (from the server's KV blocks). The server and the bench client share the
   instances' cores: their measured CPU stretches the instances' steps, by what a host
   CPU-second costs a step, and the instances slow each other down by contending for memory
   and cache, both measured once with the profile by benchmarks/interference.py and cached
   with it (planner.host_model; --no-host-model leaves all of it out; the diagnostics show both
   parts). Also the simulator on fresh
   traces of the same lengths over several seeds (the spread a different sample gives).
   "Calibrated just before": before each rate, a calibration load of 30 other prompts at that
   rate; the profile rescaled per phase to the speed the instances' steps ran at in it
   predicts the run from nothing measured during the run (this machine's speed drifts 1.2-2x
   over minutes, so a profile taken a quarter of an hour earlier can be far off).
   And "at run speed": the instances log their steps (DISTSERVE_STEP_TRACE); each run is
   simulated again with the profile rescaled to the speed its engine iterations actually ran
   at, per phase, and with its slow spells replayed as a time warp. That separates a wrong
   queueing model from a latency profile that does not hold during the run.
5. Table 2 for ours, per-rate latency diagnostics (real -> simulated), JSON in
   results/sim_vs_real.json (the real runs in results/sim_vs_real_<workload>_<deployment>.json)
   and a plot in results/sim_vs_real.png.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile
import time

from sim_vs_real_config import (
    CALIBRATION_REQUESTS,
    DEPLOYMENTS,
    MODEL_KEY,
    PROBE_S,
    PROFILE,
    RESULTS,
    ROOT,
    RUN_OVERHEAD_S,
    SERVER_START_S,
    WORKLOADS,
)
from sim_vs_real_profile import code_fingerprint, load_entry, measure_interference, run_profile
from sim_vs_real_real import run_real
from sim_vs_real_sim import default_kv_tokens, deployment_of, pick_rates, sim_deployment, slos

from distserve.planner.reality_check import compare, probe_check, runs_of
from distserve.planner.workload import Lengths


# ----------------------------------------------------------------------------- report
def pct(x) -> str:
    return "   -  " if x is None else f"{100 * x:6.1f}"


def ms(x) -> str:
    return "    -" if x is None or not math.isfinite(x) else f"{1e3 * x:5.0f}"


def print_tables(report: dict) -> None:
    deps = report["deployments"]
    names = list(deps)
    rates = sorted({r["rate"] for d in deps.values() for r in d["rows"]})
    print("\nTable 2 (ours): SLO attainment (%), real vs simulated on the same trace; "
          f"TTFT SLO {report['slo']['ttft'] * 1e3:.0f} ms, TPOT SLO {report['slo']['tpot'] * 1e3:.0f} ms")
    head = "rate (req/s) |" + "|".join(f" {n} real | {n} sim | diff pp " for n in names)
    print(head)
    print("-" * len(head))
    for rate in rates:
        cells = []
        for n in names:
            row = next((r for r in deps[n]["rows"] if r["rate"] == rate), None)
            if row is None:
                cells.append(" " * (len(n) * 2 + 22))
                continue
            cells.append(f" {pct(row['real']['attainment']):>{len(n) + 5}} | {pct(row['sim']['attainment']):>{len(n) + 4}}"
                         f" | {row['diff_pp']:7.1f} ")
        print(f"{rate:12g} |" + "|".join(cells))
    worst = max((r["diff_pp"] for d in deps.values() for r in d["rows"]), default=0.0)
    print(f"largest difference: {worst:.1f} pp (target: 3; the paper: 2)")
    calibrated = _rows_having(deps, "calibrated")
    if calibrated:
        print("\nPredicted from the profile rescaled by a calibration load just before each run "
              "(its own prompts, the run's rate; nothing of the run itself):")
        for n, r in calibrated:
            c = r["calibrated"]
            print(f"  {n:<9} {r['rate']:6g} req/s: real {pct(r['real']['attainment'])} predicted "
                  f"{pct(c['sim']['attainment'])}  diff {c['diff_pp']:5.1f} pp   {_steps(c['speed'])}")
        print(f"largest difference, calibrated just before: {max(r['calibrated']['diff_pp'] for _, r in calibrated):.1f} pp")
    timed = _rows_having(deps, "at_run_speed")
    if timed:
        print("\nThe same, simulated at the speed each run's model steps actually ran (step traces: "
              "measured / profiled step time per phase) plus the run's mean serving-path latency:")
        for n, r in timed:
            a = r["at_run_speed"]
            warped = (f"; with its slow spells replayed ({100 * a['slow_share']:.0f}% of seconds >1.3x): sim "
                      f"{pct(a['sim_warped']['attainment'])} diff {a['diff_warped_pp']:5.1f} pp" if "sim_warped" in a else "")
            print(f"  {n:<9} {r['rate']:6g} req/s: real {pct(r['real']['attainment'])} sim {pct(a['sim']['attainment'])}"
                  f"  diff {a['diff_pp']:5.1f} pp   {_steps(a['speed'])}; serving path "
                  f"+{1e3 * a['serving_latency_s']:.0f} ms" + warped)
        worst_t = max(r["at_run_speed"]["diff_pp"] for _, r in timed)
        print(f"largest difference at the runs' own speed: {worst_t:.1f} pp")
        print_speed_breakdown(timed)
        warped = [r["at_run_speed"]["diff_warped_pp"] for _, r in timed if "diff_warped_pp" in r["at_run_speed"]]
        if warped:
            print(f"largest difference with the slow spells replayed too: {max(warped):.1f} pp")
        print_speed_to_match(timed)
    print_repeats(deps)
    print("\nProbe (requests one at a time): serving-path latency added to simulated TTFTs; "
          "real single-request TPOT / the profile's decode step (1.00: the profile holds)")
    for n in names:
        p = deps[n].get("probe")
        if p:
            flag = "" if p["tpot_over_profile"] is None or abs(p["tpot_over_profile"] - 1) < 0.05 else \
                "  << the profile does not hold for the served instances (noise? other jobs?)"
            print(f"  {n:<9} +{1e3 * p['ttft_extra_s']:.1f} ms TTFT; TPOT / profile {p['tpot_over_profile']:.3f}{flag}")
    print("\nDiagnostics (ms; attainment %): TTFT mean/p90 and TPOT mean/p90, real -> simulated; "
          "fresh = simulator on new traces of the same lengths (mean +- std over seeds)")
    for n in names:
        for r in deps[n]["rows"]:
            a, b = r["real"], r["sim"]
            print(f"  {n:<9} {r['rate']:6g} req/s n={r['n']:<4} TTFT {ms(a['ttft_mean'])}/{ms(a['ttft_p90'])} -> "
                  f"{ms(b['ttft_mean'])}/{ms(b['ttft_p90'])}  TPOT {ms(a['tpot_mean'])}/{ms(a['tpot_p90'])} -> "
                  f"{ms(b['tpot_mean'])}/{ms(b['tpot_p90'])}  TTFT-ok {pct(a['ttft_attainment'])}->"
                  f"{pct(b['ttft_attainment'])} TPOT-ok {pct(a['tpot_attainment'])}->{pct(b['tpot_attainment'])}"
                  f"  fresh {100 * r['fresh_mean']:.1f}+-{100 * r['fresh_std']:.1f}"
                  + (f"  failed {r['failed']}" if r["failed"] else "")
                  + (f"\n{'':12}host CPU {r['host']['host_cores']:.2f} cores ({r['host_ms_per_token']:.2f} ms/token), "
                     f"instances busy {_fmt(r['host']['utilisation'])}: steps x {_fmt(r['host']['k'], 3)}"
                     + (f" = host x {_fmt(r['host']['k_host'], 3)} . neighbour x {_fmt(r['host']['k_neighbour'], 3)}"
                        if "k_host" in r["host"] else "")
                     + (f" (measured: preempted x {_fmt(r['host']['k_measured'], 3)})" if "k_measured" in r["host"] else "")
                     + "; "
                     f"simulated without the host: {pct(r['sim_without_host']['attainment']).strip()}%"
                     + (f"; other jobs used {r['cpu']['others_cores']:.2f} cores" if "others_cores" in r["cpu"] else "")
                     if r.get("host") else ""))


def print_speed_breakdown(timed: list[tuple[str, dict]]) -> None:
    """The served steps' speed against the profile, split into the part the instances spent
    preempted (their measured run-queue waits) and what is left: what an a-priori model of
    this machine must still explain (contention for memory between the instances, ...)."""
    rows = [(n, r) for n, r in timed if (r.get("host") or {}).get("k_measured")]
    if not rows:
        return
    print("\nServed step speed / profile = preempted (run-queue waits) x the rest, per phase:")
    for n, r in rows:
        speed, k = r["at_run_speed"]["speed"], r["host"]["k_measured"]
        parts = []
        for phase in ("prefill", "decode"):
            pre = k.get(phase, k.get("colocated", 1.0))
            parts.append(f"{phase} {speed[phase]:.2f} = {pre:.3f} x {speed[phase] / pre:.3f}")
        print(f"  {n:<9} {r['rate']:6g} req/s: " + "; ".join(parts))


def print_speed_to_match(timed: list[tuple[str, dict]]) -> None:
    """Per run: the error in the measured speed that would explain the rest of the difference,
    next to how much the speed moved within that run and how far the calibration was off."""
    rows = [(n, r) for n, r in timed if r["at_run_speed"].get("to_match")]
    if not rows:
        return
    print("\nHow far off the run's measured speed would have to be for the simulation (at run speed, "
          "spells replayed) to give the real attainment; the slope of attainment in speed there; "
          "the speed's spread within the run (1 s bins); the calibration's speed / the run's:")
    for n, r in rows:
        a, m = r["at_run_speed"], r["at_run_speed"]["to_match"]
        spread = f"+-{100 * a['within_run_speed_std']:.0f}%" if "within_run_speed_std" in a else "n/a"
        cal = r.get("calibrated")
        off = (f"prefill {cal['speed']['prefill'] / a['speed']['prefill']:.2f}, decode "
               f"{cal['speed']['decode'] / a['speed']['decode']:.2f}" if cal else "n/a")
        left = f" (closest: {m['diff_pp']:.1f} pp off)" if m["diff_pp"] > 100 / r["n"] + 1e-6 else ""
        print(f"  {n:<9} {r['rate']:6g} req/s: steps x {m['factor']:.2f}{left}; {m['pp_per_pct']:5.1f} pp "
              f"per 1% of speed; within the run {spread}; calibration {off}")
    factors = [abs(r["at_run_speed"]["to_match"]["factor"] - 1) for _, r in rows]
    print(f"largest speed error needed: {100 * max(factors):.0f}%")


def print_repeats(deps: dict) -> None:
    """Reality against itself: each rate run again straight after, same arrivals and prompts.
    No prediction can be closer to both runs than half their difference."""
    rows = _rows_having(deps, "repeats")
    if not rows:
        return
    print("\nThe same run again straight after (same arrivals and prompts, same server): real attainment "
          "run 1 -> run 2, and each simulated at its own speed with its slow spells replayed:")
    for n, r in rows:
        for k, again in enumerate(r["repeats"], 1):
            a1, a2 = r.get("at_run_speed") or {}, again.get("at_run_speed") or {}
            print(f"  {n:<9} {r['rate']:6g} req/s: real {pct(r['real']['attainment'])} -> "
                  f"{pct(again['real']['attainment'])} (diff {again['diff_vs_first_pp']:5.1f} pp); at run speed "
                  f"{pct(a1.get('sim_warped', {}).get('attainment'))} -> {pct(a2.get('sim_warped', {}).get('attainment'))}"
                  + (f"; {_steps(a1['speed'])} -> {_steps(a2['speed'])}" if a1 and a2 else ""))
    diffs = [again["diff_vs_first_pp"] for _, r in rows for again in r["repeats"]]
    print(f"largest difference between two real runs of the same trace: {max(diffs):.1f} pp "
          f"(mean {sum(diffs) / len(diffs):.1f}; over 3 at {sum(d > 3 for d in diffs)} of {len(diffs)})")


def _rows_having(deps: dict, key: str) -> list[tuple[str, dict]]:
    return [(n, r) for n, d in deps.items() for r in d["rows"] if r.get(key)]


def _steps(speed: dict) -> str:
    return f"steps x prefill {speed['prefill']:.2f}, decode {speed['decode']:.2f}"


def _fmt(x, digits: int = 2) -> str:
    if isinstance(x, dict):
        return ", ".join(f"{k} {v:.{digits}f}" for k, v in x.items())
    return ", ".join(f"{v:.{digits}f}" for v in x)


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for (n, d), color in zip(report["deployments"].items(), ("tab:blue", "tab:orange")):
        rows = d["rows"]
        x = [r["rate"] for r in rows]
        ax.plot(x, [100 * r["real"]["attainment"] for r in rows], "o-", color=color, label=f"{n} real")
        ax.plot(x, [100 * r["sim"]["attainment"] for r in rows], "x--", color=color, label=f"{n} sim")
        if all(r.get("calibrated") for r in rows):
            ax.plot(x, [100 * r["calibrated"]["sim"]["attainment"] for r in rows], "s-.", color=color,
                    markerfacecolor="none", label=f"{n} sim calibrated just before")
        for k in range(min(len(r["repeats"]) for r in rows)):
            ax.plot(x, [100 * r["repeats"][k]["real"]["attainment"] for r in rows], "o:", color=color,
                    markerfacecolor="none", label=f"{n} real, run {k + 2} of the same trace")
        warped = [r.get("at_run_speed") or {} for r in rows]
        if all("sim_warped" in a for a in warped):
            ax.plot(x, [100 * a["sim_warped"]["attainment"] for a in warped], "+:", color=color,
                    label=f"{n} sim at run speed")
    ax.axhline(90, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("rate (req/s, 2 cores)")
    ax.set_ylabel("SLO attainment (%)")
    s = report["slo"]
    ax.set_title(f"{report['workload']}: TTFT {s['ttft'] * 1e3:.0f} ms, TPOT {s['tpot'] * 1e3:.0f} ms")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=list(WORKLOADS), default="humaneval")
    ap.add_argument("--deployments", default=",".join(DEPLOYMENTS))
    ap.add_argument("--num-prompts", type=int, default=200, help="requests per rate (at most)")
    ap.add_argument("--budget-min", type=float, default=14.0, help="minutes the real runs may take: "
                    "fewer requests per rate when the rates are low")
    ap.add_argument("--num-rates", type=int, default=5)
    ap.add_argument("--rates", default=None, help="comma-separated req/s (default: chosen by the simulator)")
    ap.add_argument("--ttft-factor", type=float, default=4.0, help="TTFT SLO / mean prompt's prefill")
    ap.add_argument("--tpot-factor", type=float, default=2.0, help="TPOT SLO / single-request decode step")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-serving-latency", action="store_true", help="add no serving-path latency "
                    "(measured by the one-at-a-time probe) to the simulated TTFTs")
    ap.add_argument("--no-host-model", action="store_true", help="simulate the instances as if "
                    "the server and the bench client took none of their cores")
    ap.add_argument("--fresh-seeds", type=int, default=5, help="fresh simulated traces per rate")
    ap.add_argument("--reuse-profile", action="store_true", help="reuse the cached profile if the "
                    "engine code is unchanged")
    ap.add_argument("--reuse-real", action="store_true", help="re-simulate the saved real runs only")
    ap.add_argument("--repeats", type=int, default=1, help="real runs per rate, the same trace each "
                    "time, back to back (2 or more: how far this machine alone moves the attainment)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 30 prompts, 2 rates")
    ap.add_argument("--out", default=str(RESULTS / "sim_vs_real.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.num_prompts, args.num_rates, args.fresh_seeds = 30, 2, 3
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    names = args.deployments.split(",")
    real_path = {n: RESULTS / f"sim_vs_real_{args.workload}_{n}.json" for n in names}

    fp = code_fingerprint()
    reuse = (args.reuse_profile or args.reuse_real) and PROFILE.exists()
    if reuse:
        cached = json.loads(PROFILE.read_text())
        if cached.get("_code") != fp or cached.get("_workload") != args.workload or (
                cached.get("_quick") and not args.quick):
            if args.reuse_real:   # the saved real runs were served by the cached profile's code
                print("note: the cached profile is of other engine code, another workload, or a "
                      "--quick run; kept, since --reuse-real re-simulates runs made with it")
            else:
                print("the cached profile is of other engine code, another workload, or a --quick "
                      "run: profiling again")
                reuse = False
    if not reuse:
        run_profile(args.workload, args.quick)
    entry, prof_doc = load_entry()
    interference = None if args.no_host_model else measure_interference(prof_doc, args.quick)
    lengths = Lengths(WORKLOADS[args.workload]["lengths"])
    slo = slos(entry, lengths, args.ttft_factor, args.tpot_factor)
    fit = prof_doc.get("_fit_error", {}).get(MODEL_KEY, {})
    print(f"profile: prefill {entry.prefill}, decode {entry.decode_small} below batch {entry.threshold}, "
          f"{entry.decode_large} from it (ms; mean fit error prefill {fit.get('prefill', {}).get('mean', 0):.1%}, "
          f"decode {fit.get('decode', {}).get('mean', 0):.1%}); mean prompt "
          f"{slo['mean_input_len']:.0f} tokens prefills in {slo['mean_prefill_s'] * 1e3:.0f} ms, decode step "
          f"{slo['decode_step_s'] * 1e3:.1f} ms -> TTFT SLO {slo['ttft'] * 1e3:.0f} ms, TPOT SLO "
          f"{slo['tpot'] * 1e3:.1f} ms", flush=True)

    docs = {}
    if args.reuse_real:
        docs = {n: json.loads(real_path[n].read_text()) for n in names}
        rates = sorted({r["request_rate"] for d in docs.values() for r in runs_of(d)})
        first = runs_of(docs[names[0]])[0]
        slo.update({"ttft": first["ttft_slo"], "tpot": first["tpot_slo"]})
        args.num_prompts = len(first["requests"])
    else:
        if args.rates:
            rates = [float(x) for x in args.rates.split(",")]
        else:
            deps = {n: sim_deployment(n, entry, default_kv_tokens()) for n in names}
            rates = pick_rates(deps, lengths, slo, args.num_rates, max(args.num_prompts, 300))
        n_dep = len(names)
        fixed = n_dep * (len(rates) * 2 * RUN_OVERHEAD_S + PROBE_S + SERVER_START_S
                         + sum(CALIBRATION_REQUESTS / r for r in rates))
        fit = int((args.budget_min * 60 - fixed) / (n_dep * args.repeats * sum(1 / r for r in rates)))
        if fit < args.num_prompts:
            print(f"{args.num_prompts} requests per rate would take longer than --budget-min "
                  f"{args.budget_min:g}: {max(fit, 30)} each", flush=True)
            args.num_prompts = max(fit, 30)
        estimate = fixed + n_dep * args.repeats * sum(args.num_prompts / r for r in rates)
        print(f"rates {rates} req/s, {args.num_prompts} requests each: about {estimate / 60:.0f} min "
              "of real runs", flush=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="sim_vs_real-"))
        for n in names:
            docs[n] = run_real(n, args.workload, rates, slo, args.num_prompts, args.seed, real_path[n], tmp,
                               entry, args.repeats)

    report = {"workload": args.workload, "slo": slo, "rates": rates, "num_prompts": args.num_prompts,
              "interference": interference,
              "profile": {"path": str(PROFILE.relative_to(ROOT)), "entry": entry.to_dict(),
                          "fit_error": prof_doc.get("_fit_error", {}).get(MODEL_KEY), "code": prof_doc.get("_code")},
              "deployments": {}}
    for n in names:
        report["deployments"][n] = {"serve_flags": DEPLOYMENTS[n], "server": docs[n].get("_server"),
                                    "probe": probe_check(docs[n], entry),
                                    "rows": compare(deployment_of(n, docs[n]), docs[n], entry, slo, lengths,
                                                    args.fresh_seeds, not args.no_host_model,
                                                    not args.no_serving_latency, interference)}
    report["max_diff_pp"] = max(r["diff_pp"] for d in report["deployments"].values() for r in d["rows"])
    cal = [r["calibrated"]["diff_pp"] for d in report["deployments"].values() for r in d["rows"] if r.get("calibrated")]
    report["max_diff_calibrated_pp"] = max(cal) if cal else None
    rep = [a["diff_vs_first_pp"] for d in report["deployments"].values() for r in d["rows"] for a in r["repeats"]]
    report["max_repeat_diff_pp"] = max(rep) if rep else None
    report["seconds"] = time.monotonic() - t_start
    print_tables(report)
    out = pathlib.Path(args.out)
    out.write_text(json.dumps(report, indent=2))
    try:
        plot(report, out.with_suffix(".png"))
    except ImportError:
        pass
    print(f"saved {out} ({report['seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
