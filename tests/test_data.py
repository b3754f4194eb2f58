"""Reading every supported format from real files, the errors users meet, and the splits."""

from __future__ import annotations

import json
import pickle
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from budgetlora.config import DataConfig
from budgetlora.data.tables import Splits, TextTable, classic_agnews_label_names, load_splits, read_table
from budgetlora.errors import BudgetloraError

AG_NEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news"
requires_sample = pytest.mark.skipif(
    not (AG_NEWS / "sample.csv").is_file(), reason="../shared/data/ag_news/sample.csv not present"
)
NAMES = ("World", "Sports", "Business", "Sci/Tech")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def labelled_csv(path: Path, labels: list[int], *, words: int = 5) -> Path:
    """A text,label,ID CSV: row i has text 'row i w1 ... ' and the given label; ID = i."""
    lines = ["text,label,ID"]
    lines += [
        f"row{i} " + " ".join(f"w{j}" for j in range(words)) + f",{y},{i}" for i, y in enumerate(labels)
    ]
    return write(path, "\n".join(lines) + "\n")


def balanced(n_per_class: int, k: int = 4) -> list[int]:
    return [i % k for i in range(n_per_class * k)]


def error(excinfo: pytest.ExceptionInfo[BudgetloraError]) -> str:
    return str(excinfo.value)


# --- formats -----------------------------------------------------------------------


def test_csv_with_quotes_newlines_and_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path / "train.csv",
        'ID,text,label,extra\n7,"Hello, world",1,x\n8,"two\nlines ""quoted""",0,y\n9,plain,3,z\n',
    )
    table = read_table(path)
    assert table.texts == ["Hello, world", 'two\nlines "quoted"', "plain"]
    assert table.labels is not None and table.labels.dtype == np.int64
    assert table.labels.tolist() == [1, 0, 3]
    assert table.ids == ["7", "8", "9"]
    assert table.label_names is None
    assert table.source == str(path)
    assert len(table) == 3


def test_tsv_and_custom_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "data.tsv", "sentence\ttarget\nfirst one\t0\nsecond, with comma\t1\n")
    table = read_table(path, text_column="sentence", label_column="target")
    assert table.texts == ["first one", "second, with comma"]
    assert table.labels is not None and table.labels.tolist() == [0, 1]
    assert table.ids is None


def test_jsonl_skips_blank_lines_and_maps_class_names(tmp_path: Path) -> None:
    path = write(
        tmp_path / "train.jsonl",
        '{"text": "a", "label": "Sports"}\n\n{"text": "b", "label": "World"}\n{"text": "c", "label": "Sports"}\n',
    )
    table = read_table(path)
    assert table.texts == ["a", "b", "c"]
    assert table.label_names == ("Sports", "World")  # sorted, when no names are given
    assert table.labels is not None and table.labels.tolist() == [0, 1, 0]
    named = read_table(path, label_names=NAMES)
    assert named.label_names == NAMES
    assert named.labels is not None and named.labels.tolist() == [1, 0, 1]


def test_json_list_with_integral_float_labels(tmp_path: Path) -> None:
    path = write(
        tmp_path / "train.json", json.dumps([{"text": "x", "label": 2.0, "id": 5}, {"text": "y", "label": 0}])
    )
    table = read_table(path)
    assert table.texts == ["x", "y"]
    assert table.labels is not None and table.labels.tolist() == [2, 0]
    assert table.ids == ["5", ""]  # a row without an id keeps its place


def test_json_lines_in_a_json_file(tmp_path: Path) -> None:
    path = write(tmp_path / "train.json", '{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n')
    assert read_table(path).texts == ["x", "y"]


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pd.DataFrame({"text": ["p", "q"], "label": [3, 1], "other": [0.5, 1.5]}).to_parquet(path)
    table = read_table(path, label_names=NAMES)
    assert table.texts == ["p", "q"]
    assert table.labels is not None and table.labels.tolist() == [3, 1]
    assert table.label_names == NAMES


def test_parquet_written_by_datasets_keeps_class_label_names(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict(
        {"text": ["a", "b"], "label": [1, 0]},
        features=datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
        ),
    )
    path = tmp_path / "train.parquet"
    ds.to_parquet(str(path))
    table = read_table(path)
    assert table.label_names == ("neg", "pos")
    assert table.labels is not None and table.labels.tolist() == [1, 0]


def test_pickled_dataset_like_the_competition_file(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "test_unlabelled.pkl"
    path.write_bytes(pickle.dumps(datasets.Dataset.from_dict({"text": ["first", "second", "third"]})))
    table = read_table(path, require_labels=False, allow_pickle=True)
    assert table.texts == ["first", "second", "third"]
    assert table.labels is None and table.ids is None


def test_pickled_dataset_with_class_label(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict(
        {"text": ["a", "b", "c"], "label": [0, 3, 2]},
        features=datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(NAMES))}
        ),
    ).select([2, 0])  # an indices mapping must be honoured
    path = tmp_path / "ds.pickle"
    path.write_bytes(pickle.dumps(ds))
    table = read_table(path, allow_pickle=True)
    assert table.texts == ["c", "a"]
    assert table.labels is not None and table.labels.tolist() == [2, 0]
    assert table.label_names == NAMES


def test_pickled_dataframe_with_missing_values(tmp_path: Path) -> None:
    path = tmp_path / "df.pkl"
    frame = pd.DataFrame({"ID": [10, 11], "text": ["u", "v"], "label": pd.array([1, None], dtype="Int64")})
    frame.to_pickle(path)
    table = read_table(path, allow_pickle=True, require_labels=False, label_column="nope")
    assert table.texts == ["u", "v"] and table.ids == ["10", "11"] and table.labels is None
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(path, allow_pickle=True)
    assert "no label" in error(excinfo) and "rows 2" in error(excinfo)


def test_save_to_disk_dataset_folder(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": ["s", "t"], "label": [0, 1]}).save_to_disk(str(tmp_path / "saved"))
    table = read_table(tmp_path / "saved")
    assert table.texts == ["s", "t"]
    assert table.labels is not None and table.labels.tolist() == [0, 1]


def test_save_to_disk_dataset_dict_folder_asks_for_one_split(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["s"], "label": [0]})
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(tmp_path / "saved")
    assert "several splits (train, test)" in error(excinfo)
    assert read_table(tmp_path / "saved" / "test").texts == ["s"]


CLASSIC = (
    '"3","Wall St. Bears","Reuters - Short-sellers, Wall Street\'s dwindling\\band of ""ultra-cynics""."\n'
    '"1","Title","Line one.\\nLine two \\n more"\n'
    '"4","Net","social\\network and \\\\ more"\n'
)


def test_classic_agnews_csv_with_classes_txt(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", CLASSIC)
    write(tmp_path / "classes.txt", "World\nSports\nBusiness\nSci/Tech\n")
    table = read_table(path)
    assert table.texts == [
        'Wall St. Bears Reuters - Short-sellers, Wall Street\'s dwindling band of "ultra-cynics".',
        "Title Line one. Line two more",
        "Net social network and more",
    ]
    assert table.labels is not None and table.labels.tolist() == [2, 0, 3]
    assert table.label_names == NAMES
    assert classic_agnews_label_names(tmp_path) == NAMES
    assert classic_agnews_label_names(path) == NAMES


def test_classic_agnews_csv_without_classes_txt(tmp_path: Path) -> None:
    table = read_table(write(tmp_path / "test.csv", CLASSIC))
    assert table.label_names is None
    assert table.labels is not None and table.labels.tolist() == [2, 0, 3]
    assert classic_agnews_label_names(tmp_path) is None


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("a\\nb", "T a nb"),  # a backslash is a break; "\n" before a lower-case letter starts a word with n
        ("end.\\nNext", "T end. Next"),  # "\n" escape as the readme describes it
        ("x \\n\\n y", "T x y"),  # breaks and the spaces around them collapse to one space
        ("trailing\\n", "T trailing"),
        ("keep  two spaces", "T keep  two spaces"),  # spacing elsewhere is left as it is
    ],
)
def test_classic_line_breaks(tmp_path: Path, field: str, text: str) -> None:
    path = write(tmp_path / "c.csv", f'"2","T","{field}"\n')
    assert read_table(path).texts == [text]


def test_utf8_bom_and_one_megabyte_text(tmp_path: Path) -> None:
    long_text = "word " * 200_000 + "end"
    path = tmp_path / "big.csv"
    path.write_bytes(b"\xef\xbb\xbf" + f'text,label\n"{long_text}",0\nshort,1\n'.encode())
    table = read_table(path)
    assert table.texts == [long_text, "short"]
    assert len(table.texts[0]) > 1_000_000


def test_unlabelled_input_reads_labels_only_when_present(tmp_path: Path) -> None:
    unlabelled = read_table(write(tmp_path / "u.csv", "text\nfoo\nbar\n"), require_labels=False)
    assert unlabelled.texts == ["foo", "bar"] and unlabelled.labels is None
    labelled = read_table(write(tmp_path / "l.csv", "text,label\nfoo,1\n"), require_labels=False)
    assert labelled.labels is not None and labelled.labels.tolist() == [1]


def test_drop_empty_drops_blank_texts(tmp_path: Path) -> None:
    path = write(tmp_path / "e.csv", 'text,label\nok,0\n"   ",1\n,2\nfine,3\n')
    table = read_table(path, drop_empty=True)
    assert table.texts == ["ok", "fine"]
    assert table.labels is not None and table.labels.tolist() == [0, 3]


def test_text_table_select_and_checks() -> None:
    table = TextTable(
        ["a", "b", "c"], np.array([0, 1, 2], dtype=np.int32), ["x", "y", "z"], ("p", "q", "r"), "mem"
    )
    assert table.labels is not None and table.labels.dtype == np.int64
    picked = table.select([2, 0])
    assert picked.texts == ["c", "a"] and picked.ids == ["z", "x"] and picked.label_names == ("p", "q", "r")
    assert picked.labels is not None and picked.labels.tolist() == [2, 0]
    assert len(table.select(np.array([], dtype=int))) == 0
    with pytest.raises(ValueError):
        TextTable(["a"], np.array([0, 1]), None, None, "mem")


# --- the real AG News sample ----------------------------------------------------------


@requires_sample
def test_real_agnews_sample() -> None:
    table = read_table(AG_NEWS / "sample.csv")
    assert len(table) == 5600
    assert table.labels is not None
    assert np.bincount(table.labels).tolist() == [1400, 1400, 1400, 1400]
    assert table.label_names == NAMES
    assert table.texts[0] == (
        "Fears for T N pension after talks Unions representing workers at Turner   Newall say they are"
        " 'disappointed' after talks with stricken parent firm Federal Mogul."
    )
    assert table.labels[0] == 2  # "3" = Business
    assert table.texts[1].startswith(
        "The Race is On: Second Private Team Sets Launch Date for Human Spaceflight (SPACE.com) SPACE.com -"
        " TORONTO, Canada -- A second team of rocketeers"
    )
    assert not any("\\" in text for text in table.texts)
    assert sum("social network" in text for text in table.texts) >= 1


@requires_sample
def test_real_agnews_splits_are_stratified() -> None:
    cfg = DataConfig(source=str(AG_NEWS / "sample.csv"), validation_size=0.05, test_size=0.1)
    splits = load_splits(cfg)
    assert (len(splits.train), len(splits.validation), len(splits.test or [])) == (4760, 280, 560)
    assert splits.label_names == NAMES
    assert splits.test is not None and splits.test.labels is not None
    assert splits.validation.labels is not None and splits.train.labels is not None
    assert np.bincount(splits.validation.labels).tolist() == [70] * 4
    assert np.bincount(splits.test.labels).tolist() == [140] * 4
    assert np.bincount(splits.train.labels).tolist() == [1190] * 4
    assert splits.dropped == {}


# --- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.csv", "", ["empty.csv is empty"]),
        ("blank.jsonl", "  \n\n", ["blank.jsonl is empty"]),
        ("header.csv", "text,label\n", ["header.csv has no data rows"]),
        ("list.json", "[]", ["list.json has no data rows"]),
        (
            "cols.csv",
            "body,label\nx,1\n",
            ["cols.csv", "no column 'text'", "data.text_column", "'body', 'label'"],
        ),
        (
            "nolab.csv",
            "text,y\nx,1\n",
            ["nolab.csv", "no column 'label'", "data.label_column", "'text', 'y'"],
        ),
        ("neg.csv", "text,label\na,0\nb,-1\n", ["neg.csv", "out of range in rows 2 (-1)"]),
        ("float.csv", "text,label\na,0\nb,1.5\nc,2\n", ["float.csv", "non-integer values in rows 2 (1.5)"]),
        (
            "mixed.jsonl",
            '{"text":"a","label":1}\n{"text":"b","label":"World"}\n',
            ["mixed.jsonl", "mixes", "rows 1", "rows 2"],
        ),
        ("missing.csv", "text,label\na,1\nb,\nc,\n", ["missing.csv", "2 row(s) have no label: rows 2, 3"]),
        (
            "bool.jsonl",
            '{"text":"a","label":true}\n',
            ["bool.jsonl", "integers or class names", "rows 1 (True)"],
        ),
        ("nottext.jsonl", '{"text":5,"label":1}\n', ["nottext.jsonl", "must hold text", "row 1 holds int"]),
        (
            "ragged.csv",
            "text,label\na,1\nb,2,3\n",
            ["ragged.csv", "row 2 (line 3) has 3 fields", "header has 2"],
        ),
        ("bad.jsonl", '{"text":"a","label":1}\n{"text": oops}\n', ["bad.jsonl", "line 2 is not valid JSON"]),
        ("scalars.json", "[1, 2]", ["scalars.json", "item 1 is a int"]),
        ("object.json", '{\n"text": ["a"]\n}\n', ["object.json", "line 1 is not valid JSON"]),
        ("data.xlsx", "x", ["data.xlsx", "unknown extension '.xlsx'", ".csv, .tsv, .jsonl, .json, .parquet"]),
        ("classic.csv", '"1","a","b"\n"x","c","d"\n', ["classic.csv", "row 2", "not a class index"]),
        ("classic0.csv", '"1","a","b"\n"0","c","d"\n', ["classic0.csv", "row 2", "counts from 1"]),
    ],
)
def test_file_errors(tmp_path: Path, name: str, content: str, expected: list[str]) -> None:
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(write(tmp_path / name, content))
    for part in expected:
        assert part in error(excinfo)


def test_labels_out_of_range_name_rows_and_range(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "text,label\na,0\nb,4\nc,9\n")
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(path, label_names=NAMES)
    assert "r.csv" in error(excinfo) and "rows 2 (4), 3 (9)" in error(excinfo)
    assert "allowed: 0..3 (World, Sports, Business, Sci/Tech)" in error(excinfo)


def test_classic_class_index_beyond_classes_txt(tmp_path: Path) -> None:
    write(tmp_path / "classes.txt", "\n".join(NAMES))
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(write(tmp_path / "train.csv", '"1","a","b"\n"5","c","d"\n'))
    assert "rows 2 (5)" in error(excinfo) and "class indices 1..4" in error(excinfo)


def test_unknown_label_names(tmp_path: Path) -> None:
    path = write(tmp_path / "n.csv", "text,label\na,World\nb,Politics\n")
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(path, label_names=NAMES)
    assert "unknown label names in rows 2 ('Politics')" in error(excinfo)
    assert "known: World, Sports, Business, Sci/Tech" in error(excinfo)


def test_many_empty_texts_are_counted_and_listed(tmp_path: Path) -> None:
    rows = "\n".join(f'"{"  " if i % 2 else "text"}",0' for i in range(20))
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(write(tmp_path / "e.csv", "text,label\n" + rows + "\n"))
    message = error(excinfo)
    assert "e.csv: 10 row(s) with empty or whitespace-only text" in message
    assert "rows 2, 4, 6, 8, 10, ... (10 in all)" in message
    assert "`data.drop_empty`" in message


def test_all_empty_with_drop_empty(tmp_path: Path) -> None:
    with pytest.raises(BudgetloraError, match="every row has empty text"):
        read_table(write(tmp_path / "e.csv", 'text,label\n" ",0\n'), drop_empty=True)


def test_no_rows_to_predict(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", "text\n")
    with pytest.raises(BudgetloraError, match=r"no rows to predict in .*p\.csv"):
        read_table(path, require_labels=False)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(BudgetloraError, match=r"file not found: .*nope\.csv"):
        read_table(tmp_path / "nope.csv")
    write(tmp_path / "folder" / "notes.md", "hi")
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(tmp_path / "folder")
    assert "is a folder" in error(excinfo) and "notes.md" in error(excinfo)
    with pytest.raises(BudgetloraError) as excinfo:
        load_splits(DataConfig(source=str(tmp_path / "folder")))
    assert (
        "has nothing to read" in error(excinfo)
        and "train.csv" in error(excinfo)
        and "notes.md" in error(excinfo)
    )


def test_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nok,0\ncaf\xe9 au lait,1\n".encode("latin-1"))
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(path)
    assert "latin1.csv is not UTF-8 text: invalid byte 0xe9 at line 3, column 4" in error(excinfo)


def test_not_utf8_after_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\nab\xff,1\n")
    with pytest.raises(BudgetloraError, match=r"invalid byte 0xff at line 2, column 3 \(byte 16\)"):
        read_table(path)


def test_empty_label_column_in_prediction_input_means_no_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "template.csv", "ID,text,label\n1,a,\n2,b,\n")
    table = read_table(path, require_labels=False)
    assert table.labels is None and table.texts == ["a", "b"] and table.ids == ["1", "2"]
    with pytest.raises(BudgetloraError, match=r"2 row\(s\) have no label"):
        read_table(path)


def test_csv_bytes_in_a_parquet_file(tmp_path: Path) -> None:
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(write(tmp_path / "fake.parquet", "text,label\na,1\n"))
    assert "fake.parquet is not a readable Parquet file" in error(excinfo)


def test_garbage_bytes_in_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_bytes(b"PK\x03\x04 not json at all")
    with pytest.raises(BudgetloraError, match=r"g\.jsonl: line 1 is not valid JSON"):
        read_table(path)


def test_pickle_needs_allow_pickle(tmp_path: Path) -> None:
    path = tmp_path / "x.pkl"
    pd.DataFrame({"text": ["a"]}).to_pickle(path)
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(path, require_labels=False)
    assert (
        "x.pkl" in error(excinfo)
        and "runs code" in error(excinfo)
        and "`data.allow_pickle`" in error(excinfo)
    )


def test_pickle_of_something_else(tmp_path: Path) -> None:
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps({"text": ["a"]}))
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(path, allow_pickle=True)
    assert "d.pkl holds a builtins.dict" in error(
        excinfo
    ) and "datasets.Dataset or a pandas DataFrame" in error(excinfo)
    broken = tmp_path / "broken.pkl"
    broken.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(BudgetloraError, match=r"cannot unpickle .*broken\.pkl"):
        read_table(broken, allow_pickle=True)


def test_pickled_dataframe_without_the_text_column(tmp_path: Path) -> None:
    path = tmp_path / "f.pkl"
    pd.DataFrame({"sentence": ["a"]}).to_pickle(path)
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(path, allow_pickle=True, require_labels=False)
    assert "f.pkl has no column 'text' (set data.text_column); its columns: 'sentence'" in error(excinfo)


# --- splits -------------------------------------------------------------------------


def test_validation_is_a_stratified_hold_out(tmp_path: Path) -> None:
    labels = [0] * 60 + [1] * 30 + [2] * 10
    cfg = DataConfig(source=str(labelled_csv(tmp_path / "t.csv", labels)), validation_size=0.2)
    splits = load_splits(cfg)
    assert isinstance(splits, Splits)
    assert (len(splits.train), len(splits.validation)) == (80, 20)
    assert splits.test is None
    assert splits.validation.labels is not None and splits.train.labels is not None
    assert np.bincount(splits.validation.labels).tolist() == [12, 6, 2]
    assert np.bincount(splits.train.labels).tolist() == [48, 24, 8]
    assert splits.label_names == ("label_0", "label_1", "label_2")
    assert splits.train.label_names == splits.label_names == splits.validation.label_names
    ids = (splits.train.ids or []) + (splits.validation.ids or [])
    assert sorted(ids, key=int) == [str(i) for i in range(100)]  # a partition of the rows
    assert splits.validation.ids == sorted(splits.validation.ids or [], key=int)  # file order kept


def test_sizes_as_counts_and_test_hold_out(tmp_path: Path) -> None:
    cfg = DataConfig(
        source=str(labelled_csv(tmp_path / "t.csv", balanced(50))), validation_size=20, test_size=0.2
    )
    splits = load_splits(cfg)
    assert splits.test is not None and splits.test.labels is not None
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (140, 20, 40)
    assert np.bincount(splits.test.labels).tolist() == [10] * 4
    assert not set(splits.test.ids or []) & set(splits.validation.ids or [])
    assert not set(splits.test.ids or []) & set(splits.train.ids or [])


def test_same_config_same_splits_and_seed_matters(tmp_path: Path) -> None:
    cfg = DataConfig(
        source=str(labelled_csv(tmp_path / "t.csv", balanced(40))),
        test_size=0.1,
        max_train_samples=50,
        max_eval_samples=8,
    )
    first, again = load_splits(cfg), load_splits(cfg)
    for a, b in [(first.train, again.train), (first.validation, again.validation), (first.test, again.test)]:
        assert a is not None and b is not None
        assert a.ids == b.ids and a.texts == b.texts
        assert a.labels is not None and b.labels is not None and np.array_equal(a.labels, b.labels)
    other = load_splits(replace(cfg, split_seed=7))
    assert other.validation.ids != first.validation.ids


def test_small_hold_outs_fall_back_to_an_unstratified_split(tmp_path: Path) -> None:
    labels = [0] * 20 + [1] * 2  # one validation row for two classes: sklearn cannot stratify
    splits = load_splits(DataConfig(source=str(labelled_csv(tmp_path / "t.csv", labels)), validation_size=1))
    assert (len(splits.train), len(splits.validation)) == (21, 1)
    assert splits.label_names == ("label_0", "label_1")
    assert splits.train.labels is not None and set(splits.train.labels.tolist()) == {0, 1}
    again = load_splits(DataConfig(source=str(tmp_path / "t.csv"), validation_size=1))
    assert again.validation.ids == splits.validation.ids


def test_word_filters_apply_to_training_rows_only(tmp_path: Path) -> None:
    texts = (
        ["short one"] * 4  # 2 words
        + ["this text is long enough to keep here"] * 8  # 8 words
        + ["one two three four five six seven eight nine ten eleven twelve"] * 4  # 12 words
        + ["spam spam spam spam spam spam"] * 4  # 6 words, unique ratio 1/6
    )
    lines = ["text,label"] + [f"{t},{i % 2}" for i, t in enumerate(texts)]
    train = write(tmp_path / "d" / "train.csv", "\n".join(lines) + "\n")
    write(tmp_path / "d" / "validation.csv", "text,label\nhi,0\nhey,1\n")
    cfg = DataConfig(source=str(train.parent), min_words=3, max_words=10, min_unique_ratio=0.5)
    splits = load_splits(cfg)
    assert splits.dropped == {"min_words": 4, "max_words": 4, "min_unique_ratio": 4}
    assert splits.train.texts == ["this text is long enough to keep here"] * 8
    assert splits.validation.texts == ["hi", "hey"]  # the source's own validation split, unfiltered
    with pytest.raises(BudgetloraError, match=r"removed all 20 training rows .*data.min_words=50"):
        load_splits(replace(cfg, min_words=50, max_words=None))


def test_caps_are_stratified_samples(tmp_path: Path) -> None:
    cfg = DataConfig(
        source=str(labelled_csv(tmp_path / "t.csv", balanced(100))),
        validation_size=0.2,
        test_size=0.2,
        max_train_samples=40,
        max_eval_samples=12,
    )
    splits = load_splits(cfg)
    assert splits.test is not None and splits.test.labels is not None
    assert splits.train.labels is not None and splits.validation.labels is not None
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (40, 12, 12)
    assert np.bincount(splits.train.labels).tolist() == [10] * 4
    assert np.bincount(splits.validation.labels).tolist() == [3] * 4
    assert np.bincount(splits.test.labels).tolist() == [3] * 4


def test_classic_folder_uses_its_test_file_and_classes(tmp_path: Path) -> None:
    rows = "".join(f'"{i % 4 + 1}","title {i}","body {i}"\n' for i in range(40))
    write(tmp_path / "ag" / "train.csv", rows)
    write(tmp_path / "ag" / "test.csv", '"2","t","u"\n"4","v","w"\n')
    write(tmp_path / "ag" / "classes.txt", "\n".join(NAMES) + "\n")
    splits = load_splits(DataConfig(source=str(tmp_path / "ag"), validation_size=0.1, test_size=0.5))
    assert splits.label_names == NAMES
    assert splits.test is not None and splits.test.texts == ["t u", "v w"]  # test_size ignored: it has one
    assert splits.test.labels is not None and splits.test.labels.tolist() == [1, 3]
    assert (len(splits.train), len(splits.validation)) == (36, 4)


def test_save_to_disk_splits_and_class_labels(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b"])}
    )
    train = datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}, features=features
    )
    test = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [1, 0]}, features=features)
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "saved"))
    splits = load_splits(DataConfig(source=str(tmp_path / "saved"), validation_size=4))
    assert splits.label_names == ("a", "b")
    assert splits.test is not None and splits.test.texts == ["x", "y"]
    assert (len(splits.train), len(splits.validation)) == (16, 4)


def test_string_labels_take_their_names_from_the_training_rows(tmp_path: Path) -> None:
    write(
        tmp_path / "d" / "train.jsonl",
        "".join(f'{{"text": "t{i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(10)),
    )
    write(tmp_path / "d" / "test.jsonl", '{"text": "x", "label": "b"}\n{"text": " ", "label": "a"}\n')
    splits = load_splits(DataConfig(source=str(tmp_path / "d"), validation_size=2, drop_empty=True))
    assert splits.label_names == ("a", "b")
    assert splits.test is not None and splits.test.labels is not None and splits.test.labels.tolist() == [1]
    assert splits.dropped == {"empty_text": 1}
    # a class only the test file has is one the run would never train on
    write(tmp_path / "d" / "test.jsonl", '{"text": "x", "label": "b"}\n{"text": "y", "label": "c"}\n')
    with pytest.raises(BudgetloraError) as excinfo:
        load_splits(DataConfig(source=str(tmp_path / "d"), validation_size=2))
    assert "test.jsonl" in error(excinfo) and "unknown label names in rows 2 ('c'); known: a, b" in error(
        excinfo
    )


def test_label_names_from_config_are_checked_in_every_split(tmp_path: Path) -> None:
    write(tmp_path / "d" / "train.csv", "text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(10)))
    write(tmp_path / "d" / "test.csv", "text,label\nx,0\ny,2\n")
    cfg = DataConfig(source=str(tmp_path / "d"), validation_size=2, label_names=("neg", "pos"))
    with pytest.raises(BudgetloraError) as excinfo:
        load_splits(cfg)
    assert (
        "test.csv" in error(excinfo) and "rows 2 (2)" in error(excinfo) and "allowed: 0..1" in error(excinfo)
    )


def test_hold_out_too_large(tmp_path: Path) -> None:
    cfg = DataConfig(source=str(labelled_csv(tmp_path / "t.csv", balanced(2))), validation_size=8)
    with pytest.raises(BudgetloraError) as excinfo:
        load_splits(cfg)
    assert "data.validation_size=8 holds out 8 of the 8 training rows" in error(excinfo)


# --- label sets, sizes, repeated columns and IDs: the rules of the README's "Bad input" --------


def refused(cfg: DataConfig, *fragments: str, training: bool = True) -> str:
    with pytest.raises(BudgetloraError) as excinfo:
        load_splits(cfg, training=training)
    for fragment in fragments:
        assert fragment in error(excinfo), (fragment, error(excinfo))
    return error(excinfo)


def test_one_class_is_refused(tmp_path: Path) -> None:
    path = labelled_csv(tmp_path / "one.csv", [2] * 6)
    refused(
        DataConfig(source=str(path)), "one.csv: all 6 training rows have the label 2", "at least two classes"
    )
    names = write(tmp_path / "names.csv", "text,label\n" + "a,pos\n" * 6)
    refused(DataConfig(source=str(names)), "all 6 training rows have the label 0 (pos)")


def test_integer_labels_with_gaps_are_refused(tmp_path: Path) -> None:
    path = labelled_csv(tmp_path / "gaps.csv", [0, 1, 2, 3, 9] * 3)
    refused(
        DataConfig(source=str(path)),
        "gaps.csv: no training rows of class(es) 4, 5, 6, 7, 8 of the integer labels 0..9",
        "rows above the first missing class: 5 (9), 10 (9), 15 (9)",
        "renumber the labels 0..4",
    )
    two = labelled_csv(tmp_path / "two.csv", [1, 7])
    refused(DataConfig(source=str(two)), "class(es) 0, 2, 3, 4, 5, 6 of", "1 (1), 2 (7)")


def test_label_names_without_training_rows_are_refused(tmp_path: Path) -> None:
    path = labelled_csv(tmp_path / "t.csv", balanced(3, k=3))
    refused(
        DataConfig(source=str(path), label_names=NAMES),
        "t.csv: no training rows of class(es) 3 (Sci/Tech) of the 4 label names",
    )
    write(tmp_path / "ag" / "classes.txt", "\n".join(NAMES) + "\n")
    write(tmp_path / "ag" / "train.csv", "".join(f'"{i % 3 + 1}","t {i}","d"\n' for i in range(12)))
    refused(DataConfig(source=str(tmp_path / "ag")), "class(es) 4 (Sci/Tech)")  # numbered as in the file


def test_class_names_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "case.csv", "text,label\na,Sports\nb,World\nc,sports\nd,Sports\ne,world\n")
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(path)
    assert "case.csv: column 'label': class names that differ only in case:" in error(excinfo)
    assert "'Sports' (rows 1, 4), 'sports' (rows 3); 'World' (rows 2), 'world' (rows 5)" in error(excinfo)
    named = read_table(path, label_names=("Sports", "World", "sports", "world"))  # named apart on purpose
    assert named.labels is not None and named.labels.tolist() == [0, 1, 2, 0, 3]


def test_class_names_that_disagree_are_refused(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    rows = {"text": [f"t{i}" for i in range(8)], "label": [i % 2 for i in range(8)]}
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    refused(
        DataConfig(source=str(path), label_names=("pos", "neg")),
        "the class names differ",
        "train.parquet: neg, pos",
        "data.label_names: pos, neg",
    )
    # the names a run trained on bare integers records stand for as many classes, whatever their names
    made_up = load_splits(DataConfig(source=str(path), label_names=("label_0", "label_1")))
    assert made_up.label_names == ("neg", "pos")
    refused(
        DataConfig(source=str(path), label_names=("label_0", "label_1", "label_2")), "the class names differ"
    )


def test_validation_rows_of_classes_the_training_rows_lack_are_refused(tmp_path: Path) -> None:
    labelled_csv(tmp_path / "d" / "train.csv", balanced(4, k=2))
    labelled_csv(tmp_path / "d" / "validation.csv", [0, 1, 3])
    refused(
        DataConfig(source=str(tmp_path / "d")),
        "validation.csv: labels out of range in rows 3 (3)",
        "the training rows of",
        "have classes 0..1",
    )


def test_holding_out_needs_two_rows_of_every_class(tmp_path: Path) -> None:
    path = labelled_csv(tmp_path / "two.csv", [0, 1])  # once "trained" to validation accuracy 0.0
    refused(
        DataConfig(source=str(path)),
        "two.csv: class(es) 0, 1 have one row each (rows 1, 2)",
        "data.validation_size=0.05",
        "at least 2 rows of every class",
    )
    labelled_csv(tmp_path / "d" / "train.csv", [0, 1])  # with its own validation file it can train
    labelled_csv(tmp_path / "d" / "validation.csv", [1, 0])
    splits = load_splits(DataConfig(source=str(tmp_path / "d")))
    assert (len(splits.train), len(splits.validation)) == (2, 2)


def test_every_class_keeps_a_training_row(tmp_path: Path) -> None:
    path = labelled_csv(tmp_path / "t.csv", balanced(10))
    message = refused(
        DataConfig(source=str(path), validation_size=4, max_train_samples=2),
        "t.csv: no training rows left of class(es)",
        "every class needs at least one training row",
    )
    assert re.search(
        r"class \d: 10 row\(s\), 1 held out for validation/test, 9 left out by data.max_train_samples=2",
        message,
    )
    rows = ["text,label"] + [f"{'one' if i % 4 == 3 else 'three words here'},{i % 4}" for i in range(40)]
    filtered = write(tmp_path / "f.csv", "\n".join(rows) + "\n")
    refused(
        DataConfig(source=str(filtered), validation_size=4, min_words=2),
        "class 3: 10 row(s), 1 held out for validation/test, 9 removed by the word filters",
    )
    # 2 validation rows for 3 classes: not stratified, and with this seed both rows of class 2
    small = labelled_csv(tmp_path / "small.csv", [0, 0, 1, 1, 2, 2])
    refused(
        DataConfig(source=str(small), validation_size=2, split_seed=4),
        "small.csv: no training rows left of class(es) 2 (class 2: 2 row(s), 2 held out for validation/test)",
    )


@requires_sample
def test_real_agnews_sample_rules() -> None:
    cfg = DataConfig(source=str(AG_NEWS / "sample.csv"), max_train_samples=3)
    message = refused(cfg, "sample.csv: no training rows left of class(es) ")
    # classes as the file numbers them (1..4), named from classes.txt, with where their rows went
    assert re.search(
        r"class [1-4] \((World|Sports|Business|Sci/Tech)\): 1400 row\(s\), 70 held out for validation/test,"
        r" 1330 left out by data.max_train_samples=3",
        message,
    ), message
    refused(
        replace(cfg, max_train_samples=None, label_names=("a", "b", "c", "d")),
        "the class names differ",
        "sample.csv: World, Sports, Business, Sci/Tech; data.label_names: a, b, c, d",
    )


def test_evaluation_data_needs_no_training_rows(tmp_path: Path) -> None:
    path = labelled_csv(tmp_path / "eval.csv", [1] * 5)
    cfg = DataConfig(source=str(path), label_names=("a", "b"), validation_size=2)
    splits = load_splits(cfg, training=False)  # as `evaluate` reads a labelled file
    assert splits.label_names == ("a", "b") and len(splits.validation) == 2
    refused(cfg, "all 5 training rows have the label 1 (b)")
    unknown = write(tmp_path / "unknown.csv", "text,label\nx,a\ny,z\n")
    refused(
        replace(cfg, source=str(unknown)), "unknown label names in rows 2 ('z'); known: a, b", training=False
    )


def _repeated_text_column(tmp_path: Path, extension: str) -> Path:
    """A file whose columns are text, label, text (as a spreadsheet export can have)."""
    rows = [("first", 0, "other"), ("second", 1, "more")]
    path = tmp_path / f"dup{extension}"
    if extension in (".csv", ".tsv"):
        sep = "\t" if extension == ".tsv" else ","
        path.write_text("\n".join(sep.join(map(str, r)) for r in [("text", "label", "text"), *rows]) + "\n")
    elif extension == ".jsonl":
        path.write_text("".join(f'{{"text": "{a}", "label": {b}, "text": "{c}"}}\n' for a, b, c in rows))
    elif extension == ".json":
        path.write_text(
            "[" + ", ".join(f'{{"text": "{a}", "label": {b}, "text": "{c}"}}' for a, b, c in rows) + "]"
        )
    elif extension == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = [pa.array([r[j] for r in rows]) for j in range(3)]
        pq.write_table(pa.Table.from_arrays(columns, names=["text", "label", "text"]), path)
    else:
        frame = pd.DataFrame(rows, columns=["text", "label", "text"])
        frame.to_pickle(path)
    return path


@pytest.mark.parametrize(
    ("extension", "where"),
    [(".csv", "columns 1, 3"), (".tsv", "columns 1, 3"), (".jsonl", "JSON line 1"), (".json", "item 1"),
     (".parquet", "columns 1, 3"), (".pkl", "columns 1, 3")],
)  # fmt: skip
def test_repeated_names_of_read_columns_are_refused(tmp_path: Path, extension: str, where: str) -> None:
    path = _repeated_text_column(tmp_path, extension)
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(path, allow_pickle=True)
    assert f"dup{extension} has more than one column named 'text' ({where})" in error(excinfo)
    assert "data.text_column" in error(excinfo)


def test_a_repeated_column_that_is_not_read_is_kept_apart(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "text,label,note,note\na,0,x,y\nb,1,z,w\n")
    table = read_table(path)
    assert table.texts == ["a", "b"] and table.labels is not None and table.labels.tolist() == [0, 1]
    with pytest.raises(BudgetloraError, match=r"more than one column named 'note' \(columns 3, 4\)"):
        read_table(path, label_column="note")


def test_the_text_cannot_be_its_own_label(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "text,label\na,0\nb,1\n")
    with pytest.raises(BudgetloraError, match="data.text_column and data.label_column both name 'text'"):
        read_table(path, label_column="text")
    assert read_table(path, label_column="text", require_labels=False).labels is None


def test_submission_input_needs_each_id_once(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", "ID,text\n7,a\n8,b\n7,c\n9,d\n8,e\n7,f\n")
    assert read_table(path, require_labels=False).ids == ["7", "8", "7", "9", "8", "7"]  # training reads them
    with pytest.raises(BudgetloraError) as excinfo:
        read_table(path, require_labels=False, unique_ids=True)
    assert "p.csv: column 'ID' repeats IDs: '7' in rows 1, 3, 6; '8' in rows 2, 5" in error(excinfo)
    missing = write(tmp_path / "m.jsonl", '{"id": 1, "text": "a"}\n{"text": "b"}\n{"id": " ", "text": "c"}\n')
    with pytest.raises(BudgetloraError, match=r"m\.jsonl: column 'id': 2 row\(s\) have no ID: rows 2, 3"):
        read_table(missing, require_labels=False, unique_ids=True)
    both = write(tmp_path / "b.csv", "ID,id,text\n1,2,a\n")
    with pytest.raises(BudgetloraError, match=r"b\.csv has both an 'ID' and an 'id' column"):
        read_table(both, require_labels=False, unique_ids=True)


def test_offline_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(BudgetloraError) as excinfo:
        load_splits(DataConfig(source="nobody-xyz/no-such-dataset"))
    assert time.monotonic() - start < 5
    assert error(excinfo) == (
        "cannot load dataset 'nobody-xyz/no-such-dataset' from the Hugging Face Hub (offline or unreachable);"
        " download it where you have internet, or pass a local file or folder with `data.source`"
    )


@pytest.mark.parametrize(
    "source", ["data/missing.csv", "missing.parquet", "./runs/x", "a/b/c", "C:\\data\\x"]
)
def test_missing_paths_are_not_hub_ids(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BudgetloraError, match="^file not found: " + re.escape(source) + "$"):
        load_splits(DataConfig(source=source))


def test_offline_library_error_is_translated(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    # As when HF_HUB_OFFLINE was set before datasets was imported: load_dataset itself fails.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        BudgetloraError, match=r"cannot load dataset 'nobody-xyz/none' .*offline or unreachable"
    ):
        load_splits(DataConfig(source="nobody-xyz/none"))
