"""Generation metrics: exact, normalised, ROUGE-L, chrF (checked against sacreBLEU's values), similarity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from taskling.evaluate.extraction import rouge_l as extraction_rouge_l
from taskling.generate.metrics import aggregate, chrf, normalise, rouge_l, score_rows

# (reference, hypothesis, sacrebleu 2.6.0 `CHRF().sentence_score(hyp, [ref]).score`)
SACREBLEU_CHRF = [
    ("the cat sat on the mat", "the cat on the mat", 74.15760517158203),
    ("On 2024-03-01 you paid $12.50 to Acme.", "You paid Acme $12.50 on 2024-03-01.", 58.91723247191371),
    ("abc", "abd", 38.888888888888886),
    ("a", "b", 0.0),
    ("ab", "abcdefgh", 55.00000000000001),
    ("SELECT name FROM t", "select name from t", 13.079975579975581),
]


@pytest.mark.parametrize(("ref", "hyp", "expected"), SACREBLEU_CHRF)
def test_chrf_matches_sacrebleu(ref: str, hyp: str, expected: float) -> None:
    assert chrf(ref, hyp) == pytest.approx(expected / 100, abs=1e-12)


def test_chrf_by_hand() -> None:
    # "abc" vs "abd": unigrams 2/3 precision and recall, bigrams 1/2, trigrams 0; orders 4-6
    # do not exist on either side, so the average is over 3 orders: (2/3 + 1/2 + 0) / 3 = 7/18,
    # and F-beta of equal precision and recall is that value.
    assert chrf("abc", "abd") == pytest.approx(7 / 18)
    assert chrf("same words", "same words") == 1.0
    assert chrf("a b", "ab") == 1.0  # spaces are not characters to chrF
    assert chrf("", "") == 1.0 and chrf("abc", "") == 0.0 and chrf("", "abc") == 0.0
    # Recall weighs more than precision (beta = 2): a prediction missing half the reference
    # scores lower than one with the whole reference and as much again.
    assert chrf("abcdefgh", "abcd") < chrf("abcd", "abcdefgh")


def test_rouge_l_lives_in_generate_and_extraction_uses_it() -> None:
    assert extraction_rouge_l is rouge_l
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * (5 / 6) / (1 + 5 / 6))
    assert rouge_l("A, b!", "a b") == 1.0 and rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0


def fake_embedder(texts: Sequence[str]) -> np.ndarray:
    """Bag of letters a-z: texts with the same letters point the same way."""
    out = np.zeros((len(texts), 26))
    for i, text in enumerate(texts):
        for ch in text.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1
    return out


def test_score_rows_per_row_values() -> None:
    gold = ["You paid Acme $12.50.", "Rain in Oslo", "abc"]
    pred = ["you paid acme 12.50", "Rain in Oslo", "xyz"]
    rows = score_rows(gold, pred, embedder=fake_embedder)
    assert [r["exact"] for r in rows] == [0.0, 1.0, 0.0]
    assert [r["normalised"] for r in rows] == [1.0, 1.0, 0.0]  # case, "$" and "." ignored
    assert rows[1]["rouge_l"] == rows[1]["chrf"] == rows[1]["similarity"] == 1.0
    assert rows[2]["rouge_l"] == rows[2]["chrf"] == rows[2]["similarity"] == 0.0
    assert rows[0]["similarity"] == pytest.approx(1.0)  # same letters
    assert 0 < rows[0]["chrf"] < 1 and rows[0]["rouge_l"] == pytest.approx(1.0)


def test_embed_false_skips_similarity_and_aggregate_averages() -> None:
    rows = score_rows(["a b", "c d"], ["a b", "x y"], embed=False)
    assert all("similarity" not in r for r in rows)
    summary = aggregate(rows)
    assert summary == {"n": 2.0, "exact": 0.5, "normalised": 0.5, "rouge_l": 0.5, "chrf": 0.5}
    assert aggregate([]) == {"n": 0.0}
    with pytest.raises(ValueError, match="2 gold texts but 1"):
        score_rows(["a", "b"], ["a"], embed=False)


def test_normalise() -> None:
    assert normalise("  Hello,   WORLD! ") == "hello world"
