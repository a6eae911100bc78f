"""Gemma 3's sliding-window layers: prompts longer than the window are scored as the model reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import scoring
import test_export_archs as archs
from taskling.serve.classifier import Classifier


def test_prompts_longer_than_the_sliding_window_score_like_a_plain_forward(
    tmp_path: Path, labels: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = archs.arch_config

    def narrow(family: str, vocab: dict[str, Any]) -> Any:
        config = real(family, vocab)
        config.sliding_window = 8  # far shorter than the prompt: the window really cuts
        return config

    monkeypatch.setattr(archs, "arch_config", narrow)
    run = archs.train_with_preset(tmp_path, "gemma3", labels, monkeypatch)
    for prefix_cache in (True, False):
        clf = Classifier.from_run(run, dtype="float32", device="cpu", prefix_cache=prefix_cache)
        text = "what is the balance on my checking account and when was my last payday"
        prompt = clf.fmt.prompt_ids(text)
        assert len(prompt) > 8
        expected = scoring.brute_force_probs(clf, prompt)
        got = clf(text).probabilities
        assert [got[label] for label in clf.task.labels] == pytest.approx(expected, abs=1e-4)
