"""The run report: one self-contained HTML page, ``report.html``, with its plots also saved beside it.

Sections: warnings (what the data cannot support, :mod:`pipeline.checks`), scores per stage and of
the final ensemble (out-of-fold, each with the rows it stands on; the final row by nested CV with a
90% bootstrap interval), the stage sets compared when stages cover different rows, the ensemble
methods compared by ``tune``, per-class reliability, the confusion matrix of the final
output, the position-bias check per stage (how often a stage changes its verdict when A and B are
swapped, before swap TTA, read from the single-order OOF logits that cross-fitting keeps), scores by
prompt length, by turn count and tie vs non-tie, scores by model and model pair (where the file names
the models), the test set (size, repeats of training battles, prompt shift AUC, predicted class
balance), and the repairs the data layer counted (every counter of :class:`battles.io.RepairReport`,
so a new counter reaches the page by itself). Every figure in the scores table carries the rows it
stands on; log-loss axes start at 0 (:func:`honest_ylim`).

PNGs (``calibration.png``, ``confusion.png``, ``stage_scores.png``, ``position_bias.png``,
``subgroups.png``) are written beside the page and embedded in it as base64, so the page can be
mailed on its own.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import typing

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402

from battles.columns import LABEL_COLUMNS  # noqa: E402
from battles.io import RepairReport  # noqa: E402
from battles.labels import label_index_or_missing, swap_columns  # noqa: E402
from battles.text import plain_text  # noqa: E402
from ensemble.metrics import probs_from_logits, scores  # noqa: E402
from ensemble.record import EnsembleRecord, Scores, StageSetRow  # noqa: E402
from kernel.files import write_bytes, write_text  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.results import EnsembleFit, StageResult  # noqa: E402
from pipeline.rundata import RunData  # noqa: E402
from pipeline.checks import overlap_of_test, shift_auc_of_test  # noqa: E402
from pipeline.rundir import RunDir, read_id_table  # noqa: E402

FINAL = "final (nested CV)"
CLASS_LABELS = ["A wins", "B wins", "tie"]


def _save_fig(fig, path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    png = buf.getvalue()
    write_bytes(path, png)
    return png


# -- plots --------------------------------------------------------------------------------------
def honest_ylim(ax, values) -> None:
    """A log-loss axis that starts at 0, so bar heights compare as the values do (an axis starting
    near the smallest value makes a 0.01 difference look like a factor); the values are printed on the
    bars or in the tables beside the plots for the small differences."""
    finite = [v for v in values if np.isfinite(v)]
    ax.set_ylim(0, 1.12 * max(finite) if finite else 1)


def plot_calibration(y: np.ndarray, outputs: dict, path, title: str = "Reliability per class, out-of-fold") -> bytes:
    """Reliability per class: the final output (bold) and every stage's raw probabilities (thin)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.3), sharey=True)
    for c, ax in enumerate(axes):
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect")
        for name, probs in outputs.items():
            frac, mean_pred = calibration_curve(y == c, probs[:, c], n_bins=10, strategy="quantile")
            final = name == FINAL
            ax.plot(mean_pred, frac, "o-" if final else ".-", lw=2.2 if final else 1, ms=5 if final else 3,
                    alpha=1 if final else 0.7, label=name, color="black" if final else None)
        ax.set_title(f"{CLASS_LABELS[c]} (base rate {np.mean(y == c):.2f})")
        ax.set_xlabel("predicted probability (deciles)")
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("observed frequency")
    axes[-1].legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    return _save_fig(fig, path)


def plot_confusion(y: np.ndarray, probs: np.ndarray, path) -> tuple[bytes, np.ndarray]:
    counts = np.zeros((3, 3), dtype=int)
    np.add.at(counts, (y, probs.argmax(axis=1)), 1)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5, 4.3))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(3):
        for j in range(3):
            ax.text(j, i, f"{counts[i, j]}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(3), CLASS_LABELS), ax.set_yticks(range(3), CLASS_LABELS)
    ax.set_xlabel("predicted (argmax)"), ax.set_ylabel("true")
    ax.set_title("Confusion matrix, final output (nested OOF)")
    fig.colorbar(im, ax=ax, label="share of true class")
    return _save_fig(fig, path), counts


def plot_stage_scores(record: EnsembleRecord, path) -> bytes:
    names = list(record.stages_raw)
    raw = [record.stages_raw[n].log_loss for n in names]
    cal = [record.stages_calibrated.get(n, np.nan) for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names) + 2), 4))
    x = np.arange(len(names))
    ax.bar(x - 0.2, raw, 0.4, label="raw")
    ax.bar(x + 0.2, cal, 0.4, label="calibrated (CV)")
    ax.axhline(record.prior_log_loss, color="grey", ls="--", label="class prior")
    ax.axhline(record.nested_scores.log_loss, color="green", ls="-", label="final (nested CV)")
    ax.set_xticks(x, names, rotation=20)
    for bars in ax.containers:
        ax.bar_label(bars, fmt="%.4f", fontsize=8, rotation=90, label_type="center", color="white")
    honest_ylim(ax, raw + cal + [record.nested_scores.log_loss, record.prior_log_loss])
    ax.set_ylabel("OOF log loss (lower is better)")
    ax.set_title("Log loss per stage and of the final ensemble")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return _save_fig(fig, path)


def plot_position_bias(rows: list[dict], path) -> bytes:
    names = [r["stage"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(names))
    bars = ax1.bar(x, [100 * r["verdict_flip_rate"] for r in rows], color="tab:orange")
    ax1.bar_label(bars, fmt="%.1f%%", fontsize=8)
    ax1.set_xticks(x, names, rotation=20)
    ax1.set_ylabel("% of battles")
    ax1.set_title("Verdict changes when A and B are swapped\n(argmax, before swap TTA)")
    ax2.bar(x - 0.25, [r["log_loss_straight"] for r in rows], 0.25, label="as given")
    ax2.bar(x, [r["log_loss_swapped"] for r in rows], 0.25, label="swapped (realigned)")
    ax2.bar(x + 0.25, [r["log_loss_tta"] for r in rows], 0.25, label="swap TTA")
    ax2.set_xticks(x, names, rotation=20)
    honest_ylim(ax2, [r[k] for r in rows for k in ("log_loss_straight", "log_loss_swapped", "log_loss_tta")])
    ax2.set_ylabel("OOF log loss (raw)")
    ax2.set_title("Single orders vs swap TTA")
    ax2.legend(fontsize=8)
    return _save_fig(fig, path)


def plot_subgroups(table: pd.DataFrame, path, ylabel: str = "OOF log loss (lower is better)",
                   title: str = "Log loss by prompt length, turn count and tie vs non-tie") -> bytes:
    groups = table["group"].tolist()
    outputs = [c for c in table.columns if c not in ("group", "n")]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(groups) * max(1, len(outputs) / 2)), 4.2))
    x = np.arange(len(groups))
    width = 0.8 / len(outputs)
    for i, name in enumerate(outputs):
        ax.bar(x + (i - (len(outputs) - 1) / 2) * width, table[name], width, label=name,
               color="black" if name == FINAL else None)
    ax.set_xticks(x, [f"{g.replace('prompt ', 'prompt' + chr(10))}\n(n={n})" for g, n in zip(groups, table["n"])],
                  fontsize=8)
    honest_ylim(ax, list(table[outputs].to_numpy(dtype=float).ravel()) + [np.log(3)])
    ax.axhline(np.log(3), color="grey", ls="--", lw=1, label="uniform (log 3)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    return _save_fig(fig, path)


# -- tables -------------------------------------------------------------------------------------
def position_bias(results: dict[str, StageResult], names: list[str], y: np.ndarray) -> list[dict]:
    """Per stage with single-order OOF logits: verdict flip rate under swap and the log loss of each order
    (on the rows the stage covers)."""
    rows = []
    for name in names:
        result = results[name]
        if result.orders is None:
            continue
        covered = result.covered & (y >= 0)
        straight, swapped = (probs_from_logits(o[covered]) for o in result.orders)
        realigned = swap_columns(swapped)
        yc = y[covered]
        rows.append({"stage": name, "rows": int(covered.sum()),
                     "verdict_flip_rate": float((straight.argmax(axis=1) != realigned.argmax(axis=1)).mean()),
                     "mean_p_first_minus_second": float((straight[:, 0] - straight[:, 1]).mean()),
                     "mean_abs_prob_change": float(np.abs(straight - realigned).sum(axis=1).mean() / 2),
                     "log_loss_straight": scores(yc, straight)["log_loss"],
                     "log_loss_swapped": scores(yc, realigned)["log_loss"],
                     "log_loss_tta": scores(yc, probs_from_logits(result.oof_logits[covered]))["log_loss"]})
    return rows


def subgroup_scores(battles: pd.DataFrame, y: np.ndarray, outputs: dict) -> pd.DataFrame:
    """Log loss per output on: prompt length quartiles, single vs multi-turn, tie vs non-tie battles."""
    chars = np.array([len(plain_text(p)) for p in battles["prompt"]])
    edges = np.unique(np.quantile(chars, [0, 0.25, 0.5, 0.75, 1.0]).round())
    bucket = np.clip(np.searchsorted(edges, chars, side="right") - 1, 0, len(edges) - 2)
    turns = np.array([len(p) for p in battles["prompt"]])
    masks = [(f"prompt {int(edges[b])}-{int(edges[b + 1])} chars", bucket == b) for b in range(len(edges) - 1)]
    masks += [("1 turn", turns == 1), ("multi-turn", turns > 1), ("tie", y == 2), ("not tie", y != 2)]
    rows = []
    for label, mask in masks:
        if not mask.any():
            continue
        row = {"group": label, "n": int(mask.sum())}
        for name, probs in outputs.items():
            row[name] = scores(y[mask], probs[mask])["log_loss"]
        rows.append(row)
    return pd.DataFrame(rows)


MISTAKES_SHOWN, MISTAKE_CHARS = 10, 400


def _cut(turns, chars: int = MISTAKE_CHARS) -> str:
    """A field's text for display: its turns joined, cut to ``chars`` characters with what was left out said."""
    text = plain_text(turns)
    return text if len(text) <= chars else f"{text[:chars]}... [{len(text) - chars} more characters]"


def confident_mistakes(battles: pd.DataFrame, y: np.ndarray, probs: np.ndarray, k: int = MISTAKES_SHOWN) -> list[dict]:
    """The ``k`` labelled battles whose out-of-fold verdict (argmax of ``probs``) is wrong with the highest
    confidence (its top probability), most confident first, texts cut for display."""
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero((y >= 0) & (pred != y))
    picked = wrong[np.argsort(-probs[wrong].max(axis=1), kind="stable")][:k]
    return [{"id": battles["id"].iloc[i], "predicted": f"{CLASS_LABELS[pred[i]]} ({probs[i, pred[i]]:.3f})",
             "true": f"{CLASS_LABELS[y[i]]} ({probs[i, y[i]]:.3f})", "turns": len(battles["prompt"].iloc[i]),
             "prompt": _cut(battles["prompt"].iloc[i]), "response A": _cut(battles["response_a"].iloc[i]),
             "response B": _cut(battles["response_b"].iloc[i])} for i in picked]


def mistakes_section(battles: pd.DataFrame, y: np.ndarray, probs: np.ndarray) -> str:
    """The report's section of the most confident out-of-fold mistakes of the final output."""
    rows = confident_mistakes(battles, y, probs)
    wrong = int(((y >= 0) & (probs.argmax(axis=1) != y)).sum())
    return f"""<h2 id="mistakes">Most confident mistakes (out-of-fold, final output)</h2>
<style>.mistakes td{{text-align:left;vertical-align:top;white-space:pre-wrap;max-width:22em;font-size:.92em}}</style>
<p class="note">The {len(rows)} of {wrong} wrongly called battles (of {int((y >= 0).sum())}) whose nested out-of-fold
verdict was the most confident: the predicted class with its probability, the true class with the probability given
to it. Texts are cut to {MISTAKE_CHARS} characters per field. <code>run.py score</code> explains one battle stage by
stage.</p>
{_table(rows, cls="mistakes")}"""
MODEL_ROWS_SHOWN, MODEL_MIN_ROWS = 15, 10


def model_pair_scores(battles: pd.DataFrame, y: np.ndarray, probs: np.ndarray) -> tuple[list[dict], list[dict]]:
    """Where ``model_a``/``model_b`` exist: the final output's log loss and accuracy per model (battles it
    took part in, as A or B) and per model pair (either order), the most frequent first (at most
    ``MODEL_ROWS_SHOWN`` of each, with at least ``MODEL_MIN_ROWS`` battles); ([], []) without model names."""
    if not {"model_a", "model_b"} <= set(battles.columns):
        return [], []
    a = battles["model_a"].fillna("").astype(str).to_numpy()
    b = battles["model_b"].fillna("").astype(str).to_numpy()
    named = (a != "") & (b != "")
    if not named.any():
        return [], []

    def rows(keys: dict) -> list[dict]:
        out = []
        for key, mask in sorted(keys.items(), key=lambda kv: (-kv[1].sum(), kv[0])):
            if mask.sum() < MODEL_MIN_ROWS or len(out) == MODEL_ROWS_SHOWN:
                continue
            sc = scores(y[mask], probs[mask])
            out.append({"model" if " vs " not in key else "pair": key, "n": int(mask.sum()),
                        "log loss": sc["log_loss"], "accuracy": sc["accuracy"],
                        "share tie": float((y[mask] == 2).mean())})
        return out

    models = {m: named & ((a == m) | (b == m)) for m in np.unique(np.concatenate([a[named], b[named]]))}
    pair_key = np.array([" vs ".join(sorted((x, z))) for x, z in zip(a, b)], dtype=object)
    pairs = {k: named & (pair_key == k) for k in np.unique(pair_key[named])}
    return rows(models), rows(pairs)


def test_set_rows(data: RunData, seed: int, submission) -> list[dict]:
    """The test file: its size, how far its prompts are from the training prompts (adversarial AUC,
    :func:`pipeline.checks.shift_auc_of_test`), and the predicted class balance (mean probability and argmax
    share per class, from ``submission``) beside the training labels' balance; [] without a test file."""
    if data.test is None:
        return []
    auc = shift_auc_of_test(data, seed)
    y = label_index_or_missing(data.train)
    train_share = np.bincount(y[y >= 0], minlength=3) / max(int((y >= 0).sum()), 1)
    out = [{"figure": "battles", "value": len(data.test)},
           {"figure": "battles repeating a training battle (text, either order)",
            "value": overlap_of_test(data)},
           {"figure": "adversarial AUC, test vs training prompts (0.5: alike)",
            "value": "too few prompts" if auc is None else float(auc)}]
    if submission is not None and submission.exists():
        probs = read_id_table(submission)[LABEL_COLUMNS].to_numpy(dtype=float)
        mean, argmax = probs.mean(axis=0), np.bincount(probs.argmax(axis=1), minlength=3) / len(probs)
        for c, label in enumerate(CLASS_LABELS):
            out.append({"figure": f"{label}: mean predicted probability / argmax share / training share",
                        "value": f"{mean[c]:.3f} / {argmax[c]:.3f} / {train_share[c]:.3f}"})
    return out


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if np.isfinite(v) else "-"
    if isinstance(v, dict):
        return ", ".join(f"{html.escape(str(k))}: {_cell(x)}" for k, x in v.items())
    return html.escape(str(v))


def _table(rows: list[dict], cols: list[str] | None = None, cls: str = "") -> str:
    if not rows:
        return "<p><em>none</em></p>"
    cols = cols or list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(png: bytes, alt: str, name: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"><figcaption>{name}</figcaption></figure>'


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}
figcaption{color:#666;font-size:.85em}.note{color:#555;font-size:.92em}
.warnings{border:2px solid #c60;background:#fff4e5;padding:.5em 1em;margin:1em 0}"""


def score_table(record: EnsembleRecord) -> list[dict]:
    """The scores table: per stage its raw OOF figures and its calibrated figure, then the final
    ensemble, each figure beside the number of rows it stands on (a stage's calibrated figure stands
    on the rows of its test against the prior; the final one on the ensemble's rows)."""
    calibrated_rows = {t.stage: t.rows for t in record.selection.stages_against_prior} if record.selection else {}
    rows = [_score_row(name, st.n, st.log_loss, record.stages_calibrated.get(name, float("nan")),
                       calibrated_rows.get(name, st.n if name in record.stages_calibrated else ""), st)
            for name, st in record.stages_raw.items()]
    f = record.nested_scores
    rows.append(_score_row(f"final: {record.chosen}", record.rows, float("nan"), f.log_loss, record.rows, f))
    return rows


def _score_row(output: str, rows, raw: float, calibrated: float, calibrated_rows, scores: Scores) -> dict:
    return {"output": output, "rows": rows, "log loss (raw)": raw, "rows (calibrated)": calibrated_rows,
            "log loss (calibrated, CV)": calibrated, "accuracy": scores.accuracy, **{f"ll {c}": v for c, v in scores.per_class("log_loss").items()},
            **{f"recall {c}": v for c, v in scores.per_class("accuracy").items()}}


def _stage_set_row(t: StageSetRow) -> dict:
    row = {"stages": " + ".join(t.stages), "rows": t.rows, "outer folds": t.outer_folds,
           "nested log loss": t.nested_log_loss, "90% interval": "{:.4f} - {:.4f}".format(*t.interval),
           "prior": t.prior_log_loss, "role": t.role or "", "chosen": t.chosen}
    if t.minus_compared_interval is not None:
        row.update({f"minus {' + '.join(t.compared_with)}": t.minus_compared, "on rows": t.compared_on_rows,
                    "paired 90% interval": "{:+.4f} - {:+.4f}".format(*t.minus_compared_interval),
                    "replaced it": t.replaced_it})
    if t.minus_chosen_interval is not None:
        row.update({"minus chosen, common rows": t.minus_chosen_on_common_rows,
                    "90% interval (paired)": "{:.4f} - {:.4f}".format(*t.minus_chosen_interval)})
    return row


def repair_rows(repairs: dict[str, RepairReport]) -> list[dict]:
    """One row per input file: every counter of its :class:`battles.io.RepairReport` (the integer fields)."""
    rows = []
    for part, rep in repairs.items():
        hints = typing.get_type_hints(type(rep))
        counters = [f.name for f in dataclasses.fields(rep) if hints[f.name] is int]
        rows.append({"file": f"{part}: {rep.file}", **{k: getattr(rep, k) for k in counters}})
    return rows


def truncation_section(results: dict[str, StageResult]) -> str:
    """HTML: what packing cut of the battles each deep stage trained on (``metrics.json``'s ``truncation``,
    all folds together): per field the mean and largest tokens kept, the share of battles cut, whole
    turns dropped. Empty when no stage kept such figures."""
    rows = []
    for name, result in results.items():
        summary = (result.metrics.get("truncation") or {}).get("folds")
        if not summary:
            continue
        for field in ("prompt", "response_a", "response_b"):
            f = summary[field]
            rows.append({"stage": name, "battles": summary["battles"], "field": field,
                         "mean tokens kept": round(f["mean_tokens"], 1), "largest": f["max_tokens"],
                         "share cut": f"{f['share_cut']:.1%}", "turns dropped": f["turns_dropped"],
                         "share losing a turn": f"{f['share_turns_dropped']:.1%}"})
    if not rows:
        return ""
    return ("<h2 id=\"truncation\">What the deep stages read (truncation)</h2>\n<p class=\"note\">The training battles "
            "of every fold together, as packed into the stage's <code>max_length</code>: tokens kept per field, the share "
            "of battles whose field was cut, and whole turns dropped (<code>metrics.json</code> has the figures per "
            "fitted model).</p>\n" + _table(rows, cls="truncation"))


def write_report(run: RunDir, config: RunConfig, data: RunData, results: dict[str, StageResult],
                 fit: EnsembleFit) -> None:
    """Write ``report.html`` (and its PNGs) for a run whose ensemble has just been fitted (from memory:
    the run's data, the stages' results and the ensemble's nested probabilities)."""
    record = fit.record
    y = label_index_or_missing(data.train)
    scored = y >= 0
    rows = fit.rows
    yr, final = y[rows], fit.oof_probs
    names = list(record.stages_raw)
    # stages shown beside the final output in the plots: those with logits on every ensemble row
    shown = [n for n in names if results[n].covered[rows].all()]
    outputs = {**{n: probs_from_logits(results[n].oof_logits[rows]) for n in shown}, FINAL: final}

    score_rows = score_table(record)
    f = record.nested_scores
    lo, hi = record.nested_interval
    methods = [{"method": m.method, "nested log loss": m.nested_log_loss, "accuracy": m.nested_accuracy,
                "best candidate": m.best_candidate, **{f"w {n}": m.weights[n] for n in record.stages}}
               for m in record.methods]
    sets = [_stage_set_row(t) for t in record.stage_sets]
    selection = prior_tests = ""
    if record.selection is not None:
        selection = (f"<p><b>What decided:</b> {html.escape(record.selection.decided_by)}.<br>"
                     f"<span class=\"note\">Rule: {html.escape(record.selection.rule)}.</span></p>")
        prior_tests = "<p>Each stage alone (calibrated by cross-fitting on its own rows) against the class prior:</p>" + \
            _table([{"stage": t.stage, "rows": t.rows, "calibrated": t.calibrated_log_loss, "prior": t.prior_log_loss,
                     "minus prior": t.minus_prior,
                     "paired 90% interval": "{:+.4f} - {:+.4f}".format(*t.minus_prior_interval),
                     "beats the prior": t.beats_prior} for t in record.selection.stages_against_prior])

    pngs = {"stage_scores": plot_stage_scores(record, run.figure("stage_scores")),
            "calibration": plot_calibration(yr, outputs, run.figure("calibration"))}
    pngs["confusion"], counts = plot_confusion(yr, final, run.figure("confusion"))
    bias = position_bias(results, names, y)
    if bias:
        pngs["position_bias"] = plot_position_bias(bias, run.figure("position_bias"))
    no_bias = [n for n in names if n not in {b["stage"] for b in bias}]
    groups = subgroup_scores(data.train[rows], yr, outputs)
    pngs["subgroups"] = plot_subgroups(groups, run.figure("subgroups"))
    confusion_rows = [{"true / predicted": CLASS_LABELS[i], **{CLASS_LABELS[j]: int(counts[i, j]) for j in range(3)}}
                      for i in range(3)]
    by_model, by_pair = model_pair_scores(data.train[rows], yr, final)
    test_rows = test_set_rows(data, config.seed, run.submission)
    repairs = repair_rows(data.repairs)
    mistakes = mistakes_section(data.train[rows], yr, final)
    data_report = json.dumps({part: rep.as_dict() for part, rep in data.repairs.items()}, indent=1)
    candidates = _table([c.as_dict() for c in record.candidates],
                        ["candidate", "method", "cv_log_loss", "chosen_in_outer_folds", "chosen"])
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in record.warnings)
    warning_box = f'<div class="warnings"><b>Warnings</b><ul>{warnings}</ul></div>' if warnings else ""
    coverage_note = ""
    if len(record.stage_sets) > 1 or record.rows < int(scored.sum()):
        coverage_note = (f"<p class=\"note\">The chosen ensemble stands on <b>{record.rows}</b> of "
                         f"{int(scored.sum())} labelled rows (the rows all its stages have out-of-fold logits for); "
                         "the plots and subgroup scores below use those rows.</p>")

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Run report: {html.escape(str(run))}</title>
<style>{STYLE}</style></head><body>
<h1>Run report: <code>{html.escape(str(run))}</code></h1>
{warning_box}
<p>Training battles: {len(data.train)} ({config.n_folds} folds grouped by prompt, seed {config.seed}).
Test battles: {0 if data.test is None else len(data.test)}. Class prior log loss (fold-wise, on the ensemble's
{record.rows} rows): {record.prior_log_loss:.4f}. Final: <b>{f.log_loss:.4f}</b> nested-CV log loss on
{record.rows} rows (90% bootstrap interval {lo:.4f} - {hi:.4f}).</p>
{coverage_note}

<h2 id="scores">Scores (out-of-fold)</h2>
<p class="note">"Raw" is softmax of the stage's logits; "calibrated" is the stage with temperature scaling cross-fitted on its own rows (the same rows as raw), scored by
CV; the final row is the chosen ensemble scored by <b>nested</b> CV (its choice made without the scored fold).
"ll x" / "recall x" are log loss and recall on battles whose true label is x. Each figure stands on its own rows:
"rows" for the raw log loss, accuracy and per-class figures (and the final row's), "rows (calibrated)" for the
calibrated figure. The bars start at 0; the values are printed on them.</p>
{_table(score_rows, cls="scores")}
{_img(pngs['stage_scores'], 'log loss per stage', 'stage_scores.png')}

<h2 id="stage-sets">Stage sets (rows each ensemble stands on)</h2>
<p class="note">An ensemble is fitted and scored on the rows all its stages cover. With stages of different
coverage, each candidate set is scored by nested CV on its own rows (interval: 90% bootstrap), and the sets are
compared on the rows they share (paired bootstrap interval of the difference; the choice between sets is made on
those same rows, so it is not nested).</p>
{selection}
{_table(sets, cls="sets")}
{prior_tests}

<h2 id="ensemble">Ensemble methods (nested CV)</h2>
<p>Chosen: <b>{html.escape(record.chosen)}</b> (method {html.escape(record.method)}).
Stages carrying weight (share &ge; 5%): {html.escape(', '.join(record.carrying_weight) or 'none')}.
Weights are each method's model refitted on all rows: stage shares of the average, the fitted simplex weights, or
for logistic stacking each stage's share of the absolute coefficients.</p>
{_table(methods, cls="methods")}
<details><summary>All candidates (CV log loss; how many outer folds chose each)</summary>
{candidates}</details>

<h2 id="calibration">Reliability per class</h2>
{_img(pngs['calibration'], 'reliability per class', 'calibration.png')}

<h2 id="confusion">Confusion matrix (final output)</h2>
{_table(confusion_rows, cls="confusion")}
{_img(pngs['confusion'], 'confusion matrix', 'confusion.png')}

<h2 id="position-bias">Position bias per stage (before swap TTA)</h2>
<p class="note">From the single-order OOF predictions kept by cross-fitting: how often the stage's verdict (argmax)
changes when A and B are swapped, the mean P(first) - P(second) in the given order, the mean total-variation change
of its probabilities, and the raw log loss of each order alone and of swap TTA (what the stage outputs).
{('No single-order predictions for: ' + html.escape(', '.join(no_bias)) + '.') if no_bias else ''}</p>
{_table(bias, cls="bias")}
{_img(pngs['position_bias'], 'position bias', 'position_bias.png') if bias else ''}

<h2 id="subgroups">Scores by prompt length, turn count, tie vs non-tie</h2>
<p class="note">Log loss of each stage's raw OOF probabilities and of the final (nested) output.</p>
{_table(groups.to_dict("records"), cls="subgroups")}
{_img(pngs['subgroups'], 'log loss by subgroup', 'subgroups.png')}

{mistakes}
<h2 id="models">Scores by model and model pair (final output)</h2>
<p class="note">Where the training file names the models (<code>model_a</code>, <code>model_b</code>): the final
nested output's log loss on the battles each model took part in (as A or B), and per pair (either order); the
{MODEL_ROWS_SHOWN} most frequent with at least {MODEL_MIN_ROWS} battles. Few rows each: read them as hints.</p>
{_table(by_model, cls="models") if by_model else '<p><em>no model names in the training file</em></p>'}
{_table(by_pair, cls="pairs") if by_pair else ''}

<h2 id="test-set">Test set</h2>
{_table(test_rows, cls="test") if test_rows else '<p><em>no test file</em></p>'}

{truncation_section(results)}

<h2 id="repairs">Data repairs</h2>
{_table(repairs, cls="repairs")}
<details><summary>data_report.json</summary><pre>{html.escape(data_report)}</pre></details>
</body></html>
"""
    write_text(run.report, page)
