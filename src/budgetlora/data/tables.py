"""Labelled and unlabelled text tables, and the train/validation/test splits of a run.

`read_table` reads one file (formats in :mod:`budgetlora.data.formats`) and checks its texts and
labels; `load_splits` turns a :class:`DataConfig` into seeded, stratified splits.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from budgetlora.config import DataConfig
from budgetlora.data.formats import RawTable, classic_agnews_label_names, read_raw, read_source
from budgetlora.errors import BudgetloraError, option

__all__ = [
    "TextTable",
    "Splits",
    "read_table",
    "read_unlabelled",
    "concat_tables",
    "load_splits",
    "classic_agnews_label_names",
]

_SHOWN = 5  # rows listed in a message
_MAX_CLASSES = 100_000  # an integer label above this is a data error, not a class index
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


@dataclass(frozen=True, eq=False)
class TextTable:
    """Texts in file order, with integer labels and ids when the input has them."""

    texts: list[str]
    labels: np.ndarray | None
    """Shape (n,), int64, values 0..K-1; None for unlabelled input."""
    ids: list[str] | None
    """Values of the input's `ID` or `id` column, if it has one."""
    label_names: tuple[str, ...] | None
    source: str
    """Path or Hub id, for messages."""
    rows: np.ndarray | None = None
    """Shape (n,): each row's 1-based number among the source's data rows, for messages."""

    def __post_init__(self) -> None:
        if self.labels is not None:
            labels = np.asarray(self.labels).astype(np.int64, copy=False).reshape(-1)
            if len(labels) != len(self.texts):
                raise ValueError(f"{len(labels)} labels for {len(self.texts)} texts")
            object.__setattr__(self, "labels", labels)
        if self.ids is not None and len(self.ids) != len(self.texts):
            raise ValueError(f"{len(self.ids)} ids for {len(self.texts)} texts")
        rows = np.arange(1, len(self.texts) + 1) if self.rows is None else np.asarray(self.rows)
        if len(rows) != len(self.texts):
            raise ValueError(f"{len(rows)} row numbers for {len(self.texts)} texts")
        object.__setattr__(self, "rows", rows.astype(np.int64, copy=False).reshape(-1))

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Sequence[int] | np.ndarray) -> TextTable:
        """The rows at `indices`, in that order."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        assert self.rows is not None  # set in __post_init__
        return TextTable(
            texts=[self.texts[i] for i in index],
            labels=None if self.labels is None else self.labels[index],
            ids=None if self.ids is None else [self.ids[i] for i in index],
            label_names=self.label_names,
            source=self.source,
            rows=self.rows[index],
        )


@dataclass(frozen=True)
class Splits:
    """The labelled splits of a run, all sharing `label_names`."""

    train: TextTable
    validation: TextTable
    test: TextTable | None
    label_names: tuple[str, ...]
    dropped: dict[str, int]
    """Rows removed and why (empty_text, min_words, max_words, min_unique_ratio); only causes that removed rows."""


def read_table(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    require_labels: bool = True,
    allow_pickle: bool = False,
    drop_empty: bool = False,
    unique_ids: bool = False,
) -> TextTable:
    """Read one data file (csv, tsv, jsonl, json, parquet, pickle) or saved dataset folder.

    With `require_labels=False` (prediction input) labels are read when the label column
    exists and are None otherwise. `unique_ids` (a submission's input) refuses an `ID`
    column with repeated or missing values.
    """
    if label_names is not None and len(set(label_names)) != len(label_names):
        raise BudgetloraError(f"label names must be unique: {list(label_names)}")
    raw = read_raw(Path(path).expanduser(), allow_pickle=allow_pickle)
    table, _ = _to_table(
        raw,
        text_column=text_column,
        label_column=label_column,
        label_names=None if label_names is None else tuple(label_names),
        require_labels=require_labels,
        drop_empty=drop_empty,
        unique_ids=unique_ids,
    )
    return table


# --- checking raw columns ----------------------------------------------------------


def _rows(numbers: Sequence[int], values: Sequence[Any] | None = None) -> str:
    """'3, 7 (1.5), ... (12 in all)' for messages: 1-based row numbers, optionally with values."""
    shown = [
        str(n) if values is None else f"{n} ({_short(v)})"
        for n, v in zip(numbers[:_SHOWN], (values or numbers)[:_SHOWN], strict=False)
    ]
    more = f", ... ({len(numbers)} in all)" if len(numbers) > _SHOWN else ""
    return ", ".join(shown) + more


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _require_column(raw: RawTable, column: str, option: str) -> None:
    if column not in raw.columns:
        names = [_short(c) for c in list(raw.columns)[:20]]
        more = ", ..." if len(raw.columns) > 20 else ""
        raise BudgetloraError(
            f"{raw.source} has no column {column!r} (set {option}); its columns: {', '.join(names)}{more}"
        )
    _check_one_column(raw, column, option)


def _check_one_column(raw: RawTable, column: str, option: str) -> None:
    """A column that is read must be the only one of its name: which one was meant is a guess."""
    if column in raw.repeated:
        raise BudgetloraError(
            f"{raw.source} has more than one column named {column!r} ({raw.repeated[column]});"
            f" rename all but one ({option} reads it)"
        )


def _to_table(
    raw: RawTable,
    *,
    text_column: str,
    label_column: str,
    label_names: tuple[str, ...] | None,
    require_labels: bool,
    drop_empty: bool,
    unique_ids: bool = False,
) -> tuple[TextTable, int]:
    """A checked table and the number of empty-text rows dropped."""
    if raw.classic:  # the classic release has no header: its columns are named by the reader
        text_column, label_column = "text", "label"
    if raw.n_rows == 0:
        raise BudgetloraError(
            f"no rows to predict in {raw.source}" if not require_labels else f"{raw.source} has no data rows"
        )
    if text_column == label_column and require_labels:
        raise BudgetloraError(
            f"data.text_column and data.label_column both name {text_column!r}: a text cannot be its own label"
        )
    _require_column(raw, text_column, "data.text_column")
    if require_labels:
        _require_column(raw, label_column, "data.label_column")
    texts = _texts(raw, text_column)
    empty = [i for i, text in enumerate(texts) if not text.strip()]
    if empty and not drop_empty:
        raise BudgetloraError(
            f"{raw.source}: {len(empty)} row(s) with empty or whitespace-only text in column"
            f" {text_column!r}: rows {_rows([i + 1 for i in empty])}; fix them, or pass {option('data.drop_empty')}"
            " (data.drop_empty: true) to drop them"
        )
    keep = [i for i, text in enumerate(texts) if text.strip()]
    if not keep:
        raise BudgetloraError(f"{raw.source}: every row has empty text; no rows left")

    labels: np.ndarray | None = None
    column = raw.columns.get(label_column) if label_column != text_column else None
    # prediction input may carry an empty label column (a template): that is no labels
    if column is not None and (
        require_labels or not all(_label_kind(column[i], {})[0] == "missing" for i in keep)
    ):
        _check_one_column(raw, label_column, "data.label_column")
        label_names = label_names or raw.class_labels.get(label_column)
        labels, label_names = _labels(
            [column[i] for i in keep], [i + 1 for i in keep], raw, label_column, label_names
        )
    ids = _ids(raw, keep, unique_ids)
    rows = np.array(keep) + 1
    table = TextTable([texts[i] for i in keep], labels, ids, label_names, raw.source, rows)
    return table, len(empty)


def _ids(raw: RawTable, keep: list[int], unique: bool) -> list[str] | None:
    """The `ID` (or `id`) column's values of the kept rows; with `unique`, each once and none missing."""
    present = [c for c in ("ID", "id") if c in raw.columns]
    if not present:
        return None
    column = present[0]
    values = raw.columns[column]
    ids = ["" if _is_missing(values[i]) else str(values[i]) for i in keep]
    if not unique:
        return ids
    if len(present) > 1:
        raise BudgetloraError(
            f"{raw.source} has both an 'ID' and an 'id' column: which one the submission uses is a guess;"
            " rename or drop one"
        )
    _check_one_column(raw, column, "the ID column")
    missing = [i + 1 for i, value in zip(keep, ids, strict=True) if not value.strip()]
    if missing:
        raise BudgetloraError(
            f"{raw.source}: column {column!r}: {len(missing)} row(s) have no ID: rows {_rows(missing)};"
            " every row of a submission needs its ID"
        )
    rows_of: dict[str, list[int]] = {}
    for i, value in zip(keep, ids, strict=True):
        rows_of.setdefault(value, []).append(i + 1)
    repeated = {value: rows for value, rows in rows_of.items() if len(rows) > 1}
    if repeated:
        shown = "; ".join(f"{_short(v)} in rows {_rows(r)}" for v, r in list(repeated.items())[:_SHOWN])
        more = f"; ... ({len(repeated)} repeated IDs in all)" if len(repeated) > _SHOWN else ""
        raise BudgetloraError(
            f"{raw.source}: column {column!r} repeats IDs: {shown}{more}; a submission needs each ID once"
        )
    return ids


def _texts(raw: RawTable, column: str) -> list[str]:
    texts = []
    for i, value in enumerate(raw.columns[column]):
        if isinstance(value, str):
            texts.append(value)
        elif _is_missing(value):
            texts.append("")
        else:
            raise BudgetloraError(
                f"{raw.source}: column {column!r} must hold text; row {i + 1} holds"
                f" {type(value).__name__} {_short(value)}"
            )
    return texts


def _label_kind(value: Any, names: Mapping[str, int]) -> tuple[str, Any]:
    """('missing' | 'int' | 'float' | 'name' | 'invalid', value) of one raw label."""
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        return "missing", None
    if isinstance(value, bool | np.bool_):
        return "invalid", value
    if isinstance(value, int | np.integer):
        return "int", int(value)
    if isinstance(value, float | np.floating):
        return ("int", int(value)) if float(value).is_integer() else ("float", float(value))
    if isinstance(value, str):
        text = value.strip()
        if text in names:  # given class names win over reading "1" as a number
            return "name", text
        if _INTEGER.fullmatch(text):
            return "int", int(text) if len(text) <= 4000 else _MAX_CLASSES  # int() refuses longer
        if _NUMBER.fullmatch(text):
            number = float(text)
            return ("int", int(number)) if number.is_integer() else ("float", number)
        return "name", text
    return "invalid", value


def _labels(
    values: list[Any],
    rows: list[int],
    raw: RawTable,
    column: str,
    label_names: tuple[str, ...] | None,
) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Integer labels (n,) and the class names, from ints, integral floats or class names."""
    where = f"{raw.source}: column {column!r}"
    index = {name: i for i, name in enumerate(label_names or ())}
    by_kind: dict[str, list[tuple[int, Any]]] = {}
    for row, value in zip(rows, values, strict=True):
        kind, parsed = _label_kind(value, index)
        by_kind.setdefault(kind, []).append((row, parsed if kind != "invalid" else value))
    _check_label_kinds(by_kind, where)
    if "name" in by_kind:
        return _named_labels(by_kind["name"], label_names, where)
    return _indexed_labels(by_kind["int"], label_names, raw.classic, where)


def _check_label_kinds(by_kind: dict[str, list[tuple[int, Any]]], where: str) -> None:
    """Refuse missing, unreadable and non-integer labels, and integers mixed with class names."""

    def listed(kind: str, with_values: bool = True) -> str:
        pairs = by_kind[kind]
        return _rows([r for r, _ in pairs], [v for _, v in pairs] if with_values else None)

    if "missing" in by_kind:
        raise BudgetloraError(
            f"{where}: {len(by_kind['missing'])} row(s) have no label: rows {listed('missing', False)}"
        )
    if "invalid" in by_kind:
        raise BudgetloraError(f"{where}: labels must be integers or class names; rows {listed('invalid')}")
    if "float" in by_kind:
        raise BudgetloraError(
            f"{where}: labels must be integers 0..K-1 or class names; non-integer values in rows {listed('float')}"
        )
    if "int" in by_kind and "name" in by_kind:
        raise BudgetloraError(
            f"{where} mixes integer labels (rows {listed('int')}) and class names (rows {listed('name')});"
            " use one or the other"
        )


def _named_labels(
    pairs: list[tuple[int, str]], label_names: tuple[str, ...] | None, where: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels given as class names (row, name): indices into ``label_names``, or into the
    sorted names found when none are given."""
    if label_names is None:
        label_names = tuple(sorted({name for _, name in pairs}))
        _check_distinct_names(pairs, where)
    index = {name: i for i, name in enumerate(label_names)}
    unknown = [(r, n) for r, n in pairs if n not in index]
    if unknown:
        raise BudgetloraError(
            f"{where}: unknown label names in rows"
            f" {_rows([r for r, _ in unknown], [n for _, n in unknown])}; known: {_names(label_names)}"
        )
    return np.array([index[name] for _, name in pairs], dtype=np.int64), label_names


def _indexed_labels(
    pairs: list[tuple[int, int]], label_names: tuple[str, ...] | None, classic: bool, where: str
) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Labels given as class indices (row, index), checked against the number of classes
    (``classic``: a file of the classic AG News release, which counts classes from 1; an error
    shows its values so)."""
    k = len(label_names) if label_names is not None else _MAX_CLASSES
    bad = [(r, v) for r, v in pairs if not 0 <= v < k]
    if bad:
        if classic:
            bad, allowed = [(r, v + 1) for r, v in bad], f"class indices 1..{k}"
        elif label_names is None:
            allowed = "class indices 0, 1, 2, ..."
        else:
            allowed = f"0..{k - 1} ({_names(label_names)})"
        raise BudgetloraError(
            f"{where}: labels out of range in rows {_rows([r for r, _ in bad], [v for _, v in bad])};"
            f" allowed: {allowed}"
        )
    return np.array([v for _, v in pairs], dtype=np.int64), label_names


def _check_distinct_names(pairs: list[tuple[int, str]], where: str) -> None:
    """Class names of a file that differ only in case ('Sports', 'sports') are one class misspelt."""
    rows_of: dict[str, dict[str, list[int]]] = {}
    for row, name in pairs:
        rows_of.setdefault(name.casefold(), {}).setdefault(name, []).append(row)
    clashes = [spellings for spellings in rows_of.values() if len(spellings) > 1]
    if clashes:
        shown = "; ".join(
            ", ".join(f"{name!r} (rows {_rows(rows)})" for name, rows in spellings.items())
            for spellings in clashes[:_SHOWN]
        )
        raise BudgetloraError(
            f"{where}: class names that differ only in case: {shown}; spell each class one way"
        )


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:20]) + (f", ... ({len(names)} names)" if len(names) > 20 else "")


# --- sources and their classes --------------------------------------------------------


def _given_label_names(raws: dict[str, RawTable], cfg: DataConfig) -> tuple[str, ...] | None:
    """cfg.label_names, else the ClassLabel / classes.txt names of the source; they must agree."""
    recorded: dict[tuple[str, ...], str] = {}
    for raw in raws.values():
        names = raw.class_labels.get("label" if raw.classic else cfg.label_column)
        if names is not None:
            recorded.setdefault(names, raw.source)
    given = None if cfg.label_names is None else tuple(cfg.label_names)
    if given is not None:
        recorded.setdefault(given, "data.label_names")
    # label_0, label_1, ... (a run trained on bare integers) name nothing: real names of as many classes win
    counts = {len(names) for names in recorded if not _made_up(names)}
    recorded = {n: where for n, where in recorded.items() if not (_made_up(n) and len(n) in counts)}
    if len(recorded) > 1:
        shown = "; ".join(f"{where}: {_names(names)}" for names, where in recorded.items())
        raise BudgetloraError(
            f"the class names differ ({shown}): labels would mean different classes; use one set of names"
        )
    return next(iter(recorded), None)


def _made_up(names: tuple[str, ...]) -> bool:
    """Whether the names are the label_0, label_1, ... given to bare integer labels."""
    return all(name == f"label_{i}" for i, name in enumerate(names))


def _class(index: int, names: tuple[str, ...], classic: bool) -> str:
    """A class as the file writes it: its integer (1-based in the classic format), and its name if real."""
    number = str(index + 1 if classic else index)
    return number if names[index] == f"label_{index}" else f"{number} ({names[index]})"


def _classes(indices: Sequence[int] | np.ndarray, names: tuple[str, ...], classic: bool) -> str:
    shown = ", ".join(_class(int(i), names, classic) for i in indices[: _SHOWN * 2])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > _SHOWN * 2 else "")


def _tally(table: TextTable) -> np.ndarray:
    """(K,) rows of each class."""
    assert table.labels is not None and table.label_names is not None
    return np.bincount(table.labels, minlength=len(table.label_names))


def _check_classes(table: TextTable, given: bool, classic: bool) -> None:
    """The training rows of the source hold at least two classes and every class 0..K-1.

    K is the number of label names when they are given (config, ClassLabel, classes.txt, or the
    class names of the file), else the largest integer label + 1.
    """
    assert table.labels is not None and table.rows is not None and table.label_names is not None
    names, k = table.label_names, len(table.label_names)
    counts = _tally(table)
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise BudgetloraError(
            f"{table.source}: all {len(table)} training rows have the label {_class(int(present[0]), names, classic)};"
            " a classifier needs at least two classes"
        )
    missing = np.flatnonzero(counts == 0)
    if not missing.size:
        return
    first = 1 if classic else 0
    if given:
        what = f"of the {k} label names ({_names(names)})"
        fix = "give only the names of classes that have rows, or add rows of the missing ones"
    else:
        k_is = "the largest class index" if classic else "the largest label + 1"
        what = f"of the integer labels {first}..{k - 1 + first} (K = {k_is})"
        fix = (
            f"renumber the labels {first}..{len(present) - 1 + first}, or name the classes (data.label_names)"
        )
    message = f"{table.source}: no training rows of class(es) {_classes(missing, names, classic)} {what}"
    if not given:
        odd = np.flatnonzero(table.labels > missing[0])
        rows = [int(table.rows[i]) for i in odd]
        values = [int(table.labels[i]) + first for i in odd]
        message += f"; rows above the first missing class: {_rows(rows, values)}"
    raise BudgetloraError(f"{message}; {fix}")


def _check_known(table: TextTable, k: int, train: TextTable, classic: bool) -> None:
    """Integer labels of a validation/test split must be classes of the training rows."""
    assert table.labels is not None and table.rows is not None
    bad = np.flatnonzero(table.labels >= k)
    if bad.size:
        first = 1 if classic else 0
        raise BudgetloraError(
            f"{table.source}: labels out of range in rows"
            f" {_rows([int(table.rows[i]) for i in bad], [int(table.labels[i]) + first for i in bad])};"
            f" the training rows of {train.source} have classes {first}..{k - 1 + first}"
        )


# --- splitting ----------------------------------------------------------------------


def _count(size: float, n: int) -> int:
    """Rows meant by a size option: a fraction of n if < 1, else a count."""
    return max(1, round(size * n)) if size < 1 else round(size)


def _pick(labels: np.ndarray, n_pick: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(picked, rest) row indices, each sorted; stratified by label when every class allows it."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    present = counts[counts > 0]
    # sklearn stratifies only when each class has 2 rows and both sides can hold every class
    can_stratify = present.min() >= 2 and len(present) <= min(n_pick, len(labels) - n_pick)
    rest, picked = train_test_split(
        np.arange(len(labels)), test_size=n_pick, random_state=seed, stratify=labels if can_stratify else None
    )
    return np.sort(picked), np.sort(rest)


def _hold_out(
    table: TextTable, n_out: int, option: str, size: float, seed: int
) -> tuple[TextTable, TextTable]:
    """(rest, held out) of a labelled table."""
    if n_out >= len(table):
        raise BudgetloraError(
            f"{option}={size:g} holds out {n_out} of the {len(table)} training rows of {table.source},"
            " leaving none to train on"
        )
    assert table.labels is not None
    picked, rest = _pick(table.labels, n_out, seed)
    return table.select(rest), table.select(picked)


def _cap(table: TextTable, n: int | None, seed: int) -> TextTable:
    """A stratified sample of n rows, or the table when it is not larger."""
    if n is None or len(table) <= n:
        return table
    assert table.labels is not None
    return table.select(_pick(table.labels, n, seed)[0])


def _filter_words(table: TextTable, cfg: DataConfig) -> tuple[TextTable, Counter[str]]:
    """Training rows that pass the word filters, and how many each filter removed."""
    dropped: Counter[str] = Counter()
    if cfg.min_words is None and cfg.max_words is None and cfg.min_unique_ratio is None:
        return table, dropped
    keep = []
    for i, text in enumerate(table.texts):
        words = text.split()
        if cfg.min_words is not None and len(words) < cfg.min_words:
            dropped["min_words"] += 1
        elif cfg.max_words is not None and len(words) > cfg.max_words:
            dropped["max_words"] += 1
        elif (
            cfg.min_unique_ratio is not None
            and len({w.lower() for w in words}) / max(len(words), 1) < cfg.min_unique_ratio
        ):
            dropped["min_unique_ratio"] += 1
        else:
            keep.append(i)
    if not keep:
        raise BudgetloraError(
            f"the word filters removed all {len(table)} training rows of {table.source}"
            f" (data.min_words={cfg.min_words}, data.max_words={cfg.max_words},"
            f" data.min_unique_ratio={cfg.min_unique_ratio})"
        )
    return table.select(keep), dropped


def _read_splits(raws: dict[str, RawTable], cfg: DataConfig) -> tuple[dict[str, TextTable], bool, int]:
    """Checked tables of the source's splits, all with the training rows' label names; whether
    those names were given (rather than made up for integer labels), and empty rows dropped."""
    names = _given_label_names(raws, cfg)
    given = names is not None
    n_empty = 0
    tables: dict[str, TextTable] = {}
    for split in sorted(raws, key=lambda s: s != "train"):  # train first: its classes are the run's
        tables[split], n = _to_table(
            raws[split],
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            label_names=names,
            require_labels=True,
            drop_empty=cfg.drop_empty,
        )
        n_empty += n
        if names is None and tables[split].label_names is not None:  # class names in the train file
            names, given = tables[split].label_names, True
    train = tables["train"]
    assert train.labels is not None
    if names is None:  # integer labels and nothing naming them
        names = tuple(f"label_{i}" for i in range(int(train.labels.max()) + 1))
        for split, table in tables.items():
            if split != "train":
                _check_known(table, len(names), train, raws["train"].classic)
    return {split: replace(table, label_names=names) for split, table in tables.items()}, given, n_empty


def read_unlabelled(cfg: DataConfig) -> TextTable:
    """The texts of ``data.unlabelled`` (labels there, if any, are ignored), checked as
    ``predict`` checks its input; errors name the option."""
    assert cfg.unlabelled is not None
    try:
        table = read_table(
            cfg.unlabelled,
            text_column=cfg.text_column,
            require_labels=False,
            allow_pickle=cfg.allow_pickle,
            drop_empty=cfg.drop_empty,
        )
    except BudgetloraError as err:
        raise BudgetloraError(f"data.unlabelled: {err}") from err
    return replace(table, labels=None)


def concat_tables(first: TextTable, second: TextTable) -> TextTable:
    """The rows of ``first`` then ``second`` (both labelled, or both not), ``first``'s names and source."""
    labels = (
        None
        if first.labels is None or second.labels is None
        else np.concatenate([first.labels, second.labels])
    )
    assert first.rows is not None and second.rows is not None
    return TextTable(
        texts=first.texts + second.texts,
        labels=labels,
        ids=None,
        label_names=first.label_names,
        source=first.source,
        rows=np.concatenate([first.rows, second.rows]),
    )


def load_rows(cfg: DataConfig) -> TextTable:
    """Every row of a one-file source (what ``evaluate --data FILE`` scores), checked as
    :func:`load_splits` checks them; nothing is held out, no filter or cap applies."""
    tables, _, _ = _read_splits(read_source(cfg.source, allow_pickle=cfg.allow_pickle), cfg)
    return tables["train"]


def load_splits(cfg: DataConfig, *, training: bool = True) -> Splits:
    """Train/validation(/test) splits of `cfg.source`: the same cfg always gives the same splits.

    Validation (and test, when `cfg.test_size` > 0) are held out of train, stratified, unless
    the source has its own; word filters and `max_train_samples` apply to training rows only.
    With `training` (not when only evaluating) the training rows must be able to train a
    classifier: at least two classes, every class 0..K-1 among them, before and after the
    hold-out, filters and caps; holding out needs at least 2 rows of every class.
    """
    raws = read_source(cfg.source, allow_pickle=cfg.allow_pickle)
    tables, given, n_empty = _read_splits(raws, cfg)
    train, validation, test = tables["train"], tables.get("validation"), tables.get("test")
    classic = raws["train"].classic
    holding_out = validation is None or (test is None and cfg.test_size > 0)
    if training:
        _check_classes(train, given, classic)
        if holding_out:
            _check_hold_out(train, classic, cfg)

    trail = [("row(s)", _tally(train))]  # each class's training rows after each step, for messages
    n_source = len(train)
    if test is None and cfg.test_size > 0:
        train, test = _hold_out(
            train, _count(cfg.test_size, n_source), "data.test_size", cfg.test_size, cfg.split_seed
        )
    if validation is None:
        train, validation = _hold_out(
            train,
            _count(cfg.validation_size, n_source),
            "data.validation_size",
            cfg.validation_size,
            cfg.split_seed,
        )
    if holding_out:
        trail.append(("held out for validation/test", _tally(train)))
    train, dropped = _filter_words(train, cfg)
    if dropped:
        trail.append(("removed by the word filters", _tally(train)))
    if cfg.max_train_samples is not None and len(train) > cfg.max_train_samples:
        train = _cap(train, cfg.max_train_samples, cfg.split_seed)
        trail.append((f"left out by data.max_train_samples={cfg.max_train_samples}", _tally(train)))
    if training:
        _check_every_class_trains(train, trail, classic)
    validation = _cap(validation, cfg.max_eval_samples, cfg.split_seed)
    test = None if test is None else _cap(test, cfg.max_eval_samples, cfg.split_seed)
    dropped["empty_text"] = n_empty
    assert train.label_names is not None
    return Splits(train, validation, test, train.label_names, {k: v for k, v in dropped.items() if v > 0})


def _check_hold_out(table: TextTable, classic: bool, cfg: DataConfig) -> None:
    """Rows held out of the training rows leave each class a training row only if it has two."""
    assert table.labels is not None and table.rows is not None and table.label_names is not None
    single = np.flatnonzero(_tally(table) == 1)
    if single.size:
        rows = [int(table.rows[np.flatnonzero(table.labels == c)[0]]) for c in single]
        options = f"data.validation_size={cfg.validation_size:g}" + (
            f", data.test_size={cfg.test_size:g}" if cfg.test_size > 0 else ""
        )
        raise BudgetloraError(
            f"{table.source}: class(es) {_classes(single, table.label_names, classic)} have one row each"
            f" (rows {_rows(rows)}); holding rows out of the training rows ({options}) needs at least 2"
            " rows of every class; add rows, or give the source its own validation (and test) file"
        )


def _check_every_class_trains(train: TextTable, trail: list[tuple[str, np.ndarray]], classic: bool) -> None:
    """After the hold-out, filters and caps every class keeps a training row; `trail` says where each went."""
    assert train.label_names is not None
    names = train.label_names
    lost = np.flatnonzero(trail[-1][1] == 0)
    if not lost.size:
        return

    def story(c: int) -> str:
        steps = [f"{trail[0][1][c]} {trail[0][0]}"]
        steps += [f"{before[c] - after[c]} {why}" for (_, before), (why, after) in pairwise(trail)]
        return f"class {_class(c, names, classic)}: " + ", ".join(steps)

    raise BudgetloraError(
        f"{train.source}: no training rows left of class(es) {_classes(lost, names, classic)}"
        f" ({'; '.join(story(int(c)) for c in lost[:_SHOWN])}); every class needs at least one training row"
    )
