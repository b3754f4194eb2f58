"""Config checks report every problem at once: each field's value, each section, and the options that
contradict one another."""

from __future__ import annotations

from pathlib import Path

import pytest

from budgetlora.cli import build_parser, flag_of
from budgetlora.config import (
    ADAPTER_METHODS,
    METHODS,
    ConfigError,
    ModelConfig,
    TrainSettings,
    config_fields,
    config_from_dict,
    key_of,
    load_config,
    option_name,
)
from budgetlora.errors import BudgetloraError, name_options, option, setting
from commands import cli


def _problems(values: dict) -> tuple[str, ...]:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as caught:
        config_from_dict(values)
    return caught.value.problems


def test_a_file_with_problems_in_every_section_names_them_all(tmp_path: Path) -> None:
    config = tmp_path / "many.yaml"
    config.write_text(
        "model:\n  lora:\n    dropout: 1.5\n"
        "train:\n  lr: -1\n  learning_rate: 0.1\n"
        "data:\n  max_length: 4\n"
        "budget: 0\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert caught.value.problems == (
        "invalid value for lora.dropout: 1.5 (a probability in [0, 1))",
        "invalid value for data.max_length: 4 (an integer >= 8)",
        "unknown config key train.learning_rate; train takes: "
        + ", ".join(sorted(TrainSettings.__annotations__)),
        "invalid value for train.lr: -1.0 (must be > 0)",  # beside an unknown key, the known ones are checked
        "invalid value for budget: 0 (a positive integer number of parameters)",  # and beside failed sections
    )
    assert str(caught.value).startswith(
        f"{config}: 5 problems in the config:\n  - invalid value for lora.dropout"
    )


def test_one_problem_is_one_line_as_before() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"train": {"lr": "fast"}})
    assert str(caught.value) == "invalid value for train.lr: 'fast' (a number)"
    assert isinstance(caught.value, BudgetloraError)  # the CLI prints it and exits 2


def test_options_that_contradict_each_other_are_all_reported() -> None:
    problems = _problems({
        "train": {
            "warmup_steps": 100, "warmup_ratio": 0.1, "momentum": 0.9, "optimizer": "adamw",
            "early_stopping_patience": 2, "eval_every": 500, "max_steps": 200, "eval_each_epoch": False,
        }
    })  # fmt: skip
    assert problems == (
        "train.warmup_steps=100 and train.warmup_ratio=0.1 are both set (the steps would win): set one of them",
        "train.momentum=0.9 applies to train.optimizer=sgd only (it is adamw): drop it or choose sgd",
        "train.early_stopping_patience=2 needs evaluations, and none would run: train.eval_every=500 is past "
        "train.max_steps=200 and train.eval_each_epoch is off",
    )


@pytest.mark.parametrize(
    "train",
    [
        {"warmup_steps": 100},  # the ratio left at its default
        {"warmup_steps": 0, "warmup_ratio": 0.06},
        {"momentum": 0.9, "optimizer": "sgd"},
        {"early_stopping_patience": 2, "eval_every": 500, "max_steps": 200},  # evaluates at the epoch's end
        {"early_stopping_patience": 2, "eval_every": 100, "max_steps": 200, "eval_each_epoch": False},
        {"early_stopping_patience": 2, "eval_each_epoch": False},  # four evaluations an epoch
    ],
)
def test_options_that_agree_are_accepted(train: dict) -> None:  # type: ignore[type-arg]
    cfg = config_from_dict({"train": train})
    assert {key: getattr(cfg.train, key) for key in train} == train


def test_lora_only_options_under_another_method_are_all_named() -> None:
    problems = _problems({
        "model": {
            "method": "ia3", "lora": {"use_dora": True, "rank_pattern": {"query": 4}, "bias": "all"},
        }
    })  # fmt: skip
    assert problems == (
        "invalid value for lora.use_dora: True (LoRA only; model.method is ia3)",
        "invalid value for lora.rank_pattern: {'query': 4} (LoRA only; model.method is ia3)",
        "invalid value for lora.bias: 'all' (ia3 trains no biases: only none)",
    )


def test_the_cli_prints_every_problem_of_its_flags_and_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli(
        "train", "--output", str(out), "--lr", "nan", "--lora-dropout", "-0.1", "--momentum", "0.9",
        "--warmup-steps", "10", "--warmup-ratio", "0.2",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].endswith("error: 2 problems in the config:"), lines
    assert lines[1:] == [
        "  - invalid value for lora.dropout: -0.1 (a probability in [0, 1))",
        "  - invalid value for train.lr: nan (must be a finite number)",
    ]
    # once the values are sound, the contradictions between them are next, all at once
    fixed = cli(
        "train", "--output", str(out), "--momentum", "0.9", "--warmup-steps", "10", "--warmup-ratio", "0.2"
    )
    assert fixed.returncode == 2 and "error: 2 problems in the config:" in fixed.stderr
    assert "train.warmup_steps=10 and train.warmup_ratio=0.2" in fixed.stderr
    assert "train.momentum=0.9 applies to train.optimizer=sgd only" in fixed.stderr
    assert not out.exists()


def test_one_vocabulary_names_each_key() -> None:
    # A key, the key without its model., and its option name all mean the key (sweep spaces take each).
    assert {key_of(n) for n in ("model.lora.r", "lora.r", "lora_r")} == {"model.lora.r"}
    assert (key_of("lr"), key_of("head"), key_of("teacher"), key_of("vera.r")) == (
        "train.lr",
        "model.head",
        "distill.teacher",
        "model.vera.r",
    )
    assert key_of("learning_rate") is None and key_of("r") is None
    # every option name (a flag, a Python keyword) leads back to its own key
    assert all(key_of(option_name(key)) == key for key, _ in config_fields())


def test_messages_name_options_by_key_and_each_front_end_shows_its_own_name() -> None:
    text = f"use {setting('model.lora.r', 7)} with {setting('model.lora.target_modules', ('query', 'value'))}"
    text += f", or another {option('output')} (see `budgetlora plan`)"
    assert (
        text
        == "use `model.lora.r`=7 with `model.lora.target_modules`=query,value, or another `output` (see `budgetlora plan`)"
    )
    assert name_options(text, flag_of, assign=" ") == (
        "use --lora-r 7 with --target-modules query,value, or another --output (see `budgetlora plan`)"
    )
    assert name_options(text, option_name) == (
        "use lora_r=7 with target_modules=query,value, or another output (see `budgetlora plan`)"
    )


def test_each_adapter_method_is_one_record(capsys: pytest.CaptureFixture[str]) -> None:
    assert tuple(ADAPTER_METHODS) == METHODS
    for method in ADAPTER_METHODS.values():
        if method.size_knob is not None:  # the knob is a field of the method's own settings
            block, knob = method.size_knob.split(".")
            assert block == method.settings and hasattr(getattr(ModelConfig(), block), knob)
    # the CLI titles each method's options from its record
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    shown = capsys.readouterr().out
    assert "config: model.vera (--method vera):" in shown and "config: model.lokr (--method lokr):" in shown
