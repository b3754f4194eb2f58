"""Property tests: any bytes in a text data file give a table or a BudgetloraError, nothing else;
well-formed files round-trip exactly; splits of any labels partition the rows or say which rule
stops them; every command on any labelled file with any option values exits 0, or 2 with a
message and nothing written, never with a traceback."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from budgetlora.config import DataConfig
from budgetlora.data.tables import TextTable, load_splits, read_table
from budgetlora.errors import BudgetloraError
from commands import main_exit

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
            assert str(path) in message
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


# --- every command, any labelled file, odd option values: exit 0, or exit 2 and a message ---------

_TEXTS = st.sampled_from(
    ["market shares profit", "team coach goal", "chip data phone", "", "  ", "é ü", 'say "hi"', "a,b", "x\ny"]
)
_LABEL_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 3]),
    st.integers(-2, 12),
    st.sampled_from([1.0, 2.5, float("nan"), "World", "Sports", "a", "", " ", None, True, "1", "1e9", "x,y"]),
)
_EXTENSIONS = st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".parquet", ".csv-classic"])
# option -> values a user may type, sensible and not; any subset is given
_TRAIN_OPTIONS = {
    "--validation-size": ["0.25", "1", "2", "2.5", "0", "-1", "nan", "inf", "1e9"],
    "--test-size": ["0", "0.2", "2", "-0.1", "nan"],
    "--max-length": ["16", "7", "129", "130", "100000", "abc"],
    "--lr": ["1e-3", "0", "-1", "nan", "inf"],
    "--batch-size": ["4", "0", "-3", "2.5", "99999999999999999999"],
    "--epochs": ["1", "0", "inf", "1e-9", "nan"],
    "--seed": ["7", "-1", "4294967296"],
    "--max-train-samples": ["3", "1", "0", "-2"],
    "--min-words": ["1", "3", "-1"],
    "--min-unique-ratio": ["0.5", "1.5", "nan"],
    "--label-column": ["label", "text", "missing"],
    "--text-column": ["text", "label", "ID"],
    "--lora-r": ["auto", "2", "0", "x"],
    "--budget": ["1", "1000000", "0"],
    "--set": ["data.label_names=[a, b]", "data.label_names=[a]", "data.label_names=[a, a]",
              "data.label_names=[World, Sports, Business, Sci/Tech]", "data.label_names=[1, 2]",
              "data.label_names=5", "data.split_seed=-1", "train.lr=[", "data.drop_empty=true",
              "train.eval_batch_size=0", "model.lora.dropout=1", "model.config_overrides={vocab_size: 0}",
              "model.config_overrides={num_attention_heads: 3}", "model.config_overrides={hidden_size: x}"],
}  # fmt: skip


_GOOD_TEXTS = st.sampled_from(["market shares profit", "team coach goal", "chip data phone", "bank quarter"])


@st.composite
def _labelled_files(draw: st.DrawFn) -> tuple[str, list[str], list[list[object]]]:
    """(extension, column names, rows): text and label columns, sometimes an ID column, a repeated
    name. Half are well formed (8-16 rows of 2-4 balanced classes), so commands get past the data."""
    extension = draw(_EXTENSIONS)
    good = draw(st.booleans())
    if good:
        k, n = draw(st.integers(2, 4)), draw(st.integers(8, 16))
        rows = [[draw(_GOOD_TEXTS) + f" {i}", i % k, i, draw(_TEXTS)] for i in range(n)]
    else:
        drawn = st.lists(st.tuples(_TEXTS, _LABEL_VALUES, st.integers(0, 4), _TEXTS), max_size=12)
        rows = [list(row) for row in draw(drawn)]
    if extension == ".csv-classic":  # no header: class index from 1, title, description
        first = [int(r[1]) + 1 if good else draw(st.integers(0, 6)) for r in rows]
        return (
            extension,
            ["class", "title", "description"],
            [[c, r[0], r[3]] for c, r in zip(first, rows, strict=True)],
        )
    header = ["text", "label"]
    if draw(st.booleans()):
        header.append("ID")
    if not good and draw(st.integers(0, 3)) == 0:
        header.append(draw(st.sampled_from(["text", "label", "ID"])))
    return extension, header, [row[: len(header)] for row in rows]


def _write_file(folder: Path, extension: str, header: list[str], rows: list[list[object]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / f"data{extension.split('-')[0]}"
    if extension in (".csv", ".tsv", ".csv-classic"):
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="\t" if extension == ".tsv" else ",")
        if extension != ".csv-classic":
            writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
        path.write_text(buffer.getvalue(), encoding="utf-8")
    elif extension in (".jsonl", ".json"):  # written by hand: a repeated key stays repeated
        objects = [
            "{"
            + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in zip(header, row, strict=True))
            + "}"
            for row in rows
        ]
        path.write_text(
            "\n".join(objects) + "\n" if extension == ".jsonl" else "[" + ", ".join(objects) + "]"
        )
    else:
        arrays = []
        for j in range(len(header)):
            values = [row[j] for row in rows]
            try:
                arrays.append(pa.array(values))
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: as text, as a spreadsheet saves them
                arrays.append(pa.array([None if v is None else str(v) for v in values]))
        pq.write_table(pa.Table.from_arrays(arrays, names=header), path)
    return path


def _run(*args: str) -> tuple[int, str]:
    """The CLI's entry point in this process; any exception but a user error escapes and fails the test."""
    code, err = main_exit(*args)
    assert code in (0, 2), (code, err[-3000:])
    if code == 2:
        assert "error:" in err and "Traceback" not in err, err[-3000:]
    return code, err


@pytest.fixture(scope="module")
def fuzz_run(tiny_config, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """A finished run of the tiny model (2 steps: its accuracy does not matter here)."""
    from budgetlora.training.train import train

    out = tmp_path_factory.mktemp("fuzz") / "run"
    train(tiny_config(out, max_steps=2, eval_every=None))
    return out


@pytest.fixture(scope="module")
def weightless_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's config.json alone: a valid input stops where weights would load (fast)."""
    import shutil

    folder = tmp_path_factory.mktemp("weightless")
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    return folder


@settings(max_examples=45, deadline=None)
@given(
    command=st.sampled_from(["train", "distill", "sweep"]),
    file=_labelled_files(),
    options=st.dictionaries(st.sampled_from(sorted(_TRAIN_OPTIONS)), st.integers(0, 20), max_size=4),
    alpha=st.sampled_from(["0.5", "2", "nan"]),
)
def test_training_commands_on_any_file_and_options_exit_0_or_2(
    fuzz_run: Path,
    weightless_model: Path,
    command: str,
    file: tuple[str, list[str], list[list[object]]],
    options: dict[str, int],
    alpha: str,
) -> None:
    chosen = [a for o, i in options.items() for a in (o, _TRAIN_OPTIONS[o][i % len(_TRAIN_OPTIONS[o])])]
    with tempfile.TemporaryDirectory() as folder:
        data, out = _write_file(Path(folder), *file), Path(folder) / "out"
        common = [
            "--model",
            str(weightless_model),
            "--data",
            str(data),
            "--output",
            str(out),
            "--no-progress",
        ]
        if command == "train":
            code, _ = _run("train", *common, *chosen)
        elif command == "distill":
            code, _ = _run("distill", *common, *chosen, "--teacher", str(fuzz_run), "--alpha", alpha)
        else:
            space = Path(folder) / "space.yaml"
            space.write_text("lora.r: [1, 2]\n")
            sets = [a for o, a in zip(chosen[::2], chosen[1::2], strict=True) if o == "--set"]
            budget = (
                "budget=1" if "--budget" not in options else f"budget={chosen[chosen.index('--budget') + 1]}"
            )
            code, _ = _run(
                "sweep", "--space", str(space), "--output", str(out), "--trials", "1", "--no-progress",
                "--set", f"model.name_or_path={weightless_model}", "--set", f"data.source={data}",
                "--set", budget, *[a for s in sets for a in ("--set", s)],
            )  # fmt: skip
        event(f"{command}: exit {code}")  # --hypothesis-show-statistics: how often each way out
        if code == 2 and command != "sweep":  # a sweep's trials may fail after it started writing
            assert not out.exists()


@settings(max_examples=40, deadline=None)
@given(
    command=st.sampled_from(["evaluate", "predict", "classify"]),
    file=_labelled_files(),
    texts=st.lists(_TEXTS, min_size=0, max_size=3),
    split=st.one_of(st.just("validation"), st.sampled_from(["test", "train", "dev"])),
    batch_size=st.one_of(st.none(), st.sampled_from(["1", "0", "-1", "x"])),
    text_column=st.one_of(st.just("text"), st.sampled_from(["label", "ID", "nope"])),
)
def test_inference_commands_on_any_file_and_options_exit_0_or_2(
    fuzz_run: Path,
    command: str,
    file: tuple[str, list[str], list[list[object]]],
    texts: list[str],
    split: str,
    batch_size: str | None,
    text_column: str,
) -> None:
    extra = [] if batch_size is None else ["--batch-size", batch_size]
    with tempfile.TemporaryDirectory() as folder:
        data, out = _write_file(Path(folder), *file), Path(folder) / "out"
        if command == "evaluate":
            code, _ = _run(
                "evaluate", str(fuzz_run), "--data", str(data), "--split", split, "--output", str(out), *extra
            )
        elif command == "predict":
            out = out.with_suffix(".csv")
            code, _ = _run(
                "predict",
                str(fuzz_run),
                str(data),
                "--output",
                str(out),
                "--text-column",
                text_column,
                *extra,
            )
            if code == 0:
                ids = [row[0] for row in csv.reader(out.open())][1:]
                assert len(ids) == len(file[2]) and len(set(ids)) == len(ids)
        else:
            code, _ = _run("classify", str(fuzz_run), *texts, *extra)
        event(f"{command}: exit {code}")
        if code == 2:
            assert not out.exists()
