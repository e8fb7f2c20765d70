"""Reporting of evaluation results: markdown tables and the accuracy-vs-shots plot.

The input is the results mapping described in :func:`results_markdown`, as
:mod:`primus_jax.evaluate`'s probes and :mod:`primus_jax.suite` produce it; nothing here
trains or scores anything.
"""
from __future__ import annotations

import io
from typing import Any, Mapping

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


def _format_cell(stats: Mapping[str, Any] | None) -> str:
    """"mean ± se" of a shot count's stats; "n/a" for a shot count that was not run."""
    if stats is None:
        return "n/a"
    if stats.get("se") is None:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} ± {stats['se']:.3f}"


def _format_probe(stats: Mapping[str, Any] | None) -> str:
    """"C" (median chosen C over trials), with the count of fits that did not converge; "n/a" when not run."""
    if stats is None or "c" not in stats:
        return "n/a"
    failed = len(stats["converged"]) - sum(stats["converged"])
    return f"{float(np.median(stats['c'])):g}" + (f" (not converged: {failed})" if failed else "")


def _shot_table(methods: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[int, Mapping[str, Any]]]:
    """{method: {k: stats}} with integer k (JSON turns the keys into strings)."""
    return {name: {int(k): v for k, v in m.get("few_shot", {}).items()} for name, m in methods.items()}


def results_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown tables of ``results``: rows methods, columns shots.

    ``results`` maps an evaluation-set name (e.g. "in-domain (held-out subjects)") to
    {"num_classes": C, "methods": {method: {"few_shot": <evaluate.few_shot_probe output>,
    "zero_shot": accuracy (optional), "retrieval": <evaluate.retrieval_recall output> (optional)}}}.

    The columns are the shot counts found in the results plus an evaluation set's optional
    "shots" list, so a shot count no method could run shows as "n/a".
    """
    lines = ["# Evaluation results", ""]
    for set_name, eval_set in results.items():
        methods = eval_set["methods"]
        few_shot = _shot_table(methods)
        shots = sorted({k for table in few_shot.values() for k in table} | set(eval_set.get("shots", ())))
        has_zero_shot = any("zero_shot" in m for m in methods.values())
        header = ["method"] + [f"{k}-shot" for k in shots] + (["zero-shot"] if has_zero_shot else [])
        lines += [f"## {set_name}", "", f"{eval_set['num_classes']} classes, chance {1 / eval_set['num_classes']:.3f}; top-1 accuracy, mean ± standard error over trials.", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, method in methods.items():
            cells = [name] + [_format_cell(few_shot[name].get(k)) for k in shots]
            if has_zero_shot:
                cells.append(f"{method['zero_shot']:.3f}" if "zero_shot" in method else "—")
            lines.append("| " + " | ".join(cells) + " |")
        probed = {name: table for name, table in few_shot.items() if any("c" in s for s in table.values())}
        if probed:
            lines += ["", "Probe C per shot count (median over trials; \"not converged: n\" counts fits that hit the "
                      "iteration limit):", "", "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |",
                      "|" + "---|" * (len(shots) + 1)]
            for name, table in probed.items():
                lines.append(f"| {name} | " + " | ".join(_format_probe(table.get(k)) for k in shots) + " |")
        retrieval = {name: m["retrieval"] for name, m in methods.items() if "retrieval" in m}
        if retrieval:
            columns = list(next(iter(retrieval.values())))
            lines += ["", "IMU→text retrieval:", "", "| method | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
            for name, recalls in retrieval.items():
                lines.append(f"| {name} | " + " | ".join(f"{recalls[c]:.3f}" for c in columns) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_accuracy_vs_shots(results: Mapping[str, Mapping[str, Any]]) -> bytes:
    """PNG bytes of one subplot per evaluation set: accuracy vs shots (log x), error bars = se, chance line.

    Every method keeps one colour (tab10, or tab20 beyond ten methods) in every panel, and one
    legend below the panels names them.
    """
    names = list(dict.fromkeys(name for eval_set in results.values() for name in eval_set["methods"]))
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colour = {name: palette(i % palette.N) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, (set_name, eval_set) in zip(axes[0], results.items()):
        all_shots = set()
        for name, table in _shot_table(eval_set["methods"]).items():
            if not table:
                continue
            shots = sorted(table)
            all_shots.update(shots)
            means = [table[k]["mean"] for k in shots]
            errors = [table[k]["se"] or 0.0 for k in shots]
            ax.errorbar(shots, means, yerr=errors, marker="o", capsize=3, label=name, color=colour[name])
        ax.axhline(1 / eval_set["num_classes"], color="grey", linestyle="--", label="chance")
        ax.set_xscale("log")
        ax.set_xticks(sorted(all_shots), [str(k) for k in sorted(all_shots)])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("labelled windows per class (shots)")
        ax.set_ylabel("test accuracy (top-1)")
        ax.set_ylim(0, 1)
        ax.set_title(set_name)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = {}, []
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    columns = min(len(labels), 4)
    rows = -(-len(labels) // columns)
    fig.set_figheight(4.2 + 0.25 * rows)
    fig.legend([handles[label] for label in labels], labels, loc="lower center", ncol=columns, fontsize="small")
    fig.tight_layout(rect=(0, 0.25 * rows / fig.get_figheight() + 0.02, 1, 1))
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    plt.close(fig)
    return png.getvalue()
