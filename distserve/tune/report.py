"""The report of `distserve tune`: a JSON of every round, a markdown summary, and a PNG of SLO
attainment against rate (predicted line, measured points) per round."""
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


def render(doc: dict) -> str:
    lines = [f"# distserve tune: {doc['model']}, {doc['workload']}", "",
             f"SLOs: TTFT {doc['ttft_slo'] * 1e3:.0f} ms, TPOT {doc['tpot_slo'] * 1e3:.0f} ms; "
             f"{doc['cores']} core(s); latency profile `{doc.get('latency_profile', '-')}`; "
             f"stopped: {doc['stopped']}" + (f" after {doc['seconds']} s" if "seconds" in doc else "")
             + ".", ""]
    for r in doc["rounds"]:
        speed = r["speed_planned"]
        lines += [f"## Round {r['round']}", "",
                  f"Plan ({'at the profile speed' if not speed else f'at the measured speed {speed}'}): "
                  f"{_plan_line(r['plan'])}; predicted goodput {r['predicted_goodput']:.3g} req/s. "
                  f"Its instances' steps ran at {r['speed_measured']} x the profile "
                  "(the next round plans at that speed).", "",
                  "| rate (req/s) | measured attainment | predicted | error (points) | "
                  "run-to-run spread | holds (within max(3, spread)) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for run in r["runs"]:
            spread = run.get("spread_pp")
            lines.append(f"| {run['rate']:.3g} | {100 * run['measured']['attainment']:.1f}% | "
                         f"{100 * run['predicted']['attainment']:.1f}% | {run['error_pp']:+.1f} | "
                         f"{'-' if spread is None else f'{spread:.1f}'} | "
                         f"{'yes' if run['holds'] else 'no'} |")
        lines.append("")
    lines += ["The prediction simulates exactly the arrivals and lengths each run sent; the "
              "spread is that of the same trace run again straight after (--repeats; '-': one "
              "run per rate, so the bound is 3 points).", ""]
    return "\n".join(lines)


def plot(doc: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in doc["rounds"]:
        rates = [run["rate"] for run in r["runs"]]
        ax.plot(rates, [100 * run["predicted"]["attainment"] for run in r["runs"]], "-",
                label=f"round {r['round']} predicted")
        ax.plot(rates, [100 * run["measured"]["attainment"] for run in r["runs"]], "o",
                label=f"round {r['round']} measured")
    ax.axhline(90, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(f"{doc['model']}, {doc['workload']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
