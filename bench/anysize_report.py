"""The any-size bench's outputs (bench/anysize.py): the comparison rows, the printed table and the plot."""
from __future__ import annotations

import io
from typing import Any

from bitalloc.sweep import Point, best_measured_uniform

STYLE = {"allocated": ("o-", "tab:red", "direct (bitalloc plan + GPTQ per budget)"),
         "nested": ("^-", "tab:green", "nested (one artifact, extracted)"),
         "uniform": ("s--", "tab:gray", "uniform (GPTQ)"),
         "bitstack": ("D-", "tab:purple", "BitStack-style stack")}


def plot_png(points: list[Point], total_params: int, title: str) -> bytes:
    """KLD vs bpw (log y), one line per kind, uniform formats annotated (the look of bench/pareto's plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, (marker, colour, label) in STYLE.items():
        pts = sorted((p for p in points if p.kind == kind), key=lambda p: p.bytes)
        if pts:
            ax.plot([p.bpw for p in pts], [max(p.kld, 1e-9) for p in pts], marker, color=colour, label=label,
                    alpha=0.6 if kind == "uniform" else 1.0)
        if kind == "uniform":
            for p in pts:
                ax.annotate(p.label, (p.bpw, max(p.kld, 1e-9)), fontsize=7, alpha=0.7)
    mib = total_params / 8 / 2**20
    ax.secondary_xaxis("top", functions=(lambda x: x * mib, lambda y: y / mib)).set_xlabel(
        "size of all weights (MiB)")
    ax.set_xlabel("bits per weight (all weights)")
    ax.set_ylabel("KLD to the fp model (nats/token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def comparison(points: list[Point], budgets: list[str], budget_bytes: dict[str, int], nest: dict) -> list[dict]:
    rows = []
    for b in budgets:
        get = {k: next((p for p in points if p.kind == k and p.budget == b), None)
               for k in ("allocated", "nested", "bitstack")}
        try:
            u = best_measured_uniform(points, budget_bytes[b], "gptq")
        except ValueError:
            u = None
        d, n = get["allocated"], get["nested"]
        rows.append({"budget": b, "budget_bytes": budget_bytes[b],
                     "direct_kld": d and d.kld, "nested_kld": n and n.kld, "uniform_kld": u and u.kld,
                     "uniform_format": u and u.label, "bitstack_kld": get["bitstack"] and get["bitstack"].kld,
                     "direct_bytes": d and d.bytes, "nested_bytes": n and n.bytes, "uniform_bytes": u and u.bytes,
                     "bitstack_bytes": get["bitstack"] and get["bitstack"].bytes,
                     "nested_over_direct": n.kld / d.kld if n and d and d.kld > 0 else None,
                     "nested_beats_uniform": n.kld < u.kld if n and u else None,
                     "extract_seconds": nest.get("extract", {}).get(b, {}).get("extract_seconds")})
    return rows


def table(rows: list[dict], nest: dict) -> str:
    def f(v: Any, spec: str = ">9.5f") -> str:
        return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else format(str(v or "-"), ">9")
    head = (f"{'budget':<8} {'direct':>9} {'nested':>9} {'uniform':>9} {'(format)':>12} {'bitstack':>9} "
            f"{'nest/dir':>9} {'n<unif':>7} {'extract s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['budget']:<8} {f(r['direct_kld'])} {f(r['nested_kld'])} {f(r['uniform_kld'])} "
                     f"{str(r['uniform_format'] or '-'):>12} {f(r['bitstack_kld'])} {f(r['nested_over_direct'], '>9.3f')} "
                     f"{str(r['nested_beats_uniform'] if r['nested_beats_uniform'] is not None else '-'):>7} "
                     f"{f(r['extract_seconds'], '>9.2f')}")
    if nest:
        lines.append(f"nest: {nest['nest_seconds']:.0f} s once; artifact {nest['artifact_bytes']} B on disk / its largest "
                     f"model {nest['largest_model_bytes']} B = {nest['artifact_ratio']:.3f} (goal <= 1.15); / the "
                     f"largest benchmarked model {nest['largest_budget_model_bytes']} B = "
                     f"{nest['artifact_over_largest_budget']:.3f}")
    return "\n".join(lines)
