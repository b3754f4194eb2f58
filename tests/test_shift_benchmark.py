"""benchmarks/shift.py's sets, made from the real shared rows: which rows are held out and how
each simulated shift alters them."""

from __future__ import annotations

import csv
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, requires_shared
from test_shift import requires_competition

sys.path.insert(0, str(REPO / "benchmarks"))
import shift as bench  # noqa: E402

pytestmark = [requires_shared, requires_competition]


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return bench.make_sets(tmp_path_factory.mktemp("shift-bench"))


def _texts(path: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as fh:
        return [row["text"] for row in csv.DictReader(fh)]


def test_the_rows_the_competition_shares_are_held_out_and_the_rest_train(sets: dict) -> None:
    assert sets["train"]["rows"] == 5_600 - 2_923
    train_lines = (Path(sets["train"]["folder"]) / "train.csv").read_text(encoding="utf-8").splitlines()
    assert len(train_lines) == 2_677
    competition = _texts(sets["competition"]["texts"])
    held = {bench._key(competition[i]) for i in sets["competition"]["rows"]}
    assert len(competition) == 8_000 and len(held) == 2_923
    assert {bench._key(t) for t in _texts(sets["none"]["texts"])} == held  # the same texts, never trained on
    assert not held & {
        bench._key(f"{title} {description}") for _, title, description in csv.reader(train_lines)
    }
    assert Counter(sets["none"]["labels"]) == Counter(sets["competition"]["labels"])


def test_each_simulated_shift_alters_the_held_out_rows_as_documented(sets: dict) -> None:
    none = _texts(sets["none"]["texts"])
    lowercase, garbled = _texts(sets["lowercase"]["texts"]), _texts(sets["garbled"]["texts"])
    assert all(t == t.lower() and "," not in t for t in lowercase)
    for original, shuffled in zip(none[:200], garbled[:200], strict=True):
        kept = [w for w in original.split() if w.casefold().strip(".,;:'\"") not in bench.FUNCTION_WORDS]
        assert sorted(shuffled.split()) == sorted(kept or original.split())
    half = _texts(sets["half"]["texts"])
    assert abs(sum(a != b for a, b in zip(none, half, strict=True)) - len(none) / 2) < 30
    headline = _texts(sets["headline"]["texts"])
    assert all(n.startswith(h) for n, h in zip(none, headline, strict=True))
    shares = np.bincount(sets["priors"]["labels"]) / len(sets["priors"]["labels"])
    assert shares == pytest.approx([0.55, 0.15, 0.15, 0.15], abs=0.002)
    assert "(Reuters)" not in " ".join(_texts(sets["no-markers"]["texts"]))
