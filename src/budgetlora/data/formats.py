"""Reading data sources (files of each format, folders, Hub datasets) into raw columns.

Checking texts and labels is :mod:`budgetlora.data.tables`'s job. Every failure a user can cause
(missing file, bytes that are not the format the extension says, malformed rows) becomes a
:class:`BudgetloraError` that names the file and the row or line.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import os
import pickle
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budgetlora.errors import BudgetloraError, option

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "RawTable",
    "read_raw",
    "read_source",
    "raw_from_dataset",
    "classic_agnews_label_names",
]

SUPPORTED_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".pkl", ".pickle")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?")  # name or owner/name
_SPLITS = ("train", "validation", "test")
# Classic AG News release: the first field is a 1-based class index.
_CLASS_INDEX = re.compile(r"\s*[0-9]{1,9}\s*")
# Line breaks in the classic release. Its readme says they are written as backslash + "n",
# but in the files a bare backslash is the break ("dwindling\band", "social\network"), so
# "\n" only counts as an escape when no lower-case letter follows; runs of breaks and the
# spaces around them become one space.
_CLASSIC_BREAK = re.compile(r" *(?:(?:\\+n(?![a-z])|\\+) *)+")


@dataclass(frozen=True)
class RawTable:
    """A file's rows as named columns of Python values, before any checks."""

    columns: dict[str, list[Any]]
    n_rows: int
    source: str
    class_labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Class names per column, from a ClassLabel feature or a classic release's classes.txt."""
    classic: bool = False
    """Classic AG News release: the columns are `text` and `label` (0-based), whatever is configured."""
    repeated: dict[str, str] = field(default_factory=dict)
    """Column names the file gives more than once, and where (for messages); later copies are renamed."""


def read_raw(path: Path, *, allow_pickle: bool = False) -> RawTable:
    """Read one data file (or a `save_to_disk` folder of one dataset) by its extension."""
    if path.is_dir():
        if _is_saved_dataset(path):
            return _read_saved_dataset(path)
        raise BudgetloraError(
            f"{path} is a folder, not a data file; pass one of its files (it holds: {_listing(path)})"
        )
    if not path.is_file():
        raise BudgetloraError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return _read_pickle(path, allow_pickle)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in SUPPORTED_EXTENSIONS:
        raise BudgetloraError(
            f"cannot read {path}: unknown extension {path.suffix or '(none)'!r};"
            f" supported: {', '.join(SUPPORTED_EXTENSIONS)}, or a datasets save_to_disk folder"
        )
    text = _decode(path)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, text, "\t" if suffix == ".tsv" else ",")
    return _read_json(path, text)


def read_source(source: str, *, allow_pickle: bool = False) -> dict[str, RawTable]:
    """Raw tables of a source's own splits: train always, validation and test when it has them.

    `source` is a data file (train only), a folder (train/validation/test files, the classic
    AG News release, or a save_to_disk folder), or else a Hugging Face Hub dataset id.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return {"train": read_raw(path, allow_pickle=allow_pickle)}
    if path.is_dir():
        return _read_folder(path, allow_pickle)
    if source.lower().endswith((*SUPPORTED_EXTENSIONS, ".txt")) or _HUB_ID.fullmatch(source) is None:
        raise BudgetloraError(f"file not found: {source}")
    return _read_hub(source)


def _read_folder(folder: Path, allow_pickle: bool) -> dict[str, RawTable]:
    if _is_saved_dataset(folder):
        loaded = _load_saved_dataset(folder)
        return _dataset_splits(loaded if isinstance(loaded, Mapping) else {"train": loaded}, str(folder))
    found: dict[str, RawTable] = {}
    for split in _SPLITS:
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.stem == split and p.suffix.lower() in SUPPORTED_EXTENSIONS
        )
        if len(files) > 1:
            raise BudgetloraError(
                f"{folder} has several {split} files ({', '.join(p.name for p in files)}); keep one"
            )
        if files:
            found[split] = read_raw(files[0], allow_pickle=allow_pickle)
    if "train" not in found:
        raise BudgetloraError(
            f"{folder} has nothing to read: expected train.csv (+ test.csv, classes.txt: the classic"
            f" AG News release), train/validation/test files ({', '.join(SUPPORTED_EXTENSIONS)}),"
            f" or a datasets save_to_disk folder; it holds: {_listing(folder)}"
        )
    return found


def _dataset_splits(splits: Mapping[str, Any], source: str) -> dict[str, RawTable]:
    if "train" not in splits:
        raise BudgetloraError(f"{source} has no 'train' split; its splits: {', '.join(splits)}")
    return {name: raw_from_dataset(splits[name], f"{source} [{name}]") for name in _SPLITS if name in splits}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _read_hub(name: str) -> dict[str, RawTable]:
    import datasets

    offline = (
        f"cannot load dataset {name!r} from the Hugging Face Hub (offline or unreachable); download it"
        f" where you have internet, or pass a local file or folder with {option('data.source')}"
    )
    # datasets reads HF_HUB_OFFLINE once, at import; set later (tests, notebooks) it would be
    # ignored and load_dataset would retry the network for about 25 s before failing.
    requested = _env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE")
    if requested and not datasets.config.HF_HUB_OFFLINE:
        raise BudgetloraError(offline)
    try:
        loaded = datasets.load_dataset(name)
    except (ConnectionError, TimeoutError) as err:
        raise BudgetloraError(offline) from err
    except datasets.exceptions.DatasetNotFoundError as err:
        raise BudgetloraError(
            f"dataset {name!r} was not found on the Hugging Face Hub (or it is private or gated): {err}"
        ) from err
    except Exception as err:  # a dataset's loading script or files can fail in any way
        raise BudgetloraError(f"cannot load dataset {name!r} from the Hugging Face Hub: {err}") from err
    return _dataset_splits(loaded, name)


def _listing(folder: Path, limit: int = 10) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return shown or "nothing"


def _decode(path: Path) -> str:
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # as Excel writes
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        start = bom + err.start
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise BudgetloraError(
            f"{path} is not UTF-8 text: invalid byte 0x{data[start]:02x} at line {line},"
            f" column {column} (byte {start}); save it as UTF-8"
        ) from None
    if not text.strip():
        raise BudgetloraError(f"{path} is empty")
    return text


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    # The csv module's default limit (128 KiB a field) would reject long documents.
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _read_delimited(path: Path, text: str, delimiter: str) -> RawTable:
    rows: list[list[str]] = []
    lines: list[int] = []  # line where each row ends, for messages
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        with _csv_field_limit(2**31 - 1):
            for row in reader:
                if row:  # blank lines
                    rows.append(row)
                    lines.append(reader.line_num)
    except csv.Error as err:
        raise BudgetloraError(f"cannot parse {path} at line {reader.line_num}: {err}") from None
    if not rows:
        raise BudgetloraError(f"{path} is empty")
    first = rows[0]
    classic = len(first) == 3 and _CLASS_INDEX.fullmatch(first[0]) is not None
    header = ["class index", "title", "description"] if classic else first
    body = rows if classic else rows[1:]
    offset = 0 if classic else 1
    for i, row in enumerate(body):
        if len(row) != len(header):
            shape = "the classic AG News format has 3" if classic else f"the header has {len(header)}"
            raise BudgetloraError(
                f"{path}: row {i + 1} (line {lines[i + offset]}) has {len(row)} fields; {shape}"
            )
    if classic:
        return _classic_table(path, body)
    names = _unique_names(header)
    columns = {name: [row[j] for row in body] for j, name in enumerate(names)}
    return RawTable(columns, len(body), str(path), repeated=_repeated_names(header))


def _repeated_names(names: list[str]) -> dict[str, str]:
    """{name: 'columns 2, 5'} for each name given more than once (1-based positions)."""
    positions: dict[str, list[int]] = {}
    for j, name in enumerate(names):
        positions.setdefault(name, []).append(j + 1)
    return {
        name: "columns " + ", ".join(map(str, where)) for name, where in positions.items() if len(where) > 1
    }


def _unique_names(names: list[str]) -> list[str]:
    """Repeated column names get `.1`, `.2`, ... as pandas does."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        if name in seen:
            seen[name] += 1
            unique.append(f"{name}.{seen[name]}")
        else:
            seen[name] = 0
            unique.append(name)
    return unique


def _classic_table(path: Path, rows: list[list[str]]) -> RawTable:
    labels = []
    for i, row in enumerate(rows):
        if _CLASS_INDEX.fullmatch(row[0]) is None:
            raise BudgetloraError(
                f"{path}: row {i + 1}: {row[0][:40]!r} is not a class index"
                " (classic AG News format: class index from 1, title, description)"
            )
        index = int(row[0])
        if index < 1:
            raise BudgetloraError(
                f"{path}: row {i + 1}: class index {index}; the classic format counts from 1"
            )
        labels.append(index - 1)
    texts = [_CLASSIC_BREAK.sub(" ", f"{title} {description}").strip() for _, title, description in rows]
    names = classic_agnews_label_names(path)
    return RawTable(
        {"text": texts, "label": labels},
        len(rows),
        str(path),
        class_labels={"label": names} if names else {},
        classic=True,
    )


def classic_agnews_label_names(path: str | Path) -> tuple[str, ...] | None:
    """Class names from the `classes.txt` in a classic release folder (or beside one of its files)."""
    path = Path(path)
    classes = (path if path.is_dir() else path.parent) / "classes.txt"
    if not classes.is_file():
        return None
    try:
        names = tuple(line.strip() for line in classes.read_text(encoding="utf-8-sig").splitlines())
    except UnicodeDecodeError:
        raise BudgetloraError(f"{classes} is not UTF-8 text") from None
    names = tuple(n for n in names if n)
    if not names or len(set(names)) != len(names):
        raise BudgetloraError(f"{classes} must list unique class names, one a line; it has {list(names)}")
    return names


class _Record(dict[str, Any]):
    """A JSON object that remembers the keys it gave more than once (json keeps the last value)."""

    repeated: tuple[str, ...] = ()


def _record(pairs: list[tuple[str, Any]]) -> _Record:
    record = _Record(pairs)
    if len(record) < len(pairs):
        counts = Counter(key for key, _ in pairs)
        record.repeated = tuple(key for key, n in counts.items() if n > 1)
    return record


def _read_json(path: Path, text: str) -> RawTable:
    records: list[Any]
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text, object_pairs_hook=_record)
        except (ValueError, RecursionError) as err:
            raise BudgetloraError(f"{path} is not valid JSON: {err}") from None
        where = "item"
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line, object_pairs_hook=_record))
            except (ValueError, RecursionError) as err:
                raise BudgetloraError(
                    f"{path}: line {number} is not valid JSON ({err}); expected JSON lines"
                    " (one object per line) or a JSON list of objects"
                ) from None
        where = "JSON line"
    if not isinstance(records, list):  # a JSON array literal can still hold a scalar
        raise BudgetloraError(f"{path} must hold a JSON list of objects")
    names: dict[str, None] = {}
    repeated: dict[str, str] = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise BudgetloraError(
                f"{path}: {where} {i + 1} is a {type(record).__name__}, not an object with named fields"
            )
        names.update(dict.fromkeys(record))
        for name in getattr(record, "repeated", ()):
            repeated.setdefault(name, f"{where} {i + 1}")
    columns = {name: [record.get(name) for record in records] for name in names}
    return RawTable(columns, len(records), str(path), repeated=repeated)


def _read_parquet(path: Path) -> RawTable:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path).read()  # unlike pq.read_table, keeps repeated column names
    except (pa.ArrowException, OSError, ValueError) as err:
        raise BudgetloraError(f"{path} is not a readable Parquet file: {err}") from None
    return RawTable(
        {name: table.column(i).to_pylist() for i, name in enumerate(_unique_names(table.column_names))},
        table.num_rows,
        str(path),
        class_labels=_class_labels_from_schema(table.schema),
        repeated=_repeated_names(table.column_names),
    )


def _class_labels_from_schema(schema: Any) -> dict[str, tuple[str, ...]]:
    """ClassLabel names that `datasets` stores in a Parquet file's schema metadata."""
    if not schema.metadata or b"huggingface" not in schema.metadata:
        return {}
    import datasets

    try:
        features = datasets.Features.from_arrow_schema(schema)
    except Exception:  # foreign or damaged metadata: the columns are still readable
        return {}
    return _class_labels(features)


def _class_labels(features: Any) -> dict[str, tuple[str, ...]]:
    import datasets

    return {
        name: tuple(feature.names)
        for name, feature in features.items()
        if isinstance(feature, datasets.ClassLabel)
    }


def raw_from_dataset(dataset: Any, source: str) -> RawTable:
    """The columns of a `datasets.Dataset` (ClassLabel names kept)."""
    columns = dataset.with_format(None).to_dict()
    return RawTable(columns, dataset.num_rows, source, class_labels=_class_labels(dataset.features))


def _is_saved_dataset(folder: Path) -> bool:
    """Whether `folder` was written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return any((folder / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json"))


def _load_saved_dataset(folder: Path) -> Any:
    import datasets

    try:
        return datasets.load_from_disk(str(folder))
    except Exception as err:  # datasets raises many types for damaged folders
        raise BudgetloraError(f"cannot load the saved dataset in {folder}: {err}") from None


def _read_saved_dataset(folder: Path) -> RawTable:
    import datasets

    loaded = _load_saved_dataset(folder)
    if isinstance(loaded, datasets.DatasetDict):
        splits = ", ".join(loaded)
        raise BudgetloraError(
            f"{folder} holds several splits ({splits}); pass one of them, e.g. {folder / next(iter(loaded))}"
        )
    return raw_from_dataset(loaded, str(folder))


def _read_pickle(path: Path, allow_pickle: bool) -> RawTable:
    if not allow_pickle:
        raise BudgetloraError(
            f"refusing to read {path}: unpickling a file runs code from it; if you trust the file,"
            f" pass {option('data.allow_pickle')}"
        )
    import datasets
    import pandas as pd

    try:
        with path.open("rb") as handle:
            loaded = pickle.load(handle)
    except Exception as err:  # unpickling can raise anything the pickled code raises
        raise BudgetloraError(f"cannot unpickle {path}: {type(err).__name__}: {err}") from None
    if isinstance(loaded, datasets.Dataset):
        return raw_from_dataset(loaded, str(path))
    if isinstance(loaded, pd.DataFrame):
        given = [str(c) for c in loaded.columns]
        columns = {}
        for j, name in enumerate(_unique_names(given)):
            column = loaded.iloc[:, j]
            columns[name] = column.astype(object).where(column.notna(), None).tolist()  # NA, NaN -> None
        return RawTable(columns, len(loaded), str(path), repeated=_repeated_names(given))
    kind = f"{type(loaded).__module__}.{type(loaded).__qualname__}"
    raise BudgetloraError(f"{path} holds a {kind}; expected a datasets.Dataset or a pandas DataFrame")
