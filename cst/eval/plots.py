"""PNG plots for evaluation: S0/S1 bars with bootstrap intervals per model, and training curves from
trainer histories. matplotlib is imported inside the functions, through its object API with the Agg
canvas, so importing cst never loads it and a notebook's pyplot backend is left alone.
"""
from pathlib import Path
from ..core.atomic import atomic_open

__all__ = ["plot_configurability", "plot_training_curves", "CURVE_KEYS"]

CURVE_KEYS = ("loss", "rewards/margins", "rewards/accuracies")


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return str(path)


def plot_configurability(rows, path) -> str:
    """Grouped bars of S0 and S1 per model with their 95% intervals as error bars.

    rows: dicts with "model", "S0", "S0_ci", "S1", "S1_ci" (the table of cst.eval.compare). Missing
    values (None) are drawn as empty bars. Returns the path written.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("plot_configurability: rows is empty")
    fig = _figure(max(4.0, 1.4 * len(rows) + 2.0), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.38
    for j, (key, label) in enumerate((("S0", "S0: follows uncensored"), ("S1", "S1: follows safe"))):
        xs, ys, lo, hi = [], [], [], []
        for i, r in enumerate(rows):
            v, ci = r.get(key), r.get(key + "_ci")
            xs.append(i + (j - 0.5) * width)
            ys.append(0.0 if v is None else v)
            lo.append(0.0 if v is None or ci is None else v - ci[0])
            hi.append(0.0 if v is None or ci is None else ci[1] - v)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=4, label=label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["model"] for r in rows])
    ax.set_ylim(0.0, 1.22)  # headroom for the legend above the bars
    ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("share of responses")
    ax.set_title("Configurability (95% prompt-bootstrap intervals)")
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _series(history, key):
    pts = [(h.get("step", i), h[key]) for i, h in enumerate(history)
           if isinstance(h, dict) and isinstance(h.get(key), (int, float)) and not isinstance(h.get(key), bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training_curves(histories, path, keys=CURVE_KEYS) -> str:
    """One panel per key (default loss, reward margins, reward accuracies), one line per run: the training
    value solid and its "eval_"-prefixed counterpart dashed, against "step" (else the entry index).

    histories: {name: list of dicts} as trainers log them; entries without a key are skipped. Returns the
    path written.
    """
    if isinstance(histories, (list, tuple)):
        histories = {"run": histories}
    if not isinstance(histories, dict) or not histories:
        raise ValueError("plot_training_curves: histories must be a non-empty dict name -> list of dicts")
    keys = list(keys)
    fig = _figure(4.0 * len(keys), 3.4)
    for k, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), k + 1)
        drawn = False
        for n, (name, hist) in enumerate(histories.items()):
            color = f"C{n % 10}"
            for prefix, style in (("", "-"), ("eval_", "--")):
                xs, ys = _series(hist, prefix + key)
                if xs:
                    ax.plot(xs, ys, style, color=color, marker="o" if len(xs) < 3 else None,
                            label=f"{name} ({'eval' if prefix else 'train'})")
                    drawn = True
        ax.set_title(key)
        ax.set_xlabel("step")
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _save(fig, path)
