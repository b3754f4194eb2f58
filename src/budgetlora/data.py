"""Labelled and unlabelled text tables, and the train/validation/test splits of a run.

`read_table` reads one file (formats in :mod:`budgetlora.formats`) and checks its texts and
labels; `load_splits` turns a :class:`DataConfig` into seeded, stratified splits.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from budgetlora.config import DataConfig
from budgetlora.errors import BudgetloraError
from budgetlora.formats import RawTable, classic_agnews_label_names, read_raw, read_source

__all__ = ["TextTable", "Splits", "read_table", "load_splits", "classic_agnews_label_names"]

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

    def __post_init__(self) -> None:
        if self.labels is not None:
            labels = np.asarray(self.labels).astype(np.int64, copy=False).reshape(-1)
            if len(labels) != len(self.texts):
                raise ValueError(f"{len(labels)} labels for {len(self.texts)} texts")
            object.__setattr__(self, "labels", labels)
        if self.ids is not None and len(self.ids) != len(self.texts):
            raise ValueError(f"{len(self.ids)} ids for {len(self.texts)} texts")

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Sequence[int] | np.ndarray) -> TextTable:
        """The rows at `indices`, in that order."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        return TextTable(
            texts=[self.texts[i] for i in index],
            labels=None if self.labels is None else self.labels[index],
            ids=None if self.ids is None else [self.ids[i] for i in index],
            label_names=self.label_names,
            source=self.source,
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
) -> TextTable:
    """Read one data file (csv, tsv, jsonl, json, parquet, pickle) or saved dataset folder.

    With `require_labels=False` (prediction input) labels are read when the label column
    exists and are None otherwise.
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


def _to_table(
    raw: RawTable,
    *,
    text_column: str,
    label_column: str,
    label_names: tuple[str, ...] | None,
    require_labels: bool,
    drop_empty: bool,
) -> tuple[TextTable, int]:
    """A checked table and the number of empty-text rows dropped."""
    if raw.classic:  # the classic release has no header: its columns are named by the reader
        text_column, label_column = "text", "label"
    if raw.n_rows == 0:
        raise BudgetloraError(
            f"no rows to predict in {raw.source}" if not require_labels else f"{raw.source} has no data rows"
        )
    _require_column(raw, text_column, "data.text_column")
    if require_labels:
        _require_column(raw, label_column, "data.label_column")
    texts = _texts(raw, text_column)
    empty = [i for i, text in enumerate(texts) if not text.strip()]
    if empty and not drop_empty:
        raise BudgetloraError(
            f"{raw.source}: {len(empty)} row(s) with empty or whitespace-only text in column"
            f" {text_column!r}: rows {_rows([i + 1 for i in empty])}; fix them, or pass --drop-empty"
            " (data.drop_empty: true) to drop them"
        )
    keep = [i for i, text in enumerate(texts) if text.strip()]
    if not keep:
        raise BudgetloraError(f"{raw.source}: every row has empty text; no rows left")

    labels: np.ndarray | None = None
    column = raw.columns.get(label_column)
    # prediction input may carry an empty label column (a template): that is no labels
    if column is not None and (
        require_labels or not all(_label_kind(column[i], {})[0] == "missing" for i in keep)
    ):
        label_names = label_names or raw.class_labels.get(label_column)
        labels, label_names = _labels(
            [column[i] for i in keep], [i + 1 for i in keep], raw, label_column, label_names
        )
    id_column = next((c for c in ("ID", "id") if c in raw.columns), None)
    ids = None
    if id_column is not None:
        values = raw.columns[id_column]
        ids = ["" if _is_missing(values[i]) else str(values[i]) for i in keep]
    table = TextTable([texts[i] for i in keep], labels, ids, label_names, raw.source)
    return table, len(empty)


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
    if "name" in by_kind:
        if label_names is None:
            label_names = tuple(sorted({name for _, name in by_kind["name"]}))
            index = {name: i for i, name in enumerate(label_names)}
        unknown = [(r, n) for r, n in by_kind["name"] if n not in index]
        if unknown:
            raise BudgetloraError(
                f"{where}: unknown label names in rows"
                f" {_rows([r for r, _ in unknown], [n for _, n in unknown])}; known: {_names(label_names)}"
            )
        return np.array([index[name] for _, name in by_kind["name"]], dtype=np.int64), label_names

    k = len(label_names) if label_names is not None else _MAX_CLASSES
    bad = [(r, v) for r, v in by_kind["int"] if not 0 <= v < k]
    if bad:
        if raw.classic:
            bad, allowed = [(r, v + 1) for r, v in bad], f"class indices 1..{k}"
        elif label_names is None:
            allowed = "class indices 0, 1, 2, ..."
        else:
            allowed = f"0..{k - 1} ({_names(label_names)})"
        raise BudgetloraError(
            f"{where}: labels out of range in rows {_rows([r for r, _ in bad], [v for _, v in bad])};"
            f" allowed: {allowed}"
        )
    return np.array([v for _, v in by_kind["int"]], dtype=np.int64), label_names


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:20]) + (f", ... ({len(names)} names)" if len(names) > 20 else "")


# --- sources ------------------------------------------------------------------------


def _label_names_of_source(raws: dict[str, RawTable], cfg: DataConfig) -> tuple[str, ...] | None:
    """cfg.label_names, else ClassLabel / classes.txt names, else the sorted class names of all splits."""
    if cfg.label_names is not None:
        return tuple(cfg.label_names)
    columns = {split: "label" if raw.classic else cfg.label_column for split, raw in raws.items()}
    for split, raw in raws.items():
        if columns[split] in raw.class_labels:
            return raw.class_labels[columns[split]]
    names = {
        parsed
        for split, raw in raws.items()
        for value in raw.columns.get(columns[split], [])
        for kind, parsed in [_label_kind(value, {})]
        if kind == "name"
    }
    return tuple(sorted(names)) if names else None


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


def load_splits(cfg: DataConfig) -> Splits:
    """Train/validation(/test) splits of `cfg.source`: the same cfg always gives the same splits.

    Validation (and test, when `cfg.test_size` > 0) are held out of train, stratified, unless
    the source has its own; word filters and `max_train_samples` apply to training rows only.
    """
    raws = read_source(cfg.source, allow_pickle=cfg.allow_pickle)
    names = _label_names_of_source(raws, cfg)
    dropped: Counter[str] = Counter()
    tables: dict[str, TextTable] = {}
    for split, raw in raws.items():
        tables[split], n_empty = _to_table(
            raw,
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            label_names=names,
            require_labels=True,
            drop_empty=cfg.drop_empty,
        )
        dropped["empty_text"] += n_empty
    if names is None:  # integer labels and nothing naming them
        k = max(int(t.labels.max()) for t in tables.values() if t.labels is not None) + 1
        names = tuple(f"label_{i}" for i in range(k))
    tables = {split: replace(table, label_names=names) for split, table in tables.items()}

    train, validation, test = tables["train"], tables.get("validation"), tables.get("test")
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
    train, filtered = _filter_words(train, cfg)
    dropped.update(filtered)
    train = _cap(train, cfg.max_train_samples, cfg.split_seed)
    validation = _cap(validation, cfg.max_eval_samples, cfg.split_seed)
    test = None if test is None else _cap(test, cfg.max_eval_samples, cfg.split_seed)
    return Splits(train, validation, test, names, {k: v for k, v in dropped.items() if v > 0})
