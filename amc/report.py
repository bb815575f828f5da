"""Tables and plots: layer info, the summary table, the policy and episode plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from amc.files import atomic_write
from amc.selection import origin


def table(headers: Sequence[str], rows: Sequence[Sequence], markdown: bool = False) -> str:
    """Plain (or Markdown) text table with right-aligned columns after the first."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts)

    out = [line(cells[0])]
    out.append(("|" + "|".join("-" * (w + 2) for w in widths) + "|") if markdown else "  ".join("-" * w for w in widths))
    out += [line(row) for row in cells[1:]]
    return "\n".join(out)


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def comparison_table(rows: dict[str, dict], markdown: bool = False, quantized: bool = False) -> str:
    """One row per model (original, the answer, each rule): size, cost and accuracy before and after
    fine-tuning; with ``quantized``, also the weight storage and BitOPs."""
    large = sorted({k for m in rows.values() for k in m if k.startswith("latency_ms_b")})
    fields = [("MACs", "macs", human), ("params", "params", human), ("non-zero", "nonzero_params", human),
              ("weight bytes", "weight_bytes", human), ("BitOPs", "bitops", human), ("latency ms", "latency_ms", _ms),
              *[(f"ms, batch {k.removeprefix('latency_ms_b')}", k, _ms) for k in large],
              ("reward-val", "reward_val_top1", _percent), ("select", "select_top1", _percent),
              ("test", "test_top1", _percent), ("test after FT", "finetuned_test_top1", _percent)]
    fields = [f for f in fields if any(f[1] in m for m in rows.values())
              and (quantized or f[1] not in ("weight_bytes", "bitops"))]
    body = [[name] + [fmt(m[key]) if key in m else "-" for _, key, fmt in fields] for name, m in rows.items()]
    return table([""] + [label for label, _, _ in fields], body, markdown)


def _percent(v: float) -> str:
    return f"{100 * v:.2f}%"


def _ms(v: float) -> str:
    return f"{v:.2f}"


def _save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_policy(best: dict, path: Path) -> None:
    """Preserve ratio (bit width, quantize mode) per unit of the best policy (the paper's per-layer figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode = best.get("mode", "channel")
    values = best["keep"] if mode == "quantize" else best["ratios"]
    label = {"quantize": "bit width", "joint": "preserve ratio (bits / 32 for bit widths)"}.get(mode, "preserve ratio")
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(values)), 3.5))
    ax.bar(range(len(values)), values, color="#3b75af")
    ax.set_ylim(0, max(values) + 0.5 if mode == "quantize" else 1.05)
    ax.set_xlabel("unit (forward order)")
    ax.set_ylabel(label)
    ax.set_title(f"best policy: {origin(best)}, error {best['error']:.3f}, "
                 f"cost {best['cost_ratio']:.3f} of the original")
    _save_figure(fig, path)
    plt.close(fig)


def plot_episodes(rows: list[dict], path: Path) -> None:
    """Reward and cost ratio per episode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episodes = [r["episode"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.plot(episodes, [r["reward"] for r in rows], ".", markersize=3)
    top.set_ylabel("reward")
    bottom.plot(episodes, [r["cost_ratio"] for r in rows], ".", markersize=3, color="#c44e52")
    bottom.set_ylabel("cost ratio")
    bottom.set_xlabel("episode")
    _save_figure(fig, path)
    plt.close(fig)
