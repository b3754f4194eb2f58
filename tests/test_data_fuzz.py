"""Property tests: any bytes in a text data file give a table or a BudgetloraError, nothing else;
well-formed files round-trip exactly; splits of any labels partition the rows."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetlora.config import DataConfig
from budgetlora.data import TextTable, load_splits, read_table
from budgetlora.errors import BudgetloraError

# Pieces of the formats' own syntax reach deeper code than uniform random bytes.
_PIECES = st.sampled_from(
    [b",", b"\t", b'"', b"\n", b"\r\n", b"\\", b"\\n", b"{", b"}", b"[", b"]", b":", b" ", b"text", b"label",
     b'"text"', b'"label"', b'"ID"', b"1", b"-1", b"3", b"2.5", b"1e999", b"NaN", b"99999999999999999999",
     b"World", b"null", b"true", b"\xff", b"\xef\xbb\xbf", b"\x00", "é".encode()]
)  # fmt: skip
_FILE_BYTES = st.one_of(st.binary(max_size=200), st.lists(_PIECES, max_size=40).map(b"".join))
_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)


def _check_table(table: TextTable) -> None:
    assert len(table) >= 1
    assert all(isinstance(text, str) and text.strip() for text in table.texts)
    if table.labels is not None:
        assert table.labels.dtype == np.int64 and table.labels.shape == (len(table),)
        assert (table.labels >= 0).all()
        if table.label_names is not None:
            assert (table.labels < len(table.label_names)).all()
    if table.ids is not None:
        assert len(table.ids) == len(table)


@settings(max_examples=300, deadline=None)
@given(
    extension=st.sampled_from([".csv", ".tsv", ".jsonl", ".json"]),
    data=_FILE_BYTES,
    require_labels=st.booleans(),
    drop_empty=st.booleans(),
)
def test_any_bytes_give_a_table_or_a_budgetlora_error(
    extension: str, data: bytes, require_labels: bool, drop_empty: bool
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"input{extension}"
        path.write_bytes(data)
        try:
            table = read_table(path, require_labels=require_labels, drop_empty=drop_empty)
        except BudgetloraError as err:
            assert str(err)
            return
        _check_table(table)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(_TEXT, st.integers(0, 5)), min_size=1, max_size=15),
    extension=st.sampled_from([".csv", ".tsv", ".jsonl", ".json"]),
)
def test_well_formed_files_round_trip(rows: list[tuple[str, int]], extension: str) -> None:
    if extension in (".csv", ".tsv"):
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="\t" if extension == ".tsv" else ",")
        writer.writerow(["text", "label"])
        writer.writerows(rows)
        content = buffer.getvalue()
    elif extension == ".jsonl":
        content = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows)
    else:
        content = json.dumps([{"text": t, "label": y} for t, y in rows])
    kept = [(t, y) for t, y in rows if t.strip()]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"input{extension}"
        path.write_text(content, encoding="utf-8")
        if not kept:
            try:
                read_table(path, drop_empty=True)
            except BudgetloraError as err:
                assert "empty text" in str(err)
            return
        table = read_table(path, drop_empty=True)
    assert table.texts == [t for t, _ in kept]
    assert table.labels is not None and table.labels.tolist() == [y for _, y in kept]


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=2, max_size=40),
    validation_size=st.one_of(st.floats(0.01, 0.9), st.integers(1, 45)),
    test_size=st.one_of(st.just(0.0), st.floats(0.01, 0.5), st.integers(1, 10)),
    seed=st.integers(0, 3),
)
def test_splits_partition_the_rows_or_say_why_not(
    labels: list[int], validation_size: float, test_size: float, seed: int
) -> None:
    counts = np.bincount(labels)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.csv"
        path.write_text("text,label,ID\n" + "".join(f"t{i},{y},{i}\n" for i, y in enumerate(labels)))
        cfg = DataConfig(
            source=str(path), validation_size=validation_size, test_size=test_size, split_seed=seed
        )
        try:
            splits = load_splits(cfg)
        except BudgetloraError as err:
            message = str(err)
            assert message.startswith(str(path))
            if (counts > 0).sum() < 2:
                assert "a classifier needs at least two classes" in message
            elif (counts == 0).any():
                assert "no training rows of class(es)" in message
            elif (counts == 1).any():
                assert "have one row each" in message
            else:
                assert "leaving none to train on" in message or "no training rows left of class" in message
            return
    assert (counts > 0).all() and counts.min() >= 2  # each rule above was met
    parts = [splits.train, splits.validation] + ([splits.test] if splits.test is not None else [])
    assert (splits.test is not None) == (test_size > 0)
    ids = [i for part in parts for i in part.ids or []]
    assert sorted(ids, key=int) == [str(i) for i in range(len(labels))]
    for part in parts:
        assert part.labels is not None
        assert part.labels.tolist() == [labels[int(i)] for i in part.ids or []]
    assert splits.label_names == tuple(f"label_{k}" for k in range(max(labels) + 1))
    assert splits.train.labels is not None and set(splits.train.labels.tolist()) == set(labels)
