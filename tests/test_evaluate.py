"""Metrics against values worked out by hand."""

from __future__ import annotations

import pytest

from taskling.evaluate.metrics import OUTSIDE, score


def test_metrics_match_hand_computation() -> None:
    labels = ["a", "b", "c"]
    gold = ["a", "a", "a", "a", "b", "b", "c", "c"]
    pred = ["a", "a", "a", "b", "b", "zzz", "c", "a"]
    m = score(gold, pred, labels)
    # a: 3/4 right; b: 1/2 (one answer outside the set); c: 1/2.
    assert m.accuracy == pytest.approx(5 / 8)
    assert m.per_category["a"]["accuracy"] == pytest.approx(0.75)
    assert m.per_category["b"]["accuracy"] == pytest.approx(0.5)
    # precision: a predicted 4 times, 3 right; b predicted twice, 1 right; c once, right.
    assert m.per_category["a"]["precision"] == pytest.approx(0.75)
    assert m.per_category["b"]["precision"] == pytest.approx(0.5)
    assert m.per_category["c"]["precision"] == pytest.approx(1.0)
    f1 = {"a": 0.75, "b": 0.5, "c": 2 * 1.0 * 0.5 / 1.5}
    assert m.macro_f1 == pytest.approx(sum(f1.values()) / 3)
    assert m.out_of_label_set_rate == pytest.approx(1 / 8)
    assert m.worst_category == "b"  # ties at 0.5 break alphabetically
    assert m.confusion_labels == ["a", "b", "c", OUTSIDE]
    assert m.confusion == [[3, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 0]]


def test_macro_f1_agrees_with_scikit_learn() -> None:
    from sklearn.metrics import f1_score

    labels = ["x", "y", "z", "w"]
    gold = ["x", "y", "z", "x", "y", "z", "x", "x"]
    pred = ["x", "z", "z", "y", "y", "x", "x", "w"]
    m = score(gold, pred, labels)
    assert m.macro_f1 == pytest.approx(f1_score(gold, pred, labels=["x", "y", "z"], average="macro"))


def test_a_forgotten_rare_category_is_the_worst_even_with_high_accuracy() -> None:
    gold = ["common"] * 98 + ["rare"] * 2
    pred = ["common"] * 100
    m = score(gold, pred, ["common", "rare"])
    assert m.accuracy == pytest.approx(0.98)
    assert (m.worst_category, m.worst_category_accuracy) == ("rare", 0.0)


def test_score_rejects_mismatched_or_empty_input() -> None:
    with pytest.raises(ValueError, match="2 gold labels but 1"):
        score(["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        score([], [], ["a", "b"])
