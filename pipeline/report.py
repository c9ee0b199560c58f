"""The run report: a Markdown page with per-stage and final scores, data repairs, and plots.

``report.md`` sits in the run directory beside ``calibration.png`` (reliability per class of the
final out-of-fold probabilities) and ``stage_scores.png`` (OOF log loss per stage, raw and
calibrated, against the class prior and the final output).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402

from battles.labels import CLASS_NAMES, LABEL_COLUMNS, label_index  # noqa: E402
from pipeline.artifacts import write_atomic  # noqa: E402


def _save_fig(fig, path):
    write_atomic(path, lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


def plot_calibration(y: np.ndarray, probs: np.ndarray, path, title="Final OOF reliability") -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharey=True)
    for c, ax in enumerate(axes):
        frac, mean_pred = calibration_curve(y == c, probs[:, c], n_bins=10, strategy="quantile")
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        ax.plot(mean_pred, frac, "o-")
        ax.set_title(f"class {CLASS_NAMES[c]}")
        ax.set_xlabel("predicted probability")
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    axes[0].set_ylabel("observed frequency")
    fig.suptitle(title)
    _save_fig(fig, path)


def plot_stage_scores(summary: dict, path) -> None:
    names = list(summary["stages_raw"])
    raw = [summary["stages_raw"][n]["log_loss"] for n in names]
    cal = [summary["stages_calibrated"].get(n, np.nan) for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names) + 2), 4))
    x = np.arange(len(names))
    ax.bar(x - 0.2, raw, 0.4, label="raw")
    ax.bar(x + 0.2, cal, 0.4, label="calibrated (CV)")
    ax.axhline(summary["prior_log_loss"], color="grey", ls="--", label="class prior")
    ax.axhline(summary["nested_scores"]["log_loss"], color="green", ls="-", label="final (nested CV)")
    ax.set_xticks(x, names, rotation=20)
    lo = min([v for v in raw + cal if np.isfinite(v)] + [summary["nested_scores"]["log_loss"]])
    ax.set_ylim(lo - 0.03, summary["prior_log_loss"] + 0.03)
    ax.set_ylabel("OOF log loss (lower is better)")
    ax.legend(loc="upper right", fontsize=8)
    _save_fig(fig, path)


def _fmt_table(rows: list[dict], cols: list[str]) -> str:
    head = "| " + " | ".join(cols) + " |\n| " + " | ".join("---" for _ in cols) + " |\n"
    body = ""
    for r in rows:
        body += "| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |\n"
    return head + body


def write_report(run, summary: dict) -> None:
    y = label_index(run.train)
    oof = pd.read_csv(run.dir / "stacker" / "oof_probs.csv")[LABEL_COLUMNS].to_numpy()
    plot_calibration(y, oof, run.dir / "calibration.png")
    plot_stage_scores(summary, run.dir / "stage_scores.png")
    rows = []
    for name, s in summary["stages_raw"].items():
        rows.append({"output": name, "log loss (raw)": s["log_loss"],
                     "log loss (calibrated)": summary["stages_calibrated"].get(name, float("nan")),
                     "accuracy": s["accuracy"], "ll a": s["log_loss_a"], "ll b": s["log_loss_b"],
                     "ll tie": s["log_loss_tie"], "acc a": s["accuracy_a"], "acc b": s["accuracy_b"],
                     "acc tie": s["accuracy_tie"]})
    f = summary["nested_scores"]
    rows.append({"output": f"**final** ({summary['chosen']})", "log loss (raw)": f["log_loss"],
                 "log loss (calibrated)": f["log_loss"], "accuracy": f["accuracy"], "ll a": f["log_loss_a"],
                 "ll b": f["log_loss_b"], "ll tie": f["log_loss_tie"], "acc a": f["accuracy_a"],
                 "acc b": f["accuracy_b"], "acc tie": f["accuracy_tie"]})
    cols = list(rows[0])
    cand = _fmt_table(summary["candidates"], ["candidate", "cv_log_loss", "chosen_in_outer_folds", "chosen"])
    repairs = []
    for part, rep in run.repairs.items():
        repairs.append({"file": f"{part}: {rep['file']}", **{k: rep[k] for k in (
            "rows", "null_turns", "lone_surrogates", "empty_replies", "empty_prompts", "multi_turn_battles")}})
    text = f"""# Run report: `{run.dir}`

Training battles: {len(run.train)} ({run.config['n_folds']} folds grouped by prompt, seed {run.config['seed']}).
Test battles: {0 if run.test is None else len(run.test)}.
Class prior log loss (fold-wise): {summary['prior_log_loss']:.4f}.

## Scores (out-of-fold)
"Raw" is softmax of the stage's logits; "calibrated" is the stage with temperature scaling, scored by
CV; the final row is the chosen stacker scored by **nested** CV (choice made without the scored fold).
"ll x"/"acc x" are log loss and recall on battles whose true label is x.

{_fmt_table(rows, cols)}
![per-stage scores](stage_scores.png)

## Stacker candidates
{cand}
## Calibration of the final output
![reliability](calibration.png)

## Data repairs
{_fmt_table(repairs, list(repairs[0])) if repairs else 'none'}
"""
    write_atomic(run.dir / "report.md", lambda p: open(p, "w").write(text))
