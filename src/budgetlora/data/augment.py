"""Text alterations: the training-time augmentation of ``augment.*`` (against cues a shifted
test set lacks), pure functions of a text and a random generator."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from budgetlora.config import AugmentSettings
from budgetlora.data.tables import TextTable

__all__ = ["strip_markers", "plain_lowercase", "drop_words", "augment_table"]

# News-wire cues: a dateline with its agency ("WASHINGTON (Reuters) - ", "LONDON (AFP) - "), an
# agency before a dash ("AP - ", "Reuters - ") or in brackets anywhere ("(AP)", "(Reuters)").
_AGENCIES = r"Reuters|AP|AFP|Canadian Press|SPACE\.com|Sports Network|Forbes\.com|NewsFactor|TechWeb|Ziff Davis|CBS\.MW|washingtonpost\.com"
_DATELINE = re.compile(rf"(?:^|(?<=\s))[A-Z][A-Za-z .,'-]{{0,40}}\((?:{_AGENCIES})\)\s*[-–]+\s*")
_AGENCY_DASH = re.compile(rf"(?:^|(?<=\s))(?:{_AGENCIES})\s*[-–]+\s+")
_AGENCY_BRACKETS = re.compile(rf"\s*\((?:{_AGENCIES})\)")
# HTML entities as AG News has them, often without their ampersand ("#39;", "quot;", "&lt;b&gt;").
_TAGS = re.compile(r"(?:&lt;|&amp;lt;|\blt;)/?[a-zA-Z][^&;]{0,200}?(?:&gt;|\bgt;)")
_ENTITIES = re.compile(r"&?#\d+;|&?\b(?:quot|amp|lt|gt|nbsp|apos);")
_PUNCTUATION = re.compile(r"[^\w\s]")


def strip_markers(text: str) -> str:
    """``text`` without news-agency markers and HTML entities, spaces collapsed."""
    text = _DATELINE.sub(" ", text)
    text = _AGENCY_BRACKETS.sub("", text)
    text = _AGENCY_DASH.sub(" ", text)
    text = _TAGS.sub(" ", text)
    text = _ENTITIES.sub(" ", text)
    return " ".join(text.split())


def plain_lowercase(text: str) -> str:
    """``text`` lowercased, without punctuation, spaces collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def drop_words(text: str, probability: float, rng: np.random.Generator) -> str:
    """``text`` with each word dropped with ``probability`` (at least one word is kept)."""
    words = text.split()
    kept = [w for w, drop in zip(words, rng.random(len(words)) < probability, strict=True) if not drop]
    return " ".join(kept or [words[int(rng.integers(len(words)))]])


def augment_table(table: TextTable, settings: AugmentSettings, seed: int) -> tuple[TextTable, dict[str, int]]:
    """``table`` with its texts altered as ``settings`` say, and how many texts each alteration
    changed. The draws come from ``seed`` alone: the same run alters the same texts."""
    rng = np.random.default_rng([seed, 0x5EED])
    texts = list(table.texts)
    changed = {"markers": 0, "lowercase": 0, "word_dropout": 0}
    for i in range(len(texts)):
        steps = (
            ("markers", rng.random() < settings.markers, strip_markers),
            ("lowercase", rng.random() < settings.lowercase, plain_lowercase),
            ("word_dropout", settings.word_dropout > 0, lambda t: drop_words(t, settings.word_dropout, rng)),
        )
        for name, chosen, alter in steps:
            altered = alter(texts[i]) if chosen else texts[i]
            if altered and altered != texts[i]:  # an alteration that would leave nothing is skipped
                texts[i] = altered
                changed[name] += 1
    return replace(table, texts=texts), changed
