"""The report of `distserve tune`: a JSON of every round, a markdown summary, and a PNG of SLO
attainment against rate per round: the predicted band (distserve.planner.error_bars) around
the point predictions, the measured points and their repeats, and the compared deployment's
predicted band."""
from __future__ import annotations

import json
import pathlib


def write_report(doc: dict, out: pathlib.Path) -> None:
    (out / "report.json").write_text(json.dumps(doc, indent=2, default=str))
    (out / "report.md").write_text(render(doc))
    if doc["rounds"]:
        plot(doc, out / "attainment.png")


def _plan_line(plan: dict) -> str:
    if plan.get("mode") == "colocated":
        c = plan["colocated"]
        return f"colocated: {c.get('instances', 1)} x (TP {c['tp']}, PP {c['pp']})"
    p, d = plan["prefill"], plan["decode"]
    return (f"disaggregated: {p['instances']} x prefill (TP {p['tp']}, PP {p['pp']}) + "
            f"{d['instances']} x decode (TP {d['tp']}, PP {d['pp']})")


def _pct_band(band: list | None) -> str:
    return "-" if not band else f"[{100 * band[0]:.1f}, {100 * band[1]:.1f}]"


def _band_text(r: dict) -> str:
    """How this round's bands were computed, in its own numbers."""
    b = r.get("band") or {}
    w, fit, spread = b.get("widths") or {}, b.get("fit_error"), b.get("speed_spread")
    if not w:
        return ""
    parts = [f"the profile's mean fit error ({_phases(fit)})" if fit else
             "the profile's fit error (not recorded in this profile)"]
    if spread:
        parts.append(f"the previous round's run-to-run speed spread ({_phases(spread)})")
    why = f"the larger of {parts[0]} and {parts[1]}" if len(parts) > 1 else parts[0]
    return (f"Bands: the fit band replays each run's exact trace with every step "
            f"{_phases(w, '±')} slower and faster ({why}); the seed "
            f"band simulates {b.get('seeds')} other samples of the run (its own prompt and output "
            "lengths drawn with replacement, fresh Poisson arrivals at the same rate, as many "
            "requests); the predicted band spans the point, the fit band and the seed band. "
            "'inside': the measured point falls in it.")


def _phases(d: dict, sign: str = "") -> str:
    return ", ".join(f"{phase} {sign}{100 * v:.1f}%" for phase, v in d.items())


def render(doc: dict) -> str:
    lines = [f"# distserve tune: {doc['model']}, {doc['workload']}", "",
             f"SLOs: TTFT {doc['ttft_slo'] * 1e3:.0f} ms, TPOT {doc['tpot_slo'] * 1e3:.0f} ms; "
             f"{doc['cores']} core(s); latency profile `{doc.get('latency_profile', '-')}`; "
             f"stopped: {doc['stopped']}" + (f" after {doc['seconds']} s" if "seconds" in doc else "")
             + ".", ""]
    for r in doc["rounds"]:
        speed = r["speed_planned"]
        alt = (r.get("band") or {}).get("alternative")
        lines += [f"## Round {r['round']}", "",
                  f"Plan ({'at the profile speed' if not speed else f'at the measured speed {speed}'}): "
                  f"{_plan_line(r['plan'])}; predicted goodput {r['predicted_goodput']:.3g} req/s. "
                  f"Its instances' steps ran at {r['speed_measured']} x the profile "
                  "(the next round plans at that speed).", "",
                  "| rate (req/s) | measured attainment | predicted | predicted [low, high] | "
                  "fit band | seed band | inside | error (points) | run-to-run spread | "
                  "holds (within max(3, spread)) |" + (f" {alt}, predicted [low, high] |" if alt else ""),
                  "| --- " * (10 + bool(alt)) + "|"]
        for run in r["runs"]:
            spread, b = run.get("spread_pp"), run.get("band")
            lines.append(f"| {run['rate']:.3g} | {100 * run['measured']['attainment']:.1f}% | "
                         f"{100 * run['predicted']['attainment']:.1f}% | {_pct_band(_ends(b))} | "
                         f"{_pct_band(b and b['fit'])} | {_pct_band(b and b['seeds'])} | "
                         f"{'-' if b is None else 'yes' if run['inside'] else 'no'} | "
                         f"{run['error_pp']:+.1f} | "
                         f"{'-' if spread is None else f'{spread:.1f}'} | "
                         f"{'yes' if run['holds'] else 'no'} |"
                         + (f" {_pct_band(_ends(run.get('alternative')))} |" if alt else ""))
        text = _band_text(r)
        lines += ["", *([text, ""] if text else [])]
    lines += ["The prediction simulates exactly the arrivals and lengths each run sent; the "
              "spread is that of the same trace run again straight after (--repeats; '-': one "
              "run per rate, so the bound is 3 points).", ""]
    return "\n".join(lines)


def _ends(band: dict | None) -> list | None:
    return [band["low"], band["high"]] if band else None


def plot(doc: dict, path: pathlib.Path) -> None:
    """Per round: the predicted band (filled) around the point predictions, the measured
    points and their repeats, and the compared deployment's band (hatched)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in doc["rounds"]:
        runs, k = r["runs"], r["round"]
        if not runs:
            continue
        rates = [run["rate"] for run in runs]
        line, = ax.plot(rates, [100 * run["predicted"]["attainment"] for run in runs], "-",
                        label=f"round {k} predicted")
        color = line.get_color()
        if all(run.get("band") for run in runs):
            ax.fill_between(rates, [100 * run["band"]["low"] for run in runs],
                            [100 * run["band"]["high"] for run in runs], color=color, alpha=0.2,
                            label=f"round {k} predicted band")
        ax.plot(rates, [100 * run["measured"]["attainment"] for run in runs], "o", color=color,
                label=f"round {k} measured")
        again = [(run["rate"], 100 * a) for run in runs for a in run.get("repeats", [])]
        if again:
            ax.plot(*zip(*again), "x", color=color, label=f"round {k} repeats")
        alt = (r.get("band") or {}).get("alternative")
        if alt and all(run.get("alternative") for run in runs):
            ax.fill_between(rates, [100 * run["alternative"]["low"] for run in runs],
                            [100 * run["alternative"]["high"] for run in runs], facecolor="none",
                            edgecolor=color, hatch="//", linewidth=0.0,
                            label=f"round {k}: {alt} (predicted)")
    ax.axhline(90, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(f"{doc['model']}, {doc['workload']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
