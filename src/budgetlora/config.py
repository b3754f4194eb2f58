"""The typed config tree of a run, validated where it is built, and its YAML form.

Every field has a one-line docstring-style comment; the CLI's ``--help`` and the
README are written from the same words. Variants are made with
``dataclasses.replace`` (or :func:`with_overrides` for dotted keys), never by mutation.

The config also holds the vocabulary: every key's option name (:func:`option_name`, from which
the CLI makes its flags and the Python API takes its keywords) and the short names a key goes by
(:func:`key_of`), and one record per adapter method (:data:`ADAPTER_METHODS`). The records live
here, beneath the model code, because the config checks a method's options and the CLI titles
them without importing peft; :mod:`budgetlora.model.methods` turns a record into peft's config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, Union

import yaml

from budgetlora.errors import BudgetloraError, setting

__all__ = [
    "ConfigError",
    "DataConfig",
    "LoraSettings",
    "VeraSettings",
    "FourierFTSettings",
    "LohaSettings",
    "LokrSettings",
    "AdapterMethod",
    "ADAPTER_METHODS",
    "METHODS",
    "ModelConfig",
    "TrainSettings",
    "DistillSettings",
    "AugmentSettings",
    "SelfTrainingSettings",
    "TaptSettings",
    "RunConfig",
    "load_config",
    "save_config",
    "config_to_dict",
    "config_from_dict",
    "with_overrides",
    "field_help",
    "config_fields",
    "option_name",
    "key_of",
    "choices",
    "union_members",
    "config_to_yaml",
]


class ConfigError(BudgetloraError):
    """Every problem found in a config, one line each; the message is the problem itself when there is one."""

    def __init__(self, problems: Sequence[str], source: str | Path | None = None) -> None:
        self.problems = tuple(problems)
        lines = [f"{len(self.problems)} problems in the config:", *(f"  - {p}" for p in self.problems)]
        message = self.problems[0] if len(self.problems) == 1 else "\n".join(lines)
        super().__init__(message if source is None else f"{source}: {message}")


def _raise_all(problems: Sequence[str]) -> None:
    if problems:
        raise ConfigError(problems)


def _problems_of(err: BudgetloraError) -> tuple[str, ...]:
    return err.problems if isinstance(err, ConfigError) else (str(err),)


def _invalid(option: str, value: Any, allowed: str) -> str:
    return f"invalid value for {option}: {value!r} ({allowed})"


def _fail(option: str, value: Any, allowed: str) -> NoReturn:
    raise BudgetloraError(_invalid(option, value, allowed))


def union_members(annotation: Any) -> tuple[Any, ...]:
    """The types a field's annotation joins (``int | None`` -> ``(int, NoneType)``); itself alone if no union."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def choices(annotation: Any) -> tuple[Any, ...]:
    """The values a field typed ``Literal[...]`` (or ``Literal[...] | None``) allows; () for other types."""
    literals = [a for a in union_members(annotation) if a is not type(None)]
    if len(literals) != 1 or typing.get_origin(literals[0]) is not Literal:
        return ()
    return typing.get_args(literals[0])


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_choices(settings: Any, prefix: str) -> None:
    """Every ``Literal``-typed field of ``settings`` holds one of its values."""
    for name, annotation in _hints(type(settings)).items():  # type: ignore[arg-type]
        allowed = choices(annotation)
        value = getattr(settings, name)
        if (
            allowed
            and value not in allowed
            and not (value is None and type(None) in union_members(annotation))
        ):
            _fail(prefix + name, value, "allowed: " + ", ".join(map(str, allowed)))


def _check_positive(option: str, value: float | int | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(option, value, "must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        _fail(option, value, "must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        _fail(option, value, "must be >= 0" if allow_zero else "must be > 0")


def _check_size(option: str, value: float, *, allow_zero: bool = False) -> None:
    """A number of rows: a fraction in (0, 1), or a whole count."""
    _check_positive(option, value, allow_zero=allow_zero)
    if isinstance(value, float) and value >= 1 and not value.is_integer():
        _fail(option, value, "a fraction below 1, or a whole number of rows")


def _check_seed(option: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        _fail(option, value, "an integer in 0..2**32-1")


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is split, filtered and tokenized."""

    source: str = "fancyzhx/ag_news"
    """Hub dataset id, a folder with train.csv/test.csv (classic AG News), or one data file."""
    text_column: str = "text"
    """Name of the text column in tabular files and Hub datasets."""
    label_column: str = "label"
    """Name of the label column (integers 0..K-1 or class names)."""
    label_names: tuple[str, ...] | None = None
    """Class names in label order; taken from the dataset or classes.txt when not given."""
    validation_size: float = 0.05
    """Validation rows held out of train (stratified): a fraction if < 1, else a count."""
    test_size: float = 0.0
    """Test rows held out of train when the source has no test split: fraction or count (0: none)."""
    split_seed: int = 42
    """Seed of the stratified splits (kept apart from the training seed)."""
    max_train_samples: int | None = None
    """Cap on training rows (stratified sample), for quick runs."""
    max_eval_samples: int | None = None
    """Cap on validation and test rows, for quick runs."""
    max_length: int = 128
    """Truncate token sequences to this length (128 covers 99.3% of AG News for roberta-base)."""
    min_words: int | None = None
    """Filter: drop training rows with fewer words (off by default)."""
    max_words: int | None = None
    """Filter: drop training rows with more words (off by default)."""
    min_unique_ratio: float | None = None
    """Filter: drop training rows whose unique-word ratio is below this (off by default)."""
    drop_empty: bool = False
    """Drop rows with empty or whitespace-only text (with a count) instead of failing."""
    allow_pickle: bool = False
    """Allow reading pickled datasets (unpickling runs code: only for files you trust)."""
    unlabelled: str | None = None
    """Unlabelled texts of the domain the model will score (any input predict reads): self-training adapts to them, and the run's shift report compares them with the training rows."""

    def __post_init__(self) -> None:
        if not self.source:
            _fail("data.source", self.source, "a Hub dataset id or a local path")
        for option, column in (
            ("data.text_column", self.text_column),
            ("data.label_column", self.label_column),
        ):
            if not column:
                _fail(option, column, "a column name")
        _check_size("data.validation_size", self.validation_size)
        _check_size("data.test_size", self.test_size, allow_zero=True)
        _check_seed("data.split_seed", self.split_seed)
        _check_positive("data.max_train_samples", self.max_train_samples)
        _check_positive("data.max_eval_samples", self.max_eval_samples)
        _check_positive("data.max_length", self.max_length)
        if isinstance(self.max_length, float) or self.max_length < 8:
            _fail("data.max_length", self.max_length, "an integer >= 8")
        _check_positive("data.min_words", self.min_words, allow_zero=True)
        _check_positive("data.max_words", self.max_words)
        if self.min_words is not None and self.max_words is not None and self.min_words > self.max_words:
            _fail("data.min_words", self.min_words, f"must not exceed data.max_words={self.max_words}")
        if self.min_unique_ratio is not None and not 0 <= self.min_unique_ratio <= 1:
            _fail("data.min_unique_ratio", self.min_unique_ratio, "a ratio in [0, 1]")
        if self.label_names is not None:
            if any(not isinstance(name, str) or not name.strip() for name in self.label_names):
                _fail("data.label_names", self.label_names, "names must be non-empty text")
            if len(set(self.label_names)) != len(self.label_names):
                _fail("data.label_names", self.label_names, "names must be unique")
            if len(self.label_names) < 2:
                _fail("data.label_names", self.label_names, "a classifier needs at least two classes")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter: where it goes and how large it is."""

    r: int | Literal["auto"] = 8
    """LoRA rank; 'auto' picks the largest uniform rank that fits the budget."""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.1
    """Dropout on the LoRA input."""
    target_modules: tuple[str, ...] = ("query", "value")
    """Modules to adapt: role names (query, key, value, attn_out, ffn_in, ffn_out, attention, all) or raw module names."""
    layers: tuple[int, ...] | None = None
    """Only adapt these encoder layers (0-based); all layers when not given."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train: none, all, or those of adapted modules (lora_only)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): adds a magnitude vector per adapted module."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides, as peft's rank_pattern (regex or name -> rank)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, as peft's alpha_pattern."""

    def __post_init__(self) -> None:
        if self.r != "auto" and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1):
            _fail("lora.r", self.r, "a positive integer or 'auto'")
        _check_positive("lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            _fail("lora.dropout", self.dropout, "a probability in [0, 1)")
        if not self.target_modules:
            _fail("lora.target_modules", self.target_modules, "at least one module")
        _check_choices(self, "lora.")
        if self.layers is not None and (not self.layers or any(i < 0 for i in self.layers)):
            _fail("lora.layers", self.layers, "non-negative layer indices")
        for name, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                _fail(f"lora.rank_pattern[{name!r}]", rank, "a positive integer")


def _check_size_knob(option: str, value: Any) -> None:
    """A method's main size knob: a positive integer or 'auto'."""
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        _fail(option, value, "a positive integer or 'auto'")


def _check_method_settings(
    settings: Any, block: str, knob: str, positive: Sequence[str] = (), seeds: Sequence[str] = ()
) -> None:
    """An adapter method's settings: its size knob, the fields that must be > 0, its seeds."""
    _check_size_knob(f"{block}.{knob}", getattr(settings, knob))
    for name in positive:
        _check_positive(f"{block}.{name}", getattr(settings, name))
    for name in seeds:
        _check_seed(f"{block}.{name}", getattr(settings, name))


@dataclass(frozen=True)
class VeraSettings:
    """VeRA (model.method vera): frozen random matrices shared by all layers, two trained scaling vectors per module."""

    r: int | Literal["auto"] = 256
    """VeRA rank: the width of the shared frozen matrices (costs one trained scalar per module per unit); 'auto': the largest that fits."""
    d_initial: float = 0.1
    """Initial value of the trained vector that scales the rank dimension."""
    projection_prng_key: int = 0
    """Seed of the shared frozen random matrices."""
    save_projection: bool = True
    """Save the shared frozen matrices with the adapter (reloads exactly without regenerating them)."""

    def __post_init__(self) -> None:
        _check_method_settings(self, "vera", "r", positive=["d_initial"], seeds=["projection_prng_key"])


@dataclass(frozen=True)
class FourierFTSettings:
    """FourierFT (model.method fourierft): a few trained spectral coefficients per module, at fixed random frequencies."""

    n_frequency: int | Literal["auto"] = 1000
    """Trained spectral coefficients per adapted module; 'auto': the largest number that fits."""
    scaling: float = 150.0
    """Scale of the weight update (as LoRA's alpha / r)."""
    random_loc_seed: int = 777
    """Seed of the frequencies each module trains."""

    def __post_init__(self) -> None:
        _check_method_settings(
            self, "fourierft", "n_frequency", positive=["scaling"], seeds=["random_loc_seed"]
        )


@dataclass(frozen=True)
class LohaSettings:
    """LoHa (model.method loha): the update is the Hadamard product of two low-rank products."""

    r: int | Literal["auto"] = 8
    """LoHa rank (each module trains 2 * r * (in + out)); 'auto': the largest that fits."""
    alpha: float = 8.0
    """LoHa scaling numerator (scale = alpha / r)."""

    def __post_init__(self) -> None:
        _check_method_settings(self, "loha", "r", positive=["alpha"])


@dataclass(frozen=True)
class LokrSettings:
    """LoKr (model.method lokr): the update is a Kronecker product of a small full matrix and a low-rank one."""

    r: int | Literal["auto"] = 8
    """LoKr rank of the larger Kronecker factor (full once r reaches half its side); 'auto': the largest that adds parameters and fits."""
    alpha: float = 8.0
    """LoKr scaling numerator (scale = alpha / r)."""
    decompose_factor: int = -1
    """Size of the small Kronecker factor's sides (-1: near the square root of each side); smaller factors make the low-rank factor larger."""
    decompose_both: bool = False
    """Also make the small Kronecker factor low-rank."""

    def __post_init__(self) -> None:
        _check_method_settings(self, "lokr", "r", positive=["alpha"])
        if (
            isinstance(self.decompose_factor, bool)
            or not isinstance(self.decompose_factor, int)
            or (self.decompose_factor < 1 and self.decompose_factor != -1)
        ):
            _fail("lokr.decompose_factor", self.decompose_factor, "-1 or a positive integer")


# --- adapter methods ------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterMethod:
    """One peft adapter method: what budgetlora knows of it, in one record.

    Adding a method is its settings class (above), its field of :class:`ModelConfig`, its name
    in ``Method`` and its record in :data:`ADAPTER_METHODS`, all in this module. The record is
    plain data, so that the config tree (beneath the model code) checks a method's options and
    the CLI titles its options without importing peft; :mod:`budgetlora.model.methods` makes
    peft's config from it: the class named ``peft_config``, given the settings' fields under
    their own names (they are named as peft names them, but where ``peft_names`` says).
    """

    name: str
    """The value of model.method."""
    title: str
    """The method's name as its paper writes it (report titles)."""
    peft_config: str
    """The name of peft's config class."""
    settings: str | None = None
    """The field of ModelConfig that holds its settings; None: it has none."""
    size_knob: str | None = None
    """Its main size knob, a key below model (lora.r), which may be 'auto'; None: it has none."""
    size_stops: Literal["side", "area", "kronecker"] = "side"
    """Where more size adds no rank: the adapted matrices' smaller side, in x out (area), or where
    every low-rank Kronecker factor is full (kronecker: its settings' decompose_factor and decompose_both)."""
    trains: str = ""
    """What the name of a parameter it trains holds (the budget groups its parameters by it)."""
    frozen: dict[str, str] = field(default_factory=dict)
    """Frozen tensors it adds (buffers: never trained, not counted): what their name holds -> label."""
    bias: str | None = None
    """peft's bias value for lora.bias lora_only (the biases of adapted modules); None: it trains no biases."""
    peft_names: dict[str, str | None] = field(default_factory=dict)
    """Settings fields that peft names otherwise, or (None) that it does not take."""
    feedforward: bool = False
    """Its peft config takes feedforward_modules: the adapted ffn_out modules (whose input it scales)."""
    help: str | None = None
    """What its options are for, in the title of their group in the CLI's help (default: the method)."""

    @property
    def group_title(self) -> str:
        """The title of the group of its settings' options: ``model.vera (`model.method`=vera)``."""
        return f"model.{self.settings} ({self.help or setting('model.method', self.name)})"


ADAPTER_METHODS: dict[str, AdapterMethod] = {
    record.name: record
    for record in (
        AdapterMethod(
            "lora", "LoRA", "LoraConfig", settings="lora", size_knob="lora.r", trains=".lora_", bias="lora_only",
            peft_names={"alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": None,
                        "layers": None, "bias": None},
            help="target_modules and layers serve every method",
        ),
        AdapterMethod(
            "vera", "VeRA", "VeraConfig", settings="vera", size_knob="vera.r", trains=".vera_lambda_",
            frozen={".vera_A.": "vera.shared_A", ".vera_B.": "vera.shared_B"}, bias="vera_only",
        ),
        AdapterMethod(
            "fourierft", "FourierFT", "FourierFTConfig", settings="fourierft", size_knob="fourierft.n_frequency",
            size_stops="area", trains=".fourierft_spectrum", bias="fourier_only",
        ),
        AdapterMethod("ia3", "IA3", "IA3Config", trains=".ia3_l", feedforward=True),
        AdapterMethod("loha", "LoHa", "LoHaConfig", settings="loha", size_knob="loha.r", trains=".hada_"),
        AdapterMethod(
            "lokr", "LoKr", "LoKrConfig", settings="lokr", size_knob="lokr.r", size_stops="kronecker", trains=".lokr_",
        ),
    )
}  # fmt: skip
Method = Literal["lora", "vera", "fourierft", "ia3", "loha", "lokr"]
METHODS: tuple[str, ...] = typing.get_args(Method)
# Options of the lora block that only LoRA has (target_modules and layers serve every method).
_LORA_ONLY = (("use_dora", False), ("use_rslora", False))


@dataclass(frozen=True)
class ModelConfig:
    """The pretrained encoder and what is trained on top of it."""

    name_or_path: str = "roberta-base"
    """Hub model id or a local save_pretrained folder of a sequence-classification encoder."""
    head: Literal["default", "linear", "mean", "pooler"] = "default"
    """Classifier head: the model's own, one linear layer on the first token, one linear layer on the mean
    of the real tokens (how sentence-transformers pool), or the frozen pretrained pooler + a linear layer."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Model config fields to override, e.g. {hidden_dropout_prob: 0.07, classifier_dropout: 0.2}."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The LoRA adapter; its target_modules and layers choose the modules of every method."""
    method: Method = "lora"
    """The peft adapter method: lora, vera, fourierft, ia3 (no size knob: one vector per module), loha or lokr."""
    vera: VeraSettings = field(default_factory=VeraSettings)
    """VeRA's settings (with model.method vera)."""
    fourierft: FourierFTSettings = field(default_factory=FourierFTSettings)
    """FourierFT's settings (with model.method fourierft)."""
    loha: LohaSettings = field(default_factory=LohaSettings)
    """LoHa's settings (with model.method loha)."""
    lokr: LokrSettings = field(default_factory=LokrSettings)
    """LoKr's settings (with model.method lokr)."""

    def __post_init__(self) -> None:
        if not self.name_or_path:
            _fail("model.name_or_path", self.name_or_path, "a Hub id or a local folder")
        _check_choices(self, "model.")
        if self.method == "lora":
            return
        lora_only = [name for name, off in _LORA_ONLY if getattr(self.lora, name) != off]
        lora_only += [name for name in ("rank_pattern", "alpha_pattern") if getattr(self.lora, name)]
        problems = [
            _invalid(f"lora.{name}", getattr(self.lora, name), f"LoRA only; model.method is {self.method}")
            for name in lora_only
        ]
        if self.lora.bias != "none" and ADAPTER_METHODS[self.method].bias is None:
            problems.append(
                _invalid("lora.bias", self.lora.bias, f"{self.method} trains no biases: only none")
            )
        _raise_all(problems)


@dataclass(frozen=True)
class TrainSettings:
    """The optimisation loop."""

    epochs: float = 3.0
    """Passes over the training data (ignored when max_steps is set); 3, as the Trainer's default."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    lr: float = 2e-3
    """Peak learning rate (2e-3 suits LoRA + a fresh head; measured on MiniLM / AG News)."""
    head_lr: float | None = None
    """Peak learning rate of the classifier head (default: train.lr); the schedule scales both alike."""
    batch_size: int = 32
    """Training samples per optimizer step per process (before gradient accumulation)."""
    eval_batch_size: int | None = None
    """Samples per evaluation batch; default 256 on a GPU, 16 on a CPU (large batches measured slower there)."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    """Optimizer (AdamW is fused on CUDA)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW) or L2 (Adam, SGD); not applied to biases and norms."""
    momentum: float = 0.0
    """SGD momentum."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value (none: no clipping)."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = 0.06
    """Warmup as a fraction of all steps (used when warmup_steps is not set)."""
    warmup_steps: int | None = None
    """Warmup as a number of steps."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs that support it (fp16 on older ones) and on CPUs with bf16 units (AMX), else fp32."""
    eval_every: int | None = None
    """Evaluate on the validation split every N optimizer steps (default: four times an epoch)."""
    eval_each_epoch: bool = True
    """Evaluate at the end of each epoch."""
    best_metric: Literal["accuracy", "macro_f1", "loss"] = "loss"
    """Validation metric that picks the checkpoint that is kept: loss (the lowest cross-entropy, steadier
    than accuracy on a few hundred rows), accuracy or macro_f1 (the highest)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement."""
    log_every: int = 20
    """Log training loss and learning rate every N optimizer steps."""
    seed: int = 42
    """Seed of initialisation, dropout and data order."""
    group_by_length: bool = True
    """Batch samples of similar length together (shuffled in large windows): far less padding."""
    tensorboard: bool = False
    """Also write TensorBoard logs to the run folder."""
    compile: bool = False
    """torch.compile the training forward (dynamic shapes; the first steps are slow while it compiles)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    checkpoint_every: int | None = None
    """Save a resumable checkpoint every N optimizer steps (and on SIGINT/SIGTERM)."""
    keep_checkpoints: int = 2
    """How many resumable checkpoints to keep."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        _check_positive("train.epochs", self.epochs)
        _check_positive("train.max_steps", self.max_steps)
        _check_positive("train.lr", self.lr)
        _check_positive("train.head_lr", self.head_lr)
        if self.eval_batch_size is not None:
            _check_positive("train.eval_batch_size", self.eval_batch_size)
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(f"train.{name}", value, "a positive integer")
        _check_choices(self, "train.")
        _check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("train.momentum", self.momentum, allow_zero=True)
        _check_positive("train.max_grad_norm", self.max_grad_norm)
        if not 0 <= self.warmup_ratio < 1:
            _fail("train.warmup_ratio", self.warmup_ratio, "a fraction in [0, 1)")
        _check_positive("train.warmup_steps", self.warmup_steps, allow_zero=True)
        if not 0 <= self.label_smoothing < 1:
            _fail("train.label_smoothing", self.label_smoothing, "a fraction in [0, 1)")
        _check_positive("train.eval_every", self.eval_every)
        _check_positive("train.early_stopping_patience", self.early_stopping_patience)
        _check_positive("train.checkpoint_every", self.checkpoint_every)
        _check_positive("train.num_workers", self.num_workers, allow_zero=True)
        _check_seed("train.seed", self.seed)
        _raise_all(_contradictions(self))


def _contradictions(t: TrainSettings) -> list[str]:
    """Options of the loop that are each valid but cannot all be meant: every one found, not the first."""
    problems = []
    default_ratio = TrainSettings.warmup_ratio
    if t.warmup_steps is not None and t.warmup_ratio != default_ratio:
        problems.append(
            f"train.warmup_steps={t.warmup_steps} and train.warmup_ratio={t.warmup_ratio} are both set "
            "(the steps would win): set one of them"
        )
    if t.momentum and t.optimizer != "sgd":
        problems.append(
            f"train.momentum={t.momentum} applies to train.optimizer=sgd only (it is {t.optimizer}): "
            "drop it or choose sgd"
        )
    never_evaluates = (
        not t.eval_each_epoch
        and t.eval_every is not None
        and t.max_steps is not None
        and t.eval_every > t.max_steps
    )
    if t.early_stopping_patience is not None and never_evaluates:
        problems.append(
            f"train.early_stopping_patience={t.early_stopping_patience} needs evaluations, and none would run: "
            f"train.eval_every={t.eval_every} is past train.max_steps={t.max_steps} and train.eval_each_epoch "
            "is off"
        )
    return problems


@dataclass(frozen=True)
class DistillSettings:
    """Knowledge distillation (``budgetlora distill``, or a sweep with a teacher)."""

    teacher: str | None = None
    """Teacher: a budgetlora run folder, a LoRA adapter folder, or a sequence-classification checkpoint (folder or Hub id)."""
    alpha: float = 0.5
    """Weight of the soft (teacher) term; 1 - alpha weighs the cross-entropy on the labels."""
    temperature: float = 2.0
    """Softmax temperature of both teacher and student in the soft term."""
    transfer: bool = False
    """Also train on the texts of data.unlabelled, each labelled by the teacher (its soft labels, and its top class as the hard one)."""

    def __post_init__(self) -> None:
        if not isinstance(self.transfer, bool):
            _fail("distill.transfer", self.transfer, "true or false")
        if self.teacher is not None and (not isinstance(self.teacher, str) or not self.teacher):
            _fail("distill.teacher", self.teacher, "a run folder, model folder or Hub id")
        bad_alpha = isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
        if bad_alpha or not 0 <= self.alpha <= 1:
            _fail("distill.alpha", self.alpha, "a weight in [0, 1]")
        bad_t = isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
        if bad_t or not 0 < self.temperature < math.inf:
            _fail("distill.temperature", self.temperature, "a finite number > 0")


@dataclass(frozen=True)
class AugmentSettings:
    """Training-time augmentation against cues a shifted test set may lack: each training text is
    replaced by its altered form with the given probability (drawn once, from train.seed)."""

    markers: float = 0.0
    """Probability that a training text loses its source markers ((Reuters), AP -, AFP) and HTML entities (#39;, &lt;b&gt;)."""
    lowercase: float = 0.0
    """Probability that a training text is lowercased and loses its punctuation."""
    word_dropout: float = 0.0
    """Probability that each word of each training text is dropped (0: none)."""

    def __post_init__(self) -> None:
        for name in ("markers", "lowercase", "word_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                _fail(f"augment.{name}", value, "a probability in [0, 1]")


@dataclass(frozen=True)
class SelfTrainingSettings:
    """Self-training on data.unlabelled: a model labels them, its most confident labels (balanced by
    class) join the training rows, and a fresh model trains on both; repeated for each round."""

    rounds: int = 0
    """Rounds of pseudo-labelling with data.unlabelled (0: none)."""
    share: float = 0.5
    """Share of the unlabelled rows pseudo-labelled in the last round (round r of R takes r/R of it)."""
    balance: bool = True
    """Keep as many pseudo-labelled rows of each class (the most confident of each)."""
    labeller: str | None = None
    """A finished run folder that labels the first round (default: a run of this config without the unlabelled rows, trained first)."""

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            _fail("self_training.rounds", self.rounds, "a whole number >= 0")
        if (
            isinstance(self.share, bool)
            or not isinstance(self.share, (int, float))
            or not 0 < self.share <= 1
        ):
            _fail("self_training.share", self.share, "a fraction in (0, 1]")
        if self.labeller is not None and not self.labeller:
            _fail("self_training.labeller", self.labeller, "a finished run folder")


@dataclass(frozen=True)
class TaptSettings:
    """Task-adaptive pretraining: masked-LM steps on the training (and unlabelled) texts through the
    same adapter before the classifier trains; the checkpoint's pretrained MLM head is frozen and
    nothing is added to the budget."""

    steps: int = 0
    """Masked-LM optimizer steps before classification training (0: none)."""
    mask_probability: float = 0.15
    """Share of tokens masked (BERT's 80/10/10 replacement)."""
    mlm_lr: float | None = None
    """Peak learning rate of the masked-LM steps (default: train.lr)."""

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            _fail("tapt.steps", self.steps, "a whole number >= 0")
        if not 0 < self.mask_probability < 1:
            _fail("tapt.mask_probability", self.mask_probability, "a fraction in (0, 1)")
        _check_positive("tapt.mlm_lr", self.mlm_lr)


@dataclass(frozen=True)
class RunConfig:
    """A whole training run: model, data, optimisation, the budget and where it goes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The encoder, head and adapter."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    train: TrainSettings = field(default_factory=TrainSettings)
    """The optimisation loop."""
    distill: DistillSettings = field(default_factory=DistillSettings)
    """The teacher and the loss mix of a distillation (unused without a teacher)."""
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    """Training-time augmentation of the training texts."""
    self_training: SelfTrainingSettings = field(default_factory=SelfTrainingSettings)
    """Self-training on data.unlabelled."""
    tapt: TaptSettings = field(default_factory=TaptSettings)
    """Masked-LM steps before classification training."""
    budget: int = 1_000_000
    """Hard cap on trainable parameters, classifier head included."""
    output: str = "runs/run"
    """The run folder."""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            problems.append(_invalid("budget", self.budget, "a positive integer number of parameters"))
        if not self.output:
            problems.append(_invalid("output", self.output, "a folder path"))
        if self.self_training.rounds and self.data.unlabelled is None:
            problems.append(
                f"self_training.rounds={self.self_training.rounds} needs unlabelled texts: set data.unlabelled"
            )
        if self.distill.transfer and self.data.unlabelled is None:
            problems.append(
                "distill.transfer=true needs unlabelled texts to transfer on: set data.unlabelled"
            )
        _raise_all(problems)


# --- dict / YAML form -------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of builtin types (tuples become lists) for YAML/JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return plain(cfg)  # type: ignore[no-any-return]


def _convert(value: Any, annotation: Any, option: str) -> Any:
    """Coerce a YAML value to a field's annotated type (tuples, nested dataclasses, numbers)."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            _fail(option, value, "a mapping")
        return _build(annotation, value, option + ".")  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        return _convert_union(value, annotation, option)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            _fail(option, value, "a list")
        (item_type, *_rest) = typing.get_args(annotation)
        return tuple(_convert(v, item_type, option) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            _fail(option, value, "a mapping")
        return dict(value)
    converter = _SCALARS.get(annotation)
    return value if converter is None else converter(value, option)


def _convert_union(value: Any, annotation: Any, option: str) -> Any:
    """``None``, one of the union's literal words, or the value as its first other type."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if value is None:
        return None
    for arg in args:
        if typing.get_origin(arg) is Literal and value in typing.get_args(arg):
            return value
    non_literal = [a for a in args if typing.get_origin(a) is not Literal]
    return _convert(value, non_literal[0], option) if non_literal else value


# YAML and --set give any type: each field gets its own, or a message naming it.
def _to_str(value: Any, option: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        _fail(option, value, "text")
    return str(value)


def _to_float(value: Any, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        _fail(option, value, "a number")
    try:
        return float(value)
    except ValueError:
        _fail(option, value, "a number")


def _to_int(value: Any, option: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            try:
                value = float(value)  # "1e3"
            except ValueError:
                _fail(option, value, "an integer")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(option, value, "an integer")
    if isinstance(value, float) and not value.is_integer():  # also inf and nan
        _fail(option, value, "an integer")
    return int(value)


def _to_bool(value: Any, option: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
        return False
    _fail(option, value, "true or false")


_SCALARS: dict[Any, Any] = {str: _to_str, float: _to_float, int: _to_int, bool: _to_bool}


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """``cls`` from plain values, or one :class:`ConfigError` with every problem found: unknown keys,
    each field's value, and the section's own checks (run with defaults for the fields that failed)."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    problems: list[str] = []
    unknown = sorted(set(values) - names)
    if unknown:
        problems.append(
            f"unknown config key{'s' if len(unknown) > 1 else ''} "
            + ", ".join(prefix + k for k in unknown)
            + f"; {prefix.rstrip('.') or 'the top level'} takes: "
            + ", ".join(sorted(names))
        )
    kwargs = {}
    for key in sorted(set(values) & names, key=list(hints).index):
        try:
            kwargs[key] = _convert(values[key], hints[key], prefix + key)
        except BudgetloraError as err:
            problems.extend(_problems_of(err))
    try:
        built = cls(**kwargs)
    except TypeError as err:
        raise BudgetloraError(f"bad config at {prefix or 'top level'}: {err}") from err
    except BudgetloraError as err:
        problems.extend(_problems_of(err))
    _raise_all(problems)
    return built


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from nested plain values (as in YAML)."""
    if not isinstance(values, dict):
        raise BudgetloraError(f"a config must be a mapping, got {type(values).__name__}")
    return _build(RunConfig, values)  # type: ignore[no-any-return]


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML config file (a run folder's config.yaml, a preset, or your own)."""
    path = Path(path)
    if not path.is_file():
        raise BudgetloraError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise BudgetloraError(f"cannot parse config file {path}: {err}") from err
    try:
        return config_from_dict(values)
    except ConfigError as err:
        raise ConfigError(err.problems, source=path) from err
    except BudgetloraError as err:
        raise BudgetloraError(f"{path}: {err}") from err


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from budgetlora.rundir import write_text_atomic

    write_text_atomic(Path(path), config_to_yaml(cfg))


def with_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with dotted keys replaced, e.g. ``{"train.lr": 1e-4}``."""
    values = config_to_dict(cfg)
    for dotted, value in overrides.items():
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise BudgetloraError(f"unknown config key {dotted}")
            node = node[key]
        if leaf not in node:
            raise BudgetloraError(f"unknown config key {dotted}")
        node[leaf] = value
    return config_from_dict(values)


# Every config key has an option name, made from its name: train.lr is lr, data.max_length
# max_length, and the keys of an adapter's block carry the block's name (model.lora.r is lora_r,
# model.vera.r vera_r). These keep the names they were documented with. The CLI's flag is the
# name with dashes (--lora-r), the Python API's keyword the name itself (budgetlora.train(lora_r=8)).
OPTION_ALIASES: dict[str, str] = {
    "model.name_or_path": "model",
    "data.source": "data",
    "model.lora.target_modules": "target_modules",
    "model.lora.layers": "layers",
    "model.lora.bias": "bias",
    "model.lora.use_dora": "dora",
    "model.lora.use_rslora": "rslora",
    "distill.teacher": "teacher",
    "distill.alpha": "alpha",
    "distill.temperature": "temperature",
    "distill.transfer": "transfer_unlabelled",
}
_NAMED_BLOCKS = (
    *(f"model.{m.settings}" for m in ADAPTER_METHODS.values() if m.settings),
    "augment",
    "self_training",
    "tapt",
)


def option_name(key: str) -> str:
    """A config key's option name: its command-line flag without the dashes, its Python keyword."""
    if key in OPTION_ALIASES:
        return OPTION_ALIASES[key]
    block, _, leaf = key.rpartition(".")
    return f"{block.rsplit('.', 1)[-1]}_{leaf}" if block in _NAMED_BLOCKS else leaf


@functools.cache
def _names_of_keys() -> dict[str, str]:
    names: dict[str, str] = {}
    for key, _ in config_fields():
        for name in (key, key.removeprefix("model."), option_name(key)):
            names.setdefault(name, key)
    return names


def key_of(name: str) -> str | None:
    """The config key a name means: the key itself (``model.lora.r``), the key without its
    ``model.`` (``lora.r``), or its option name (``lora_r``, ``lr``); None when it names none."""
    return _names_of_keys().get(name)


def config_fields() -> list[tuple[str, Any]]:
    """Every leaf of the config tree as (dotted key, annotation), in declaration order:
    ``("train.lr", float)``, ``("model.lora.r", int | Literal["auto"])``, ..."""

    def leaves(cls: type, prefix: str) -> list[tuple[str, Any]]:
        found = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            annotation = _hints(cls)[f.name]
            if dataclasses.is_dataclass(annotation):
                found += leaves(annotation, prefix + f.name + ".")  # type: ignore[arg-type]
            else:
                found.append((prefix + f.name, annotation))
        return found

    return leaves(RunConfig, "")


def field_help(dotted: str) -> str:
    """The docstring under a config field, e.g. ``field_help("train.lr")`` -> "Peak learning rate."."""
    cls: Any = RunConfig
    *parents, leaf = dotted.split(".")
    for name in parents:
        cls = typing.get_type_hints(cls)[name]
    return _field_docs(cls).get(leaf, "")


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring under it, read once per class (the CLI asks for every option)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    return {
        node.target.id: str(following.value.value)
        for node, following in zip(body, body[1:], strict=False)
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and isinstance(following, ast.Expr)
        and isinstance(following.value, ast.Constant)
    }
