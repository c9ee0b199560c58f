"""The report's sections added for issue 22: per-figure row counts, model pairs, the test set, honest axes."""
from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np

import run as cli
from battles.labels import label_index
from ensemble.record import EnsembleRecord
from pipeline.report import MODEL_MIN_ROWS, honest_ylim, model_pair_scores, score_table


def test_score_table_gives_each_figure_its_rows(finished_run, capsys):
    record = EnsembleRecord.read(finished_run / "ensemble/ensemble.json")
    rows = {r["output"]: r for r in score_table(record)}
    tests = {t.stage: t.rows for t in record.selection.stages_against_prior}
    for name, st in record.stages_raw.items():
        assert rows[name]["rows"] == st.n and rows[name]["rows (calibrated)"] == tests[name]
    final = rows[f"final: {record.chosen}"]
    assert final["rows"] == final["rows (calibrated)"] == record.rows
    cli._print_summary(record, finished_run)
    assert f"{record.nested_scores.log_loss:.4f}" in capsys.readouterr().out


def test_report_has_model_and_test_sections(finished_run):
    page = (finished_run / "report.html").read_text()
    assert 'id="models"' in page and 'id="test-set"' in page
    assert "rows (calibrated)" in page
    assert "adversarial AUC, test vs training prompts" in page
    assert "mean predicted probability / argmax share / training share" in page


def test_model_pair_scores(arena_battles):
    battles = arena_battles.iloc[:600].reset_index(drop=True)
    y = label_index(battles)
    probs = np.full((len(battles), 3), 1 / 3)
    by_model, by_pair = model_pair_scores(battles, y, probs)
    assert by_model and all(r["n"] >= MODEL_MIN_ROWS for r in by_model + by_pair)
    top = by_model[0]
    mask = (battles["model_a"] == top["model"]) | (battles["model_b"] == top["model"])
    assert top["n"] == int(mask.sum()) and abs(top["log loss"] - np.log(3)) < 1e-9
    assert [r["n"] for r in by_model] == sorted((r["n"] for r in by_model), reverse=True)
    assert model_pair_scores(battles.drop(columns=["model_a", "model_b"]), y, probs) == ([], [])


def test_log_loss_axes_start_at_zero():
    fig, ax = plt.subplots()
    ax.bar([0, 1], [1.03, 1.05])
    honest_ylim(ax, [1.03, 1.05, float("nan")])
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 1.05
    plt.close(fig)
