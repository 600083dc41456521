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


def plot_rate_sweeps(sweeps: dict[str, dict], path: str, title: str = "") -> None:
    """Several deployments' rate sweeps on one figure: attainment of both SLOs against rate,
    one curve per deployment (label -> sweep), the target line and each crossing marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=120)
    target = None
    markers = "osD^vP*X"
    for i, (label, sweep) in enumerate(sweeps.items()):
        points = [p for p in sweep["points"] if not isinstance(p["request_rate"], str)
                  and p["slo_attainment"] is not None]
        # each its own marker, the first drawn widest: curves that coincide stay visible
        line, = ax.plot([p["request_rate"] for p in points], [100 * p["slo_attainment"] for p in points],
                        markers[i % len(markers)] + "-", label=label, markersize=5 - 0.5 * min(i, 4),
                        linewidth=max(3.0 - 0.7 * i, 1.0))
        target = 100 * sweep["attainment_target"]
        if sweep["crossing"]["value"] is not None:
            ax.axvline(sweep["crossing"]["value"], color=line.get_color(), linewidth=0.8, linestyle=":")
    if target is not None:
        ax.axhline(target, color="grey", linewidth=0.8, linestyle="-.")
    ax.set_xlabel("Rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, linewidth=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
