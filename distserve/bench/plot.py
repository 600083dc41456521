"""The paper's attainment figures for a sweep: SLO attainment (%) against per-GPU rate, or
against SLO scale (drawn tightening to the right, so both kinds fall from left to right), with
three curves (both SLOs, TTFT only, TPOT only), the target line and the crossing found."""

from __future__ import annotations


def plot_sweep(sweep: dict, path: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_rate = sweep["kind"] == "rate_sweep"
    gpus = sweep.get("num_gpus") or 1
    points = [p for p in sweep["points"] if not (by_rate and isinstance(p["request_rate"], str))]
    xs = [p["request_rate"] / gpus if by_rate else p["slo_scale"] for p in points]
    fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=120)
    # "Both" wide and underneath, so the single-SLO curves stay visible where they coincide
    for key, label, style, width in (("slo_attainment", "Both", "o-", 3.0),
                                     ("ttft_attainment", "TTFT only", "s--", 1.2),
                                     ("tpot_attainment", "TPOT only", "^:", 1.6)):
        ax.plot(xs, [100 * p[key] for p in points], style, label=label, markersize=4, linewidth=width)
    target = 100 * sweep["attainment_target"]
    ax.axhline(target, color="grey", linewidth=0.8, linestyle="-.")
    crossing = sweep["crossing"]["value"]
    if crossing is not None:
        x = crossing / gpus if by_rate else crossing
        ax.axvline(x, color="grey", linewidth=0.8, linestyle="-.")
        ax.annotate(f"{x:.3g}", (x, target), textcoords="offset points", xytext=(4, -12), fontsize=8)
    if by_rate:
        ax.set_xlabel("Per-GPU rate (req/s)" if gpus != 1 else "Rate (req/s)")
    else:
        ax.set_xlabel("SLO scale")
        ax.invert_xaxis()
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, linewidth=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or sweep.get("title", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
