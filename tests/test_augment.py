"""The text alterations of augment.*: real AG News texts in, exact texts out."""

from __future__ import annotations

import numpy as np
import pytest

from budgetlora.config import AugmentSettings
from budgetlora.data.augment import augment_table, drop_words, plain_lowercase, strip_markers
from budgetlora.data.tables import TextTable


@pytest.mark.parametrize(
    ("text", "stripped"),
    [
        (  # AG News's HTML entities lose their ampersand: "#39;" is an apostrophe
            "Unions representing workers at Turner   Newall say they are #39;disappointed#39; after talks.",
            "Unions representing workers at Turner Newall say they are disappointed after talks.",
        ),
        (
            "WASHINGTON (Reuters) - The U.S. trade deficit widened in June.",
            "The U.S. trade deficit widened in June.",
        ),
        (
            "Alstom to sign contracts with China (AFP) AFP - The French group Alstom will sign.",
            "Alstom to sign contracts with China The French group Alstom will sign.",
        ),
        (
            "Prediction Unit Helps Forecast Wildfires (AP) AP - It's barely dawn.",
            "Prediction Unit Helps Forecast Wildfires It's barely dawn.",
        ),
        ("Team wins &lt;b&gt;big&lt;/b&gt; quot;yes quot; he said", "Team wins big yes he said"),
        ("Google (GOOG.O) shares rose on Monday", "Google (GOOG.O) shares rose on Monday"),  # a ticker stays
    ],
)
def test_strip_markers(text: str, stripped: str) -> None:
    assert strip_markers(text) == stripped


def test_plain_lowercase() -> None:
    assert (
        plain_lowercase("NEW YORK (Reuters) - Stocks rose; Intel's chip!")
        == "new york reuters stocks rose intel s chip"
    )


def test_drop_words_drops_each_word_with_its_probability_and_never_all() -> None:
    rng = np.random.default_rng(0)
    assert drop_words("a b c d", 0.0, rng) == "a b c d"
    assert drop_words("a b c d", 1.0, rng) in {"a", "b", "c", "d"}
    kept = [len(drop_words(" ".join(["w"] * 100), 0.3, rng).split()) for _ in range(200)]
    assert np.mean(kept) == pytest.approx(70, abs=1.5)


def test_augment_table_alters_each_text_with_its_probability_once_per_seed() -> None:
    texts = [f"WASHINGTON (Reuters) - Story number {i} of the day." for i in range(2_000)]
    table = TextTable(texts, np.zeros(2_000, dtype=np.int64), None, ("a", "b"), "memory")
    settings = AugmentSettings(markers=0.5, lowercase=0.2)
    altered, counts = augment_table(table, settings, seed=1)
    again, _ = augment_table(table, settings, seed=1)
    assert altered.texts == again.texts and augment_table(table, settings, seed=2)[0].texts != altered.texts
    assert counts["markers"] == sum(not t.startswith(("WASHINGTON", "washington")) for t in altered.texts)
    assert counts["lowercase"] == sum(t == t.lower() for t in altered.texts)
    assert counts["markers"] / 2_000 == pytest.approx(0.5, abs=0.04)
    assert counts["lowercase"] / 2_000 == pytest.approx(0.2, abs=0.03)
    assert counts["word_dropout"] == 0
    assert "story number 7 of the day" in plain_lowercase(altered.texts[7])  # nothing else changes
    assert altered.labels is table.labels or (altered.labels == table.labels).all()
