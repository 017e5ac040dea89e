"""The study's plots (PNG via matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import os

from .importance import Scores

_YLABELS = {
    "jaccard": "1 − mean Jaccard(top-k)",
    "cosine": "1 − mean cosine(in, out)",
    "zscore": "share of |z| > 1 weights",
}


def plot_importance(scores: dict[str, Scores] | Scores, path: str | os.PathLike) -> None:
    """One panel per metric (their scales differ), layers on a shared x axis; the least
    important layer of each metric is drawn in a contrasting colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_metric = {scores.metric: scores} if isinstance(scores, Scores) else dict(scores)
    n = len(by_metric)
    first = next(iter(by_metric.values()))
    L = len(first.importance)
    fig, axes = plt.subplots(n, 1, figsize=(max(6.0, 0.3 * L + 2), 2.6 * n + 0.6), sharex=True,
                             squeeze=False)
    for ax, (metric, s) in zip(axes[:, 0], by_metric.items()):
        colors = ["C3" if i == s.order[0] else "C0" for i in range(L)]
        ax.bar(range(L), s.importance, color=colors)
        params = ", ".join(f"{k}={v}" for k, v in s.params.items() if k in ("k", "final_norm"))
        ax.set_title(f"{metric}" + (f" ({params})" if params else "")
                     + f" — least important: layer {s.order[0]}", fontsize=10)
        ax.set_ylabel(_YLABELS.get(metric, "importance"), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("decoder layer")
    axes[-1, 0].set_xticks(range(L))
    axes[-1, 0].tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Layer importance: {first.model.get('name', 'model')} ({L} layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quality_vs_bits(results: dict[str, dict[str, dict]], path: str | os.PathLike) -> None:
    """Perplexity against average bits, one line per metric's layer order through its mixes;
    FP16, INT8 and all-INT4 (the same plan under every metric) as reference lines.

    results[metric][point] = {"avg_bits": float, "perplexity": float}, point in
    fp16, int8, 25%, 50%, 75%, int4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    first = next(iter(results.values()))
    for ref, style in (("fp16", ":"), ("int8", "--"), ("int4", "-.")):
        ax.axhline(first[ref]["perplexity"], color="grey", ls=style, lw=1,
                   label=f"{ref.upper()} ({first[ref]['perplexity']:.2f})")
    for metric, pts in results.items():
        keys = ["int8", "25%", "50%", "75%", "int4"]
        ax.plot([pts[k]["avg_bits"] for k in keys], [pts[k]["perplexity"] for k in keys],
                marker="o", label=metric)
    ax.set_xlabel("average bits per decoder weight (stored bytes, scales included)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("INT4 on the least important 0/25/50/75/100% of layers, INT8 elsewhere")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_zeroshot_vs_bits(results: dict[str, dict[str, dict]], tasks: list[str],
                          path: str | os.PathLike) -> None:
    """Average zero-shot accuracy against average bits, one line per order, error bars of one
    standard error; FP16 as a reference band."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def avg(r):
        z = r["zeroshot"]
        return (100 * sum(z[t]["acc"] for t in tasks) / len(tasks),
                100 * math.sqrt(sum(z[t]["acc_stderr"] ** 2 for t in tasks)) / len(tasks))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    first = next(iter(results.values()))
    a, se = avg(first["fp16"])
    ax.axhspan(a - se, a + se, color="grey", alpha=0.2, label=f"FP16 ({a:.1f} ± {se:.1f})")
    keys = ["int8", "25%", "50%", "75%", "int4"]
    for i, (order, pts) in enumerate(results.items()):
        ys = [avg(pts[k]) for k in keys]
        # a small horizontal offset per order keeps overlapping error bars readable
        ax.errorbar([pts[k]["avg_bits"] + 0.04 * (i - 1.5) for k in keys], [y for y, _ in ys],
                    yerr=[e for _, e in ys], marker="o", capsize=3, label=order,
                    ls="--" if order == "best" else "-")
    ax.set_xlabel("average bits per decoder weight (stored bytes, scales included)")
    ax.set_ylabel(f"mean accuracy over {len(tasks)} tasks, % (higher is better)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Zero-shot accuracy: INT4 on the least important layers, INT8 elsewhere", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
