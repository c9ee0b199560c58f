"""The one swap rule and the one fold builder."""
from __future__ import annotations

import numpy as np

from battles.folds import make_folds, prompt_groups
from battles.labels import label_index, label_matrix, swap_battles, swap_columns


def test_swap_is_an_involution_and_swaps_labels(arena_battles):
    swapped = swap_battles(arena_battles)
    assert swapped["response_a"].tolist() == arena_battles["response_b"].tolist()
    assert swapped["model_b"].tolist() == arena_battles["model_a"].tolist()
    np.testing.assert_array_equal(label_index(swapped), np.array([1, 0, 2])[label_index(arena_battles)])
    again = swap_battles(swapped)
    assert again["response_a"].tolist() == arena_battles["response_a"].tolist()
    np.testing.assert_array_equal(label_matrix(again), label_matrix(arena_battles))


def test_swap_columns_keeps_tie():
    x = np.array([[0.1, 0.7, 0.2]])
    np.testing.assert_array_equal(swap_columns(x), [[0.7, 0.1, 0.2]])


def test_soft_labels_swap_with_the_sides(arena_battles):
    soft = arena_battles.head(3).copy()
    soft["soft_a"], soft["soft_b"], soft["soft_tie"] = [0.6, 0.1, 0.3], [0.3, 0.8, 0.3], [0.1, 0.1, 0.4]
    np.testing.assert_allclose(label_matrix(swap_battles(soft)), swap_columns(label_matrix(soft)))


def test_folds_grouped_by_prompt_seeded_and_balanced(arena_battles):
    folds = make_folds(arena_battles, 5, seed=7)
    groups = prompt_groups(arena_battles)
    for g in set(groups):
        assert len(set(folds[groups == g])) == 1, "a prompt was split across folds"
    assert len(set(groups)) < len(arena_battles), "the sample has repeated prompts; the test needs them"
    np.testing.assert_array_equal(folds, make_folds(arena_battles, 5, seed=7))
    assert not np.array_equal(folds, make_folds(arena_battles, 5, seed=8))
    sizes = np.bincount(folds)
    assert sizes.min() >= 0.9 * sizes.max()
    y = label_index(arena_battles)
    for k in range(5):  # stratified: tie share per fold close to overall
        assert abs((y[folds == k] == 2).mean() - (y == 2).mean()) < 0.05


def test_unlabelled_folds_are_grouped_too(arena_battles):
    test = arena_battles.drop(columns=["winner_model_a", "winner_model_b", "winner_tie"])
    folds = make_folds(test, 4, seed=1)
    groups = prompt_groups(test)
    assert all(len(set(folds[groups == g])) == 1 for g in set(groups))
