"""The paper's Tables 1 and 2 from MLflow runs, as DataFrames and as Markdown, CSV and LaTeX.

Values are stored as fractions in the runs and shown in percent with two decimals, as in
the paper. Table 1's SD is the population SD over folds (ddof=0), as the paper's. The CSV
keeps full precision and the run ids, so a number in a table can be traced to its run.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import keys
from analysis.queries import RECIPE_DEFAULTS, EvalRun, TrainRow
from data_tools.errors import ConfigError
from models.backbones import resolve_backbone
from models.finetune import finetune_label
from models.metrics import mean_and_population_sd

REGIME_NAMES = {keys.REAL_ONLY: "real", keys.SYNTH_BALANCED: "real+synth"}
TABLE2_COLUMNS = {"auroc": "AUROC", "accuracy": "Accuracy", "sensitivity": "Sensitivity",
                  "specificity": "Specificity", "ba": "Bal. Acc."}
ID_COLUMNS = ["backbone", "regime", "train_run_id"]  # in the CSV only
MEAN, SD, MEAN_SD = "Mean", "SD", "Mean ± SD"
MISSING = "—"


def backbone_name(backbone: str, backbone_set: str | None = None) -> str:
    """The architecture that ran: the registry's name for it in that set (the paper's names in
    `paper`, the small members' in `demo`); an unknown name as given."""
    try:
        return resolve_backbone(backbone, backbone_set or "paper").display or backbone
    except ConfigError:
        return backbone


# the parts of a recipe that the tables name where they differ from the paper's
_QUALIFIERS = {keys.P_LOSS: {"focal": "focal loss", "domain_focal": "domain focal"},
               keys.P_SAMPLER: {"balanced": "balanced sampler"},
               keys.P_AUGMENT: {"strong": "strong aug", "none": "no aug"},
               keys.P_STAIN_NORM: {"macenko": "Macenko"}}


def recipe_name(backbone: str, recipe: dict[str, str] | None = None) -> str:
    """What a row trained, e.g. 'ConvNeXt-Small', 'ConvNeXt-Atto-shaped [demo, scratch]',
    'UNI2-h + LoRA r8 [domain focal, strong aug]' (queries.recipe gives `recipe`)."""
    rec = {**RECIPE_DEFAULTS, **(recipe or {})}
    found = [] if rec[keys.P_BACKBONE_SET] == "paper" else [rec[keys.P_BACKBONE_SET]]
    pretrained = rec[keys.P_PRETRAINED]
    if pretrained in ("", "none"):
        found.append("scratch")
    elif pretrained != "hub":
        found.append(f"weights {Path(pretrained).name}")
    found += [names[rec[k]] for k, names in _QUALIFIERS.items() if rec[k] in names]
    rank = int(rec[keys.P_LORA_RANK]) if str(rec[keys.P_LORA_RANK]).isdigit() else 0
    mode = finetune_label(rec[keys.P_FINETUNE], rank)
    return f"{backbone_name(backbone, rec[keys.P_BACKBONE_SET])}{mode}" + (f" [{', '.join(found)}]" if found else "")


def row_label(backbone: str, regime: str, split: str = "group", recipe: dict[str, str] | None = None) -> str:
    """'ConvNeXt-Small (real)', the paper's row names, for what actually ran ('... [LODO]' for
    leave-one-domain-out rows)."""
    lodo = " [LODO]" if split == keys.LODO else ""
    return f"{recipe_name(backbone, recipe)} ({REGIME_NAMES.get(regime, regime)}){lodo}"


def label(row: TrainRow) -> str:
    return row_label(row.backbone, row.regime, row.split, dict(row.recipe))


def study_note(rows: list[TrainRow]) -> str:
    """The rows trained with a tune study's best trial (train_cv -P from_study), naming study and trial."""
    picks = [(label(r), r.run.data.tags) for r in rows if keys.FROM_STUDY in r.run.data.tags]
    return "\n".join(["Trained with a tune study's best trial:", *(
        f"- {name}: study {t[keys.FROM_STUDY]}, trial {t.get(keys.FROM_TRIAL, '?')} (tune run "
        f"{t.get(keys.FROM_STUDY_RUN, '?')[:8]})" for name, t in picks)]) if picks else ""


def group_label(row: TrainRow) -> str:
    """A row's name without its regime: what the regime comparison compares within."""
    return recipe_name(row.backbone, dict(row.recipe))


def _ids(row: TrainRow) -> dict[str, str]:
    return {"backbone": row.backbone, "regime": row.regime, "train_run_id": row.run_id}


def table1(rows: list[TrainRow]) -> pd.DataFrame:
    """Five-fold CV AUROC (%) per row: F1..FK, Mean and population SD over the folds."""
    k_max = max((max(r.fold_metric("auroc"), default=0) for r in rows), default=0)
    records = []
    for row in rows:
        folds = row.fold_metric("auroc")
        mean, sd = mean_and_population_sd(v * 100 for v in folds.values())
        records.append({**_ids(row), **{f"F{k}": folds[k] * 100 if k in folds else math.nan for k in range(1, k_max + 1)},
                        MEAN: mean, SD: sd})
    return _frame(records, [f"F{k}" for k in range(1, k_max + 1)] + [MEAN, SD], rows)


WORST, WORST_DOMAIN = "Worst", "Worst domain"


def domain_table(rows: list[TrainRow], metric: str = "auroc") -> pd.DataFrame:
    """Leave-one-domain-out rows: the metric (%) on each held-out domain (columns named by domain),
    the mean and population SD over domains, and the worst domain with its value."""
    domains = list(dict.fromkeys(d for r in rows for d in r.fold_domains.values()))
    records = []
    for row in rows:
        values = {row.fold_domains[k]: v * 100 for k, v in row.fold_metric(metric).items() if k in row.fold_domains}
        mean, sd = mean_and_population_sd(values.values())
        worst = min(values, key=values.get) if values else None
        records.append({**_ids(row), **{d: values.get(d, math.nan) for d in domains}, MEAN: mean, SD: sd,
                        WORST: values.get(worst, math.nan), WORST_DOMAIN: worst or MISSING})
    return _frame(records, domains + [MEAN, SD, WORST, WORST_DOMAIN], rows)


def table2(rows: list[TrainRow], evals: dict[str, EvalRun]) -> tuple[pd.DataFrame, list[str]]:
    """Test-set metrics (%) per row with an evaluate run (`evals`: train_run_id -> run), and
    a sentence for each row left out."""
    records, kept, skipped = [], [], []
    for row in rows:
        ev = evals.get(row.run_id)
        if ev is None:
            skipped.append(f"{row.name}: no finished evaluate run")
            continue
        values = {label: ev.metric(name) for name, label in TABLE2_COLUMNS.items()}
        lacking = [keys.test_metric(n) for n, label in TABLE2_COLUMNS.items() if values[label] is None]
        if lacking:
            skipped.append(f"{row.name}: evaluate run {ev.run_id[:8]} lacks {lacking}")
            continue
        records.append({**_ids(row), "evaluate_run_id": ev.run_id, **{k: v * 100 for k, v in values.items()}})
        kept.append(row)
    return _frame(records, list(TABLE2_COLUMNS.values()), kept, extra_ids=["evaluate_run_id"]), skipped


def table2_domains(rows: list[TrainRow], evals: dict[str, EvalRun], metric: str = "ba") -> pd.DataFrame:
    """One test metric (%) per row and per domain (the platform reports BA per tumour domain)."""
    prefix = keys.test_metric(metric) + "__"
    records, kept = [], []
    for row in rows:
        ev = evals.get(row.run_id)
        if ev is None:
            continue
        per_domain = {m[len(prefix):]: v * 100 for m, v in ev.run.data.metrics.items() if m.startswith(prefix)}
        if per_domain:
            records.append({**_ids(row), **per_domain})
            kept.append(row)
    domains = sorted({c for r in records for c in r} - set(ID_COLUMNS))
    return _frame(records, domains, kept)


def _frame(records: list[dict], value_columns: list[str], rows: list[TrainRow], extra_ids: list[str] = ()) -> pd.DataFrame:
    df = pd.DataFrame(records, columns=ID_COLUMNS + list(extra_ids) + value_columns,
                      index=pd.Index([label(r) for r in rows], name="Model"))
    return df


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    return f"{v:.2f}" if isinstance(v, (int, float, np.number)) else str(v)


def display(df: pd.DataFrame) -> pd.DataFrame:
    """The human table: identifiers dropped, two decimals, Mean and SD merged into 'Mean ± SD'."""
    shown = df.drop(columns=[c for c in df.columns if c in ID_COLUMNS or c.endswith("_run_id")])
    out = shown.map(_cell)
    if MEAN in out.columns and SD in out.columns:
        out[MEAN_SD] = [f"{m} ± {s}" for m, s in zip(out.pop(MEAN), out.pop(SD))]
    return out


def to_markdown(df: pd.DataFrame) -> str:
    shown = display(df).reset_index()
    lines = ["| " + " | ".join(map(str, shown.columns)) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(shown.columns) - 1)) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("—", "--")):
        text = text.replace(a, b)
    return text


def to_latex(df: pd.DataFrame, caption: str = "", label: str = "") -> str:
    """A booktabs table, the paper's layout."""
    shown = display(df).reset_index()
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{_tex(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines += [r"\begin{tabular}{l" + "r" * (len(shown.columns) - 1) + "}", r"\toprule",
              " & ".join(_tex(str(c)) for c in shown.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(str(v)) for v in r) + r" \\" for r in shown.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(df: pd.DataFrame, out_dir: str | Path, stem: str, caption: str = "") -> list[Path]:
    """`<stem>.md`, `<stem>.csv` (full precision, with run ids) and `<stem>.tex` in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("md", "csv", "tex")]
    paths[0].write_text((f"**{caption}**\n\n" if caption else "") + to_markdown(df))
    df.to_csv(paths[1])
    paths[2].write_text(to_latex(df, caption, label=f"tab:{stem}"))
    return paths


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _pp(d: dict, key: str = "delta") -> str:
    """A difference in percentage points with its interval: '-0.25 [-0.61, 0.11]'."""
    return f"{d[key] * 100:+.2f} [{d['ci_low'] * 100:+.2f}, {d['ci_high'] * 100:+.2f}]"


def comparison_table(records: list[dict]) -> pd.DataFrame:
    """The regime comparison (stats.compare_regimes) as a table of formatted cells; AUROC
    differences in percentage points (synthetic-balanced minus real-only) with 95% intervals."""
    out = []
    for rec in records:
        f, b, d = rec.get("folds"), rec.get("bootstrap"), rec.get("delong")
        out.append({
            "backbone": rec["backbone"], "regime": "synth - real", "train_run_id": rec["other_run_id"],
            "Δ CV AUROC, folds (pp) [t 95% CI]": _pp(f, "mean_diff") if f else MISSING,
            "paired t p": _p(f["t_pvalue"]) if f else MISSING,
            "Wilcoxon p": _p(f["wilcoxon_pvalue"]) if f else MISSING,
            "OOF AUROC real / synth (%)": f"{b['auroc_a'] * 100:.2f} / {b['auroc_b'] * 100:.2f}" if b else MISSING,
            "Δ OOF AUROC (pp) [bootstrap 95% CI]": _pp(b) if b else MISSING,
            "bootstrap p": _p(b["p_value"]) if b else MISSING,
            "DeLong p": _p(d["p_value"]) if d else MISSING,
        })
    index = pd.Index([r.get("group") or r["backbone"] for r in records], name="Backbone")
    return pd.DataFrame(out, index=index)
