"""The figures: fold AUROCs per row, ROC curves (of the report's rows, of evaluate's domains), evaluate's confusion
matrix, a reliability diagram."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from analysis.tables import MEAN, SD  # noqa: E402
from data_tools.constants import ATYPICAL, NORMAL  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_fold_aurocs(table1: pd.DataFrame, path: str | Path) -> Path:
    """Mean ± population SD of the fold AUROCs (%) per row, with each fold as a dot."""
    fold_cols = [c for c in table1.columns if c.startswith("F") and c[1:].isdigit()]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(table1), 4))
    x = np.arange(len(table1))
    ax.errorbar(x, table1[MEAN], yerr=table1[SD], fmt="o", capsize=6, color="black", label="mean ± SD", zorder=3)
    for i, (_, row) in enumerate(table1.iterrows()):
        vals = row[fold_cols].to_numpy(float)
        jitter = np.linspace(-0.15, 0.15, len(vals))
        ax.scatter(i + jitter, vals, s=18, alpha=0.7, label="folds" if i == 0 else None)
    ax.set_xticks(x, table1.index, rotation=20, ha="right")
    ax.set_ylabel("CV AUROC (%)")
    ax.set_title(f"{len(fold_cols)}-fold cross-validation AUROC")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "Test ROC", bold: str | None = None):
    """ROC curves on one plot, each labelled with its AUROC (%); `curves`: label -> (y_true, prob)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, (y, p) in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2.2 if label == bold else 1.2, label=f"{label} (AUROC {roc_auc_score(y, p) * 100:.2f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    return fig


def plot_domain_rocs(frame: pd.DataFrame, path: str | Path) -> Path:
    """evaluate's ROC, saved: all crops (bold) and each domain with both classes; `frame`: label, prob, domain."""
    groups = [("all", frame)] + [(str(d), g) for d, g in frame.groupby("domain", sort=True)]
    curves = {name: (g["label"].to_numpy(), g["prob"].to_numpy()) for name, g in groups if g["label"].nunique() == 2}
    return _save(roc_figure(curves, "Test ROC (AUROC)", bold="all"), path)


def plot_confusion(frame: pd.DataFrame, threshold: float, path: str | Path) -> Path:
    """evaluate's confusion matrix at the threshold, saved; `frame`: label, prob."""
    y, pred = frame["label"].to_numpy(), (frame["prob"].to_numpy() >= threshold).astype(int)
    cm = np.array([[np.sum((y == t) & (pred == p)) for p in (NORMAL, ATYPICAL)] for t in (NORMAL, ATYPICAL)])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(cm, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["normal", "atypical"], yticklabels=["normal", "atypical"],
           xlabel="predicted", ylabel="true", title=f"Confusion at threshold {threshold:.3f}")
    return _save(fig, path)


def plot_rocs(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "Test ROC") -> Path:
    """The ROC curves of all rows, saved."""
    return _save(roc_figure(curves, title), path)


def plot_calibration(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, n_bins: int = 10,
                     title: str = "Reliability diagram") -> Path:
    """Observed atypical fraction against mean predicted probability, quantile bins, per row."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6.5), height_ratios=(3, 1), sharex=True)
    for label, (y, p) in curves.items():
        frac, mean_p = calibration_curve(y, p, n_bins=n_bins, strategy="quantile")
        ax.plot(mean_p, frac, marker="o", ms=3, label=label)
        hist.hist(p, bins=20, range=(0, 1), histtype="step", label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(ylabel="observed fraction atypical", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=7)
    hist.set(xlabel="predicted probability of atypical", ylabel="crops")
    hist.set_yscale("log")
    hist.set_ylim(bottom=0.5)
    return _save(fig, path)


def plot_domain_gap(gaps: dict[str, tuple[list[float], list[float]]], path: str | Path) -> Path:
    """Per row, slide-grouped CV vs leave-one-domain-out AUROC (%): mean ± population SD over the
    folds (domains), each fold a dot; `gaps`: label -> (grouped fold AUROCs, held-out-domain AUROCs)."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.8 * len(gaps), 4))
    for i, (label, (grouped, held_out)) in enumerate(gaps.items()):
        for dx, values, name, colour in ((-0.18, grouped, "slide-grouped CV", "tab:blue"),
                                         (0.18, held_out, "leave one domain out", "tab:orange")):
            ax.bar(i + dx, np.mean(values), 0.34, yerr=np.std(values), capsize=4, color=colour, alpha=0.6,
                   label=name if i == 0 else None)
            ax.scatter(np.full(len(values), i + dx), values, s=14, color="black", zorder=3)
        gap = np.mean(grouped) - np.mean(held_out)
        ax.annotate(f"gap {gap:+.1f} pp", (i, max(max(grouped), max(held_out)) + 1.5), ha="center", fontsize=8)
    ax.set_xticks(range(len(gaps)), list(gaps), rotation=15, ha="right")
    lows = [min(v) for pair in gaps.values() for v in pair]
    ax.set_ylim(max(0, min(lows) - 10), 108)
    ax.set(ylabel="AUROC (%)", title="Slide-grouped CV vs leave one domain out (gap: CV minus held-out)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    return _save(fig, path)


def plot_study(study, out_dir: str | Path) -> list[Path]:
    """Optuna's own figures of a study, with its matplotlib backend (no plotly needed): the
    optimisation history, objective vs each parameter, and the parameters' importance once
    the study has more than one."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as optuna_plots
    names = sorted({name for t in study.trials for name in t.params})
    figures = {"optuna_history.png": lambda: optuna_plots.plot_optimization_history(study),
               **{f"optuna_slice_{n}.png": (lambda n=n: optuna_plots.plot_slice(study, params=[n])) for n in names}}
    if len(names) > 1:
        figures["optuna_importance.png"] = lambda: optuna_plots.plot_param_importances(study)
    paths = []
    with warnings.catch_warnings():  # Optuna marks its matplotlib backend experimental; these are its own plots
        warnings.simplefilter("ignore", ExperimentalWarning)
        for name, plot in figures.items():
            axes = np.atleast_1d(plot()).ravel()
            paths.append(_save(axes[0].figure, Path(out_dir) / name))
    return paths
