"""The command line, run as users run it: real files, exit codes and messages. A training run, its
predict/classify/evaluate and one case per class of bad input go through real processes
(``run_cli``, and the console script itself); the other cases call the same ``main`` in this process
(``cli``), which saves an interpreter start-up each."""

from __future__ import annotations

import csv
import json
import pickle
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest

from budgetlora.cli import flag_of
from budgetlora.config import RunConfig
from commands import cli, main_exit, run_cli

COMMANDS = [
    "train",
    "evaluate",
    "predict",
    "shift",
    "classify",
    "plan",
    "distill",
    "sweep",
    "export",
    "serve",
]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None) -> None:
    result = cli(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: budgetlora" in result.stdout
    if command == "train":
        assert "--lora-r" in result.stdout and "[model.lora.r]" in result.stdout and "99.3%" in result.stdout


@pytest.mark.parametrize(
    ("argv", "function"),
    [
        (["evaluate", "RUN"], "budgetlora.inference.predict:evaluate"),
        (["predict", "RUN", "INPUT"], "budgetlora.inference.predict:predict"),
        (["shift", "RUN", "DATA"], "budgetlora.inference.shift:shift"),
        (["classify", "RUN", "TEXT"], "budgetlora.inference.predict:classify"),
        (["export", "RUN", "OUT"], "budgetlora.inference.export:export"),
        (["serve", "PATH"], "budgetlora.inference.serve:serve"),
        (["serve", "PATH"], "budgetlora.inference.serve:Limits"),
        (["plan", "--model", "M", "--budget", "9"], "budgetlora.model.plan:plan"),
        (["plan", "--model", "M", "--budget", "9"], "budgetlora.model.plan:plan_methods"),
        (["sweep", "--space", "S", "--output", "O"], "budgetlora.training.sweep:sweep"),
        (["distill"], "budgetlora.api:distill"),
    ],
)
def test_an_option_left_out_takes_the_library_function_s_default(argv: list[str], function: str) -> None:
    """A command's options are its library function's parameters: each has help, and left out,
    it holds the default written in the function's signature."""
    import argparse
    import importlib
    import inspect

    from budgetlora.cli import build_parser

    module, _, name = function.partition(":")
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    parser = build_parser([argv[0]])
    given = vars(parser.parse_args(argv))
    defaults = {n: p.default for n, p in parameters.items() if p.default is not p.empty and n in given}
    assert defaults and {n: given[n] for n in defaults} == defaults
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert all(action.help for action in commands.choices[argv[0]]._actions)


def test_console_script_is_installed() -> None:
    result = subprocess.run(["budgetlora", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir: Path, tiny_data_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli(
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(tiny_data_csv),
        "--output",
        str(out),
        "--epochs",
        "4",
        "--lr",
        "1e-2",
        "--batch-size",
        "16",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--target-modules",
        "query,value",
        "--seed",
        "42",
        "--set",
        "data.validation_size=0.2",
        "--set",
        "data.test_size=0.2",
        "--max-length",
        "32",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "lora.query" in result.stdout and "test accuracy" in result.stdout
    return out


def test_train_then_predict_classify_evaluate(cli_run: Path, tmp_path: Path) -> None:
    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.9
    data = tmp_path / "new.jsonl"
    data.write_text(
        '{"id": "a7", "text": "market shares profit bank"}\n{"id": "b2", "text": "team coach goal match"}\n'
    )
    result = run_cli("predict", str(cli_run), str(data), "--output", str(tmp_path / "sub.csv"))
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader((tmp_path / "sub.csv").open()))
    assert rows[0] == ["ID", "Label"] and [r[0] for r in rows[1:]] == ["a7", "b2"]
    result = run_cli("classify", str(cli_run), "market shares profit bank", "--json")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["label_id"] == int(rows[1][1]) and abs(sum(row["probabilities"].values()) - 1) < 1e-5
    result = run_cli("evaluate", str(cli_run), "--split", "validation")
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((cli_run / "eval-validation" / "metrics.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(metrics["validation"]["accuracy"])


def test_predict_a_pickled_dataset_only_with_allow_pickle(cli_run: Path, tmp_path: Path) -> None:
    from datasets import Dataset

    path = tmp_path / "test_unlabelled.pkl"
    with path.open("wb") as fh:
        pickle.dump(
            Dataset.from_dict({"text": ["market shares profit", "team coach goal", "chip data phone"]}), fh
        )
    refused = cli("predict", str(cli_run), str(path), "--output", str(tmp_path / "s.csv"))
    assert refused.returncode == 2 and "--allow-pickle" in refused.stderr
    assert not (tmp_path / "s.csv").exists()
    result = cli("predict", str(cli_run), str(path), "--output", str(tmp_path / "s.csv"), "--allow-pickle")
    assert result.returncode == 0, result.stderr
    assert [r[0] for r in csv.reader((tmp_path / "s.csv").open())] == ["ID", "0", "1", "2"]


def _assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])


def test_errors_are_one_clear_message_and_exit_2(
    cli_run: Path, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    model, data = str(tiny_model_dir), str(tiny_data_csv)
    out = str(tmp_path / "out")
    _assert_user_error(
        cli("train", "--model", model, "--data", str(tmp_path / "nope.csv"), "--output", out), "nope.csv"
    )
    _assert_user_error(
        cli("train", "--model", str(tmp_path / "no-model"), "--data", data, "--output", out), "no-model"
    )
    _assert_user_error(
        cli("train", "--model", "no-such-org/no-such-model", "--data", data, "--output", out),
        "Hub",
        "--model",
    )
    # a checkpoint that needs its own code (auto_map): refused, not asked about on stdin
    custom = tmp_path / "custom-code"
    custom.mkdir()
    (custom / "config.json").write_text(
        json.dumps({"model_type": "gte-new", "auto_map": {"AutoConfig": "configuration.NewConfig"}})
    )
    _assert_user_error(
        run_cli("train", "--model", str(custom), "--data", data, "--output", out),
        f"{custom} needs its own Python code to load (an auto_map in its config.json)",
    )
    _assert_user_error(
        cli("plan", "--model", str(custom), "--budget", "1000000"), "needs its own Python code"
    )
    _assert_user_error(
        cli("train", "--model", model, "--data", data, "--output", out, "--text-column", "body"),
        "body",
        "data.text_column",
    )
    over = cli("train", "--model", model, "--data", data, "--output", out, "--budget", "1000")
    _assert_user_error(over, "over budget", "lora.query", "head", "would fit")
    _assert_user_error(cli("train", "--budget", "0", "--output", out), "budget")
    _assert_user_error(cli("train", "--lora-dropout", "-0.1", "--output", out), "lora.dropout")
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("train:\n  lr: -3\n")
    _assert_user_error(cli("train", "--config", str(bad_config)), "bad.yaml", "train.lr")
    unknown_key = tmp_path / "typo.yaml"
    unknown_key.write_text("train:\n  learning_rate: 0.1\n")
    _assert_user_error(cli("train", "--config", str(unknown_key)), "train.learning_rate")
    assert not Path(out).exists()  # nothing was started, nothing written

    empty = tmp_path / "empty.csv"
    empty.write_text("text\n")
    _assert_user_error(
        cli("predict", str(cli_run), str(empty), "--output", str(tmp_path / "s.csv")), "empty.csv"
    )
    _assert_user_error(cli("predict", str(tmp_path / "no-run"), str(empty)), "no-run")
    assert not (tmp_path / "s.csv").exists()


def test_adapter_on_another_architecture_is_refused(cli_run: Path, tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    bert = tmp_path / "tiny-bert"
    config = BertConfig(
        vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertForSequenceClassification(config).save_pretrained(bert)
    result = cli("classify", str(cli_run), "some text", "--model", str(bert))
    _assert_user_error(result, "does not fit the model", "--model")


def test_a_finished_run_is_kept(cli_run: Path, tiny_model_dir: Path, tiny_data_csv: Path) -> None:
    before = (cli_run / "adapter_model.safetensors").read_bytes()
    result = cli(
        "train", "--model", str(tiny_model_dir), "--data", str(tiny_data_csv), "--output", str(cli_run)
    )
    _assert_user_error(result, "already holds a finished run", "--overwrite")
    assert (cli_run / "adapter_model.safetensors").read_bytes() == before


# --- bad input: one message, exit code 2, before any work, nothing written ------------------


def _assert_refused(code_and_err: tuple[int, str], *fragments: str) -> None:
    code, err = code_and_err
    assert code == 2, (code, err[-2000:])
    assert "error:" in err and "Traceback" not in err, err[-2000:]
    for fragment in fragments:
        assert fragment in err, (fragment, err[-2000:])


@pytest.fixture(scope="module")
def config_only(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's config.json alone, without weights: a command that stops with the
    expected message on it did so before loading any."""
    import shutil

    folder = tmp_path_factory.mktemp("config-only")
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    return folder


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _labelled(path: Path, labels: list[object]) -> Path:
    return _csv(path, "text,label", [f"market team row {i},{y}" for i, y in enumerate(labels)])


def _with_validation(folder: Path, train: list[object], validation: list[object]) -> Path:
    _labelled(folder / "train.csv", train)
    _labelled(folder / "validation.csv", validation)
    return folder


BAD_TRAINING_DATA = {
    "one-class": (lambda d: _labelled(d / "one.csv", [0] * 8), ["one.csv", "at least two classes"]),
    "gaps": (
        lambda d: _labelled(d / "gaps.csv", [0, 1, 2, 3, 9] * 2),
        ["gaps.csv", "class(es) 4, 5, 6, 7, 8", "rows above the first missing class: 5 (9), 10 (9)"],
    ),
    "two-rows-1-7": (lambda d: _labelled(d / "two.csv", [1, 7]), ["two.csv", "0, 2, 3, 4, 5, 6", "2 (7)"]),
    "too-small": (
        lambda d: _labelled(d / "small.csv", [0, 1]),
        ["small.csv", "have one row each (rows 1, 2)", "at least 2 rows of every class"],
    ),
    "repeated-text-column": (
        lambda d: _csv(d / "dup.csv", "text,label,text", [f"a{i},{i % 2},b{i}" for i in range(8)]),
        ["dup.csv has more than one column named 'text' (columns 1, 3)", "data.text_column"],
    ),
    "unknown-validation-class": (
        lambda d: _with_validation(d / "src", [0, 1] * 4, [0, 2]),
        ["validation.csv: labels out of range in rows 2 (2)"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_TRAINING_DATA))
@pytest.mark.parametrize("command", ["train", "distill", "sweep"])
def test_bad_training_data_stops_before_any_work(
    case: str, command: str, config_only: Path, tmp_path: Path
) -> None:
    make, fragments = BAD_TRAINING_DATA[case]
    data, out = make(tmp_path), tmp_path / "out"
    options = ["--model", str(config_only), "--data", str(data), "--output", str(out)]
    if command == "train":
        result = main_exit("train", *options)
    elif command == "distill":  # the data is read before the teacher is even looked for
        result = main_exit("distill", *options, "--teacher", str(tmp_path / "no-teacher"))
    else:
        from budgetlora.config import ModelConfig, RunConfig, save_config

        base, space = tmp_path / "base.yaml", tmp_path / "space.yaml"
        save_config(RunConfig(model=ModelConfig(str(config_only))), base)
        space.write_text("lora.r: [1, 2]\n")
        data_option = f"data.source={data}"
        result = main_exit(
            "sweep", "--config", str(base), "--space", str(space), "--output", str(out), "--set", data_option
        )
    _assert_refused(result, *fragments)
    assert not out.exists()


def test_bad_input_exits_2_without_a_traceback(cli_run: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    """Bad data, size, model limit, options and duplicate IDs: one clear message, exit 2, nothing written.
    A real process for one training and one inference refusal (what a shell sees); the rest in-process."""
    model = str(tiny_model_dir)
    out = tmp_path / "out"
    gaps = _labelled(tmp_path / "gaps.csv", [0, 1, 2, 3, 9] * 2)
    _assert_user_error(
        run_cli("train", "--model", model, "--data", str(gaps), "--output", str(out)), "gaps.csv"
    )
    small = _labelled(tmp_path / "small.csv", [0, 1])
    _assert_user_error(
        cli("train", "--model", model, "--data", str(small), "--output", str(out)), "small.csv"
    )
    data = _labelled(tmp_path / "ok.csv", [0, 1, 2, 3] * 3)
    long = cli("train", "--model", model, "--data", str(data), "--output", str(out), "--max-length", "2048")
    _assert_user_error(long, "data.max_length=2048", "at most 129 tokens", "pad_token_id + 1 = 2")
    _assert_user_error(cli("train", "--data", str(data), "--output", str(out), "--lr", "nan"), "train.lr")
    assert not out.exists()
    ids = _csv(tmp_path / "ids.csv", "ID,text", ["1,market", "2,team", "1,chip"])
    submission = tmp_path / "sub.csv"
    result = run_cli("predict", str(cli_run), str(ids), "--output", str(submission))
    _assert_user_error(result, "ids.csv: column 'ID' repeats IDs: '1' in rows 1, 3")
    assert not submission.exists()


def test_max_length_is_checked_before_weights_load(
    cli_run: Path, config_only: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    train = ["--model", str(config_only), "--data", str(tiny_data_csv), "--output", str(out)]
    _assert_refused(
        main_exit("train", *train, "--max-length", "130"), "data.max_length=130", "at most 129 tokens"
    )
    _assert_refused(
        main_exit("distill", *train, "--max-length", "130", "--teacher", str(cli_run)), "at most 129 tokens"
    )
    # the limit itself is allowed: what stops it then is the missing weights, later
    code, err = main_exit("train", *train, "--max-length", "129")
    assert code == 2 and "cannot load model weights" in err and "max_length" not in err, err
    assert not out.exists()
    # a base model with fewer positions than the run's max length (32), given to predict
    short = tmp_path / "short"
    short.mkdir()
    config = json.loads((config_only / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 20}))
    texts = _csv(tmp_path / "in.csv", "text", ["market shares"])
    result = main_exit(
        "predict", str(cli_run), str(texts), "--model", str(short), "--output", str(tmp_path / "s.csv")
    )
    _assert_refused(result, "data.max_length=32", "at most 18 tokens")  # 20 - (pad_token_id 1 + 1)
    _assert_refused(main_exit("classify", str(cli_run), "market", "--model", str(short)), "at most 18 tokens")
    assert not (tmp_path / "s.csv").exists()


def test_a_teacher_with_fewer_positions_is_refused_before_it_loads(
    config_only: Path, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    config = json.loads((config_only / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 20}))
    out = tmp_path / "student"
    options = ["--model", str(tiny_model_dir), "--data", str(tiny_data_csv), "--output", str(out)]
    result = main_exit("distill", *options, "--max-length", "32", "--teacher", str(teacher))
    _assert_refused(result, "data.max_length=32", str(teacher), "at most 18 tokens")
    assert not out.exists()


def test_predict_refuses_repeated_or_missing_ids_and_keeps_the_old_submission(
    cli_run: Path, config_only: Path, tmp_path: Path
) -> None:
    submission = tmp_path / "submission.csv"
    submission.write_text("ID,Label\n0,1\n")
    before = submission.read_bytes()
    repeated = _csv(tmp_path / "r.csv", "ID,text", ["a,market", "b,team", "a,chip", "c,bank", "b,goal"])
    # --model without weights: the IDs are checked before any weights load
    predict = ["--output", str(submission), "--model", str(config_only)]
    _assert_refused(
        main_exit("predict", str(cli_run), str(repeated), *predict), "'a' in rows 1, 3; 'b' in rows 2, 5"
    )
    missing = _csv(tmp_path / "m.csv", "id,text", ["1,market", ",team"])
    _assert_refused(
        main_exit("predict", str(cli_run), str(missing), *predict), "m.csv: column 'id'", "rows 2"
    )
    dup_text = _csv(tmp_path / "d.csv", "ID,text,text", ["1,a,b"])
    _assert_refused(
        main_exit("predict", str(cli_run), str(dup_text), *predict), "more than one column named 'text'"
    )
    assert submission.read_bytes() == before
    assert not submission.with_suffix(".probs.csv").exists()


def test_evaluate_refuses_classes_the_run_does_not_know(
    cli_run: Path, config_only: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    ints = _labelled(tmp_path / "ints.csv", [0, 1, 2, 3, 4] * 4)
    evaluate = ["--split", "validation", "--output", str(out), "--model", str(config_only)]
    _assert_refused(
        main_exit("evaluate", str(cli_run), "--data", str(ints), *evaluate),
        "ints.csv: column 'label': labels out of range in rows 5 (4)",
        "allowed: 0..3 (label_0, label_1, label_2, label_3)",
    )
    names = _labelled(tmp_path / "names.csv", ["World", "Sports"] * 4)
    _assert_refused(
        main_exit("evaluate", str(cli_run), "--data", str(names), *evaluate), "unknown label names"
    )
    _assert_refused(
        main_exit("evaluate", str(cli_run), "--split", "dev", "--output", str(out)), "--split 'dev'"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["--lr", "nan"], ["train.lr: nan", "finite"]),
        (["--epochs", "inf"], ["train.epochs: inf"]),
        (["--lr", "0"], ["train.lr: 0.0"]),
        (["--batch-size", "0"], ["train.batch_size: 0"]),
        (["--batch-size", "2.5"], ["--batch-size", "invalid int value"]),  # argparse's own message
        (["--validation-size", "2.5"], ["data.validation_size: 2.5", "whole number of rows"]),
        (["--validation-size", "nan"], ["data.validation_size: nan"]),
        (["--test-size", "-0.1"], ["data.test_size: -0.1"]),
        (["--seed", "-1"], ["train.seed: -1"]),
        (["--set", "data.split_seed=4294967296"], ["data.split_seed: 4294967296"]),
        (["--set", "train.lr=["], ["--set 'train.lr=['", "not valid YAML"]),
        (["--set", "train.batch_size=2.5"], ["train.batch_size: 2.5", "an integer"]),
        (["--set", "data.label_names=[a]"], ["data.label_names", "at least two classes"]),
        (["--set", "data.label_names=['', b]"], ["data.label_names", "non-empty text"]),
        (["--set", "data.label_names=[a, a]"], ["data.label_names", "unique"]),
        (["--set", "data.drop_empty=2"], ["data.drop_empty: 2", "true or false"]),
        (["--set", "data.text_column=[a]"], ["data.text_column", "text"]),
        (["--label-column", "text"], ["data.text_column and data.label_column both name 'text'"]),
        (["--max-length", "7"], ["data.max_length: 7"]),
        (["--budget", "0"], ["budget: 0"]),
        (["--min-unique-ratio", "nan"], ["data.min_unique_ratio: nan"]),
        (["--lora-alpha", "inf"], ["lora.alpha: inf"]),
        (["--set", "model.config_overrides={hidden_size: abc}"], ["model.config_overrides", "hidden_size"]),
        (["--set", "model.config_overrides={num_attention_heads: 3}"], ["config_overrides", "multiple"]),
        (["--set", "model.config_overrides={vocab_size: 0}"], ["cannot build", "{'vocab_size': 0}"]),
    ],
)
def test_option_values_are_checked_where_the_config_is_built(
    options: list[str], fragments: list[str], config_only: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    common = ["--model", str(config_only), "--data", str(tiny_data_csv), "--output", str(out)]
    _assert_refused(main_exit("train", *common, *options), *fragments)
    assert not out.exists()


def test_inference_and_search_options_are_checked_first(
    cli_run: Path, config_only: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    texts = _csv(tmp_path / "in.csv", "text", ["market shares"])
    sub = tmp_path / "s.csv"
    model = ["--model", str(config_only)]  # no weights: each of these stops before loading any
    _assert_refused(
        main_exit("predict", str(cli_run), str(texts), "--batch-size", "0", "--output", str(sub), *model),
        "--batch-size: 0",
    )
    _assert_refused(
        main_exit("evaluate", str(cli_run), "--batch-size", "-1", "--output", str(sub), *model),
        "--batch-size: -1",
    )
    _assert_refused(main_exit("classify", str(cli_run), "market", "  ", *model), "TEXT 2 of 2 is empty")
    _assert_refused(
        main_exit("classify", str(cli_run), "market", "--batch-size", "0", *model), "--batch-size: 0"
    )
    assert not sub.exists()
    out = tmp_path / "out"
    student = ["--model", str(config_only), "--data", str(tiny_data_csv), "--output", str(out)]
    teacher = ["--teacher", str(cli_run)]
    _assert_refused(
        main_exit("distill", *student, *teacher, "--temperature", "nan"), "distill.temperature: nan"
    )
    _assert_refused(main_exit("distill", *student, *teacher, "--alpha", "2"), "distill.alpha: 2")
    _assert_refused(main_exit("distill", *student), "no teacher", "--teacher")
    _assert_refused(main_exit("distill", *student, "--teacher", ""), "distill.teacher: ''")
    resume_both = main_exit("distill", *student, *teacher, "--resume", "--compare-baseline")
    _assert_refused(resume_both, "--resume continues the student only")
    refused = main_exit("train", *student, "--set", f"distill.teacher={cli_run}")
    _assert_refused(refused, "distill.teacher is set", "budgetlora distill")
    base, space = tmp_path / "base.yaml", tmp_path / "space.yaml"
    from budgetlora.config import DataConfig, ModelConfig, RunConfig, save_config

    save_config(RunConfig(model=ModelConfig(str(config_only)), data=DataConfig(str(tiny_data_csv))), base)
    sweep = ["sweep", "--config", str(base), "--space", str(space), "--output", str(out)]
    for content, extra, fragment in [
        ("lora.r: [0, 4]\n", [], "search space model.lora.r: the value 0: invalid value for lora.r"),
        ("lr: {type: float, low: 0, high: 0.1, log: true}\n", [], "a log range needs low > 0"),
        ("lr: {type: float, low: -1, high: 0.1}\n", [], "search space train.lr: the value -1.0"),
        ("distill.alpha: [0.5, 1.5]\n", teacher, "search space distill.alpha: the value 1.5"),
        ("lora.r: [1]\n", ["--seed", "-1"], "--seed: -1"),
        ("lora.r: [1]\n", [*teacher, "--temperature", "0"], "distill.temperature: 0"),
    ]:
        space.write_text(content)
        _assert_refused(main_exit(*sweep, *extra), fragment)
    assert not out.exists()


def test_outputs_that_cannot_be_written_are_refused_first(
    cli_run: Path, config_only: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me\n")
    a_folder = tmp_path / "folder"
    a_folder.mkdir()
    texts = _csv(tmp_path / "in.csv", "text", ["market shares"])
    model = ["--model", str(config_only)]  # no weights: each stops before loading any
    _assert_refused(
        main_exit("predict", str(cli_run), str(texts), "--output", str(a_folder), *model),
        f"--output {a_folder} exists and is not a file",
    )
    _assert_refused(
        main_exit("predict", str(cli_run), str(texts), "--output", str(a_file / "s.csv"), *model),
        f"{a_file} is a file, so nothing can be written under it",
    )
    _assert_refused(
        main_exit("evaluate", str(cli_run), "--split", "validation", "--output", str(a_file), *model),
        f"--output {a_file} exists and is not a folder",
    )
    train = ["--model", str(config_only), "--data", str(tiny_data_csv)]
    _assert_refused(main_exit("train", *train, "--output", str(a_file / "run")), f"{a_file} is a file")
    space = tmp_path / "space.yaml"
    space.write_text("lora.r: [1]\n")
    sweep = ["sweep", "--space", str(space), "--set", f"model.name_or_path={config_only}"]
    sweep += ["--set", f"data.source={tiny_data_csv}"]
    _assert_refused(
        main_exit(*sweep, "--output", str(a_file)), f"--output {a_file} exists and is not a folder"
    )
    out = tmp_path / "sweep"
    _assert_refused(
        main_exit(*sweep, "--output", str(out), "--storage", "no-such-url"), "--storage 'no-such-url'"
    )
    assert not out.exists()
    assert a_file.read_text() == "keep me\n" and list(a_folder.iterdir()) == []


# --- flags from the config tree -----------------------------------------------------

# A value of each type that every field of that type accepts, unlike its default.
_SAMPLE = {int: ("16", 16), float: ("0.25", 0.25), str: ("x", "x")}


def _sample(key: str, annotation: Any, default: Any) -> tuple[list[str], Any]:
    """Flag arguments that set ``key`` to something other than its default, and that value."""
    from budgetlora.config import choices

    flag = flag_of(key)
    if annotation is bool:
        return [flag if not default else "--no-" + flag[2:]], not default
    if choices(annotation):
        other = next(c for c in choices(annotation) if c != default)
        return [flag, other], other
    text = str(annotation)
    if "auto" in text:  # a size knob: a number or 'auto'
        return ([flag, "16"], 16) if default == "auto" else ([flag, "auto"], "auto")
    if text.startswith("dict"):
        return [flag, '{"layer.1": 4}'], {"layer.1": 4}
    if text.startswith("tuple[int"):
        return [flag, "0,2"], [0, 2]
    if text.startswith("tuple[str"):
        return [flag, "query,key"], ["query", "key"]
    kind = next(k for k in (int, float, str) if annotation is k or k in typing.get_args(annotation))
    raw, value = _SAMPLE[kind]
    return [flag, raw], value


# Momentum is SGD's alone (the config refuses it with another optimizer).
_NEEDS = {
    "train.momentum": {"train.optimizer": "sgd"},
    "self_training.rounds": {"data.unlabelled": "texts.csv"},
    "distill.transfer": {"data.unlabelled": "texts.csv"},
}


def test_every_config_key_has_a_flag_that_sets_it() -> None:
    """Each leaf of the config tree, set through its own flag of `distill` (and of `train`, but for
    the distill.* keys), comes out in the resolved config."""
    from budgetlora.cli import build_parser, config_from_args
    from budgetlora.config import config_fields, config_to_dict

    parser = build_parser()
    defaults = config_to_dict(RunConfig())
    fields = config_fields()
    assert len(fields) > 60 and len({flag for flag in map(flag_of, (k for k, _ in fields))}) == len(fields)
    for key, annotation in fields:
        default = _get(defaults, key)
        argv, expected = _sample(key, annotation, default)
        needed = _NEEDS.get(key, {})  # a key that is refused without another one
        argv += [arg for other, value in needed.items() for arg in (flag_of(other), value)]
        cfg = config_to_dict(config_from_args(parser.parse_args(["distill", *argv])))
        assert _get(cfg, key) == expected != default, (key, argv)
        changed = {k for k, _ in fields if _get(cfg, k) != _get(defaults, k)}
        assert changed == {key, *needed}, (key, changed)  # that key (and what it needs) and no other
        if not key.startswith("distill."):  # train has every flag but the teacher's
            assert config_from_args(parser.parse_args(["train", *argv])) == config_from_args(
                parser.parse_args(["distill", *argv])
            )
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--teacher", "runs/teacher"])


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def test_a_flag_clears_what_a_config_file_set(tmp_path: Path) -> None:
    from budgetlora.cli import build_parser, config_from_args

    preset = Path(__file__).resolve().parents[1] / "configs" / "presets" / "starter.yaml"
    parser = build_parser()
    kept = config_from_args(parser.parse_args(["train", "--config", str(preset)]))
    cleared = config_from_args(parser.parse_args(["train", "--config", str(preset), "--max-steps", "none"]))
    assert kept.train.max_steps == 1200 and cleared.train.max_steps is None
    assert cleared.train.lr == kept.train.lr  # what no flag names stays as the file has it
    # Integers may be written as 1e3 (as YAML and --set take them), never as 2.5.
    assert config_from_args(parser.parse_args(["train", "--max-steps", "1e3"])).train.max_steps == 1000


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--layers", "0,x"], "argument --layers: expected int values like 0,1,5, got '0,x'"),
        (["--lora-r", "big"], "argument --lora-r: invalid int or 'auto' value: 'big'"),
        (
            ["--optimizer", "lion"],
            "argument --optimizer: invalid choice: 'lion' (choose from 'adamw', 'adam', 'sgd')",
        ),
        (["--lora-rank-pattern", "[1, 2]"], "argument --lora-rank-pattern: invalid YAML mapping value"),
    ],
)
def test_a_bad_flag_value_names_the_flag(argv: list[str], fragment: str) -> None:
    code, err = main_exit("train", "--print-config", *argv)
    assert code == 2 and fragment in err, err
