"""The budget planner: which head, targets and layers fit a budget, and at what LoRA rank.

:func:`plan` counts every configuration on the weightless skeleton (meta device, only
config.json is read) with the same :func:`budget.measure` and :func:`budget.resolve_rank`
that ``train`` uses, so each row's count is exactly what training that row would train.
:func:`format_plan` writes the rows as a terminal table, Markdown, CSV or JSON.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from torch import nn

from budgetlora.config import LoraSettings, ModelConfig
from budgetlora.errors import BudgetloraError, OverBudgetError, option, settings_text
from budgetlora.model.budget import measure, resolve_rank, resolve_size
from budgetlora.model.methods import METHODS, SIZE_KEYS, size_cap
from budgetlora.model.modeling import load_base_model, load_model_config, resolve_targets
from budgetlora.model.roles import layer_index

__all__ = [
    "HEADS",
    "TARGET_SETS",
    "RECOMMENDED",
    "RECOMMENDED_METHOD",
    "PlanRow",
    "Recommendation",
    "MethodRecommendation",
    "plan",
    "format_plan",
    "MethodRow",
    "plan_methods",
    "format_method_plan",
]

HEADS: tuple[str, ...] = ("default", "linear", "mean", "pooler")
# Target sets from the cheapest to the widest, each as model.lora.target_modules takes it.
TARGET_SETS: tuple[tuple[str, ...], ...] = (
    ("query", "value"),
    ("query", "key", "value"),
    ("attention",),
    ("all",),
)
Style = Literal["table", "markdown", "csv", "json"]


@dataclass(frozen=True)
class Recommendation:
    """The head and targets that measured best in ``benchmarks/quality.py``, and the evidence."""

    head: str
    targets: tuple[str, ...]
    why: str


# From benchmarks/results/quality_all-mpnet-base-v2.md (a roberta-base-sized encoder, the same
# split and epochs for every recipe): the model's own head with LoRA on query,value (r=8, lr
# 2e-3, the built-in defaults) never lost to the best course preset in four seeds, and no
# recipe beat it beyond noise (DoRA on attention with the linear head came closest).
RECOMMENDED = Recommendation(
    head="default",
    targets=("query", "value"),
    why="the model's own head + LoRA on query,value (at r=8, lr 2e-3: budgetlora's defaults) is in the top "
    "group of the quality benchmark on all-mpnet-base-v2, a roberta-base-sized encoder, and no recipe beat it "
    "beyond noise (benchmarks/results/quality_all-mpnet-base-v2.md)",
)


@dataclass(frozen=True)
class MethodRecommendation:
    """The adapter method that measured best in ``benchmarks/methods.py``, and the evidence."""

    method: str
    why: str


# From benchmarks/results/methods_all-{MiniLM-L6-v2,mpnet-base-v2}.md: every method at its largest
# size under the same exact budget, head, targets, split and epochs (one seed each).
RECOMMENDED_METHOD = MethodRecommendation(
    method="lora",
    why="LoRA scored highest of the six methods in the adapter-methods benchmark at a budget of 1,000,000 on "
    "all-MiniLM-L6-v2 and tied LoHa on all-mpnet-base-v2, the others within noise "
    "(benchmarks/results/methods_*.md)",
)


class _Row:
    """What planned rows share: the count by group against the budget, and the settings that train them."""

    groups: dict[str, int]
    budget: int

    @property
    def trainable(self) -> int:
        return sum(self.groups.values())

    @property
    def share(self) -> float:
        """Fraction of the budget used."""
        return self.trainable / self.budget

    @property
    def settings(self) -> dict[str, Any]:
        """The config keys to train this row with, and their values (empty when it does not fit)."""
        raise NotImplementedError

    @property
    def options(self) -> str:
        """:attr:`settings` as text, each marked (:func:`budgetlora.errors.setting`) for a front end to name."""
        return settings_text(self.settings)


@dataclass(frozen=True)
class PlanRow(_Row):
    """One configuration: head, LoRA targets and layers, the largest uniform rank that fits, its count."""

    head: str
    """The model.head value."""
    targets: tuple[str, ...]
    """The model.lora.target_modules value (role names)."""
    layers: tuple[int, ...] | None
    """The model.lora.layers value; None: every layer."""
    modules: int
    """Linear modules the adapter goes into."""
    rank: int | None
    """The largest uniform LoRA rank that fits; None when not even rank 1 fits."""
    groups: dict[str, int]
    """Trainable parameters by group at ``rank`` (at rank 1 when nothing fits)."""
    budget: int
    """The budget the row was planned for."""
    capped: bool = False
    """The rank stopped at the adapted matrices' smaller side: more would add parameters, not rank."""
    same_heads: tuple[str, ...] = ()
    """Other model.head values that build exactly this model (e.g. pooler on BERT, whose own head is one)."""
    recommended: bool = False
    """The row of :data:`RECOMMENDED` (its head, its targets, every layer), when it fits."""

    @property
    def fits(self) -> bool:
        return self.rank is not None and self.trainable <= self.budget

    @property
    def head_params(self) -> int:
        return self.groups.get("head", 0)

    @property
    def lora_params(self) -> int:
        return sum(n for g, n in self.groups.items() if g.startswith("lora."))

    @property
    def layers_label(self) -> str:
        return _layers_label(self.layers)

    @property
    def settings(self) -> dict[str, Any]:
        return {} if self.rank is None else _settings(None, self.head, self.targets, self.layers, self.rank)

    def to_dict(self) -> dict[str, Any]:
        return {
            "head": self.head,
            "same_heads": list(self.same_heads),
            "targets": ",".join(self.targets),
            "layers": None if self.layers is None else list(self.layers),
            "modules": self.modules,
            "rank": self.rank,
            "capped": self.capped,
            "lora_params": self.lora_params,
            "head_params": self.head_params,
            "trainable": self.trainable,
            **_outcome(self),
        }


def _settings(
    method: str | None,
    head: str,
    targets: Sequence[str],
    layers: Sequence[int] | None,
    size: int | None,
) -> dict[str, Any]:
    """The config keys of a planned row (the method when it is not implied, the layers when not all,
    the size when the method has a knob), and their values."""
    values: dict[str, Any] = {} if method is None else {"model.method": method}
    values |= {"model.head": head, "model.lora.target_modules": tuple(targets)}
    if layers is not None:
        values["model.lora.layers"] = tuple(layers)
    knob = SIZE_KEYS[method or "lora"]
    if knob is not None:
        values[f"model.{knob}"] = size
    return values


def _layers_label(layers: tuple[int, ...] | None) -> str:
    if layers is None:
        return "all"
    if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _config_folder(model: str) -> str:
    """A local folder holding the model's config.json, so that each count reads no network.

    A Hub id is resolved once to its cached snapshot (config.json only, no weights).
    """
    load_model_config(model)  # a missing folder or an unreachable Hub: one clear error
    if Path(model).is_dir():
        return model
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return str(Path(hf_hub_download(model, "config.json")).parent)
    except (OSError, ValueError, EntryNotFoundError):  # fall back to the id, which loaded above
        return model


def _distinct_heads(
    folder: str, heads: Sequence[str], labels: Sequence[str]
) -> dict[str, tuple[nn.Module, list[str]]]:
    """Supported heads -> (their base skeleton, the other heads that build the very same model)."""
    structures: dict[str, str] = {}
    distinct: dict[str, tuple[nn.Module, list[str]]] = {}
    for head in heads:
        try:
            skeleton = load_base_model(ModelConfig(folder, head=head), labels, weights=False)  # type: ignore[arg-type]
        except BudgetloraError:  # this architecture has no such head (e.g. pooler on RoBERTa)
            continue
        structure = repr(skeleton)
        if structure in structures:
            distinct[structures[structure]][1].append(head)
        else:
            structures[structure] = head
            distinct[head] = (skeleton, [])
    return distinct


def _layer_choices(skeleton: nn.Module) -> list[tuple[int, ...] | None]:
    """Every layer, and the upper half (the layers nearest the head)."""
    indices = [layer_index(n) for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)]
    n_layers = 1 + max((i for i in indices if i is not None), default=0)
    return [None, tuple(range(n_layers // 2, n_layers))] if n_layers > 1 else [None]


def _full_rank(skeleton: nn.Module, names: Sequence[str]) -> int:
    """The smallest side of the adapted matrices: a LoRA rank above it adds no rank to the update."""
    linears = {n: m for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)}
    return min(min(linears[n].in_features, linears[n].out_features) for n in names)


def _plan_head(
    folder: str,
    head: str,
    skeleton: nn.Module,
    same_heads: Sequence[str],
    labels: Sequence[str],
    budget: int,
    target_sets: Sequence[tuple[str, ...]],
) -> list[PlanRow]:
    rows: list[PlanRow] = []
    seen: set[tuple[str, ...]] = set()
    for targets in target_sets:
        for layers in _layer_choices(skeleton):
            try:
                names = tuple(resolve_targets(skeleton, targets, layers))
            except BudgetloraError:  # a role this architecture does not have
                continue
            if not names or names in seen:  # e.g. ModernBERT: query,value and query,key,value are one Wqkv
                continue
            seen.add(names)
            cfg = ModelConfig(
                folder,
                head=head,  # type: ignore[arg-type]
                lora=LoraSettings(target_modules=targets, layers=layers),
            )
            try:
                rank: int | None = resolve_rank(cfg, labels, budget)
            except OverBudgetError:
                rank = None
            full = _full_rank(skeleton, names)
            capped = rank is not None and rank > full
            if capped:
                rank = full
            groups = measure(cfg, labels, budget, rank=rank or 1).groups
            rows.append(
                PlanRow(head, targets, layers, len(names), rank, groups, budget, capped, tuple(same_heads))
            )
    return rows


def _check_budget_and_labels(budget: int, labels: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise BudgetloraError(
            f"invalid value for {option('budget')}: {budget!r} (a positive number of parameters)"
        )
    if isinstance(labels, bool) or not isinstance(labels, int) or labels < 2:
        raise BudgetloraError(
            f"invalid value for {option('labels')}: {labels!r} (a number of classes, at least 2)"
        )


def plan(
    model: str,
    budget: int,
    labels: int = 4,
    *,
    heads: Sequence[str] = HEADS,
    target_sets: Sequence[tuple[str, ...]] = TARGET_SETS,
) -> list[PlanRow]:
    """Configurations of ``model`` within ``budget`` trainable parameters, head included.

    One row per supported head × target set × layers (all, or the upper half), with the
    largest uniform LoRA rank that fits (capped at the adapted matrices' smaller side) and
    its exact count, measured on the weightless skeleton: only config.json is read, so a
    folder with nothing else works. Rows that do not fit even at rank 1 are kept with
    ``rank=None``. Heads that build the same model as an earlier one are folded into its
    rows (``same_heads``); target sets that adapt the same modules as an earlier one are
    dropped. Rows are ordered by head, then target set, then layers.

    Raises :class:`OverBudgetError` when nothing fits at all.

    Args:
        model: Hub model id or a local folder (config.json is enough)
        budget: hard cap on trainable parameters, head included
        labels: number of classes
        heads: the heads to count
        target_sets: the target sets to count, each as --target-modules takes it
    """
    _check_budget_and_labels(budget, labels)
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise BudgetloraError(f"unknown head {unknown[0]!r}; allowed: {', '.join(HEADS)}")
    names = tuple(f"label_{i}" for i in range(labels))  # only their number changes a count
    folder = _config_folder(model)
    distinct = _distinct_heads(folder, heads, names)
    if not distinct:
        raise BudgetloraError(f"{model}: none of the heads {', '.join(heads)} is supported for this model")
    rows = [
        row
        for head, (skeleton, same) in distinct.items()
        for row in _plan_head(folder, head, skeleton, same, names, budget, target_sets)
    ]
    if not rows:
        raise BudgetloraError(f"{model}: none of the target sets {list(target_sets)} match this model")
    if not any(row.fits for row in rows):
        smallest = min(rows, key=lambda row: row.trainable)
        raise OverBudgetError(
            f"nothing fits a budget of {budget:,} trainable parameters: the smallest configuration "
            f"({settings_text(_settings(None, smallest.head, smallest.targets, smallest.layers, 1))}) takes "
            f"{smallest.trainable:,} ({smallest.head_params:,} of them the head). "
            f"Raise {option('budget')} to at least {smallest.trainable:,}."
        )
    return [replace(row, recommended=_is_recommended(row)) for row in rows]


# Why a head is folded into another's rows, for the table's footnote.
_WHY_SAME = {
    "mean": "linear reads the first token, mean the mean of the tokens",
    "pooler": "the model's own head is its frozen pretrained pooler + one linear layer",
}


def _is_recommended(row: PlanRow) -> bool:
    heads = (row.head, *row.same_heads)
    return (
        row.fits and RECOMMENDED.head in heads and row.targets == RECOMMENDED.targets and row.layers is None
    )


# --- output ------------------------------------------------------------------------

# CSV: the JSON fields but the groups (a mapping), layers written as in the table.
_CSV_FIELDS = (
    "head",
    "same_heads",
    "targets",
    "layers",
    "modules",
    "rank",
    "capped",
    "lora_params",
    "head_params",
    "trainable",
    "budget",
    "share",
    "fits",
    "options",
    "recommended",
)
_COLUMNS = ("head", "targets", "layers", "modules", "rank", "LoRA", "head params", "trainable", "of budget")


def _cells(row: PlanRow) -> list[str]:
    head = " = ".join((row.head, *row.same_heads))
    rank = "-" if row.rank is None else f"{row.rank}{'*' if row.capped else ''}"
    share = f"{row.share:.1%}" if row.fits else "does not fit"
    return [
        head,
        ",".join(row.targets),
        row.layers_label,
        str(row.modules),
        rank,
        f"{row.lora_params:,}",
        f"{row.head_params:,}",
        f"{row.trainable:,}",
        share,
    ]


def _footnotes(rows: Sequence[PlanRow]) -> list[str]:
    notes = []
    if any(row.capped for row in rows):
        notes.append(
            "* full rank: the adapted matrices' smaller side; a larger rank would fit but adds nothing"
        )
    if any(not row.fits for row in rows):
        notes.append("does not fit: not even at rank 1 (trainable shows the count at rank 1)")
    folded = sorted({head for row in rows for head in row.same_heads})
    if folded:
        why = "; ".join(_WHY_SAME[head] for head in folded if head in _WHY_SAME)
        notes.append(
            f"a = b: these {option('model.head')} values train the same parameters"
            + (f" ({why})" if why else "")
        )
    if any(row.recommended for row in rows):
        notes.append(f"<- recommended: {RECOMMENDED.why}")
    return notes


def format_plan(rows: Sequence[PlanRow], style: Style = "table") -> str:
    """The rows as a terminal ``table``, ``markdown``, ``csv`` (one line per row) or ``json`` (a list).

    Args:
        rows: the rows of :func:`plan`
        style: output format
    """
    if style == "json":
        return json.dumps([row.to_dict() for row in rows], indent=2)
    if style == "csv":
        out = io.StringIO()
        fields = list(_CSV_FIELDS)
        writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            record = row.to_dict()
            record["same_heads"] = " ".join(row.same_heads)
            record["layers"] = row.layers_label
            writer.writerow(record)
        return out.getvalue().rstrip("\n")
    body = [_cells(row) for row in rows]
    right = {"modules", "rank", "LoRA", "head params", "trainable", "of budget"}
    if style == "markdown":
        lines = ["| " + " | ".join(_COLUMNS) + " |"]
        lines.append("| " + " | ".join("---:" if c in right else "---" for c in _COLUMNS) + " |")
        for row, cells in zip(rows, body, strict=True):
            head = f"**{cells[0]}** (recommended)" if row.recommended else cells[0]
            lines.append("| " + " | ".join([head, *cells[1:]]) + " |")
        return "\n".join(lines + ["", *(f"{n}  " for n in _footnotes(rows))]).rstrip()
    if style != "table":
        raise BudgetloraError(
            f"invalid value for {option('format')}: {style!r} (allowed: table, markdown, csv, json)"
        )
    widths = [max(len(c), *(len(cells[i]) for cells in body)) for i, c in enumerate(_COLUMNS)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(w) if col in right else cell.ljust(w)
            for cell, w, col in zip(cells, widths, _COLUMNS, strict=True)
        ).rstrip()

    marked = [
        line(cells) + ("  <- recommended" if row.recommended else "")
        for row, cells in zip(rows, body, strict=True)
    ]
    return "\n".join([line(_COLUMNS), *marked, *_footnotes(rows)])


# --- per method -------------------------------------------------------------------


@dataclass(frozen=True)
class MethodRow(_Row):
    """One adapter method at the largest main size knob that fits, for the chosen head, targets and layers."""

    method: str
    """The model.method value."""
    head: str
    """The model.head value."""
    targets: tuple[str, ...]
    """The model.lora.target_modules value."""
    layers: tuple[int, ...] | None
    """The model.lora.layers value; None: every layer."""
    modules: int
    """Linear modules the adapter goes into."""
    size_key: str | None
    """The method's main size knob (lora.r, vera.r, ...); None for IA3 (no knob)."""
    size: int | None
    """Its largest value that fits (None: no knob, or nothing fits)."""
    groups: dict[str, int]
    """Trainable parameters by group at ``size`` (at size 1 when nothing fits)."""
    frozen: dict[str, int]
    """Frozen tensors the method adds (VeRA's shared matrices): not trainable, not counted."""
    budget: int
    """The budget the row was planned for."""
    capped: bool = False
    """The size stopped at :func:`budgetlora.model.methods.size_cap`: more would add parameters but no rank."""

    @property
    def fits(self) -> bool:
        return self.trainable <= self.budget and (self.size is not None or self.size_key is None)

    @property
    def adapter_params(self) -> int:
        return sum(n for g, n in self.groups.items() if g.startswith(f"{self.method}."))

    @property
    def recommended(self) -> bool:
        """The method of :data:`RECOMMENDED_METHOD`, when it fits."""
        return self.fits and self.method == RECOMMENDED_METHOD.method

    @property
    def settings(self) -> dict[str, Any]:
        return _settings(self.method, self.head, self.targets, self.layers, self.size) if self.fits else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "head": self.head,
            "targets": ",".join(self.targets),
            "layers": None if self.layers is None else list(self.layers),
            "modules": self.modules,
            "size_key": self.size_key,
            "size": self.size,
            "capped": self.capped,
            "adapter_params": self.adapter_params,
            "head_params": self.groups.get("head", 0),
            "trainable": self.trainable,
            "frozen_not_counted": sum(self.frozen.values()),
            **_outcome(self),
        }


def _outcome(row: PlanRow | MethodRow) -> dict[str, Any]:
    """What every row's record ends with: its budget, share, verdict, groups, settings and mark."""
    return {
        "budget": row.budget,
        "share": round(row.share, 6),
        "fits": row.fits,
        "groups": dict(row.groups),
        "options": row.options,
        "recommended": row.recommended,
    }


def plan_methods(
    model: str,
    budget: int,
    labels: int = 4,
    *,
    head: str = "linear",
    targets: Sequence[str] = ("all",),
    layers: Sequence[int] | None = None,
    methods: Sequence[str] = METHODS,
) -> list[MethodRow]:
    """Every adapter method on the same head, targets and layers, at the largest size that fits.

    Counted on the weightless skeleton with :func:`budget.resolve_size` and
    :func:`budget.measure`, as ``train`` counts them. LoRA's rank, like the other methods'
    sizes, stops at :func:`budgetlora.model.methods.size_cap` (``capped``). A method that does not
    fit even at size 1 is kept with ``size=None``.

    Args:
        model: Hub model id or a local folder (config.json is enough)
        budget: hard cap on trainable parameters, head included
        labels: number of classes
        head: the head
        targets: role or module names
        layers: layers, e.g. 6,7,8 (default all)
        methods: the adapter methods to size
    """
    _check_budget_and_labels(budget, labels)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BudgetloraError(f"unknown method {unknown[0]!r}; allowed: {', '.join(METHODS)}")
    names = tuple(f"label_{i}" for i in range(labels))
    folder = _config_folder(model)
    lora = LoraSettings(target_modules=tuple(targets), layers=None if layers is None else tuple(layers))
    base = ModelConfig(folder, head=head, lora=lora)  # type: ignore[arg-type]
    skeleton = load_base_model(base, names, weights=False)
    modules = dict(skeleton.named_modules())
    adapted = resolve_targets(skeleton, lora.target_modules, lora.layers)
    shapes = [(modules[n].in_features, modules[n].out_features) for n in adapted]
    rows = []
    for method in methods:
        cfg = replace(base, method=method)  # type: ignore[arg-type]
        key = SIZE_KEYS[method]
        cap = size_cap(cfg, shapes)
        try:
            size = resolve_size(cfg, names, budget)
        except OverBudgetError:
            size = None
        capped = size is not None and cap is not None and size >= cap
        if capped:
            size = cap
        counted = measure(cfg, names, budget, rank=size or 1) if key else measure(cfg, names, budget)
        rows.append(
            MethodRow(method, head, tuple(targets), base.lora.layers, len(adapted), key, size,
                      counted.groups, counted.frozen, budget, capped)
        )  # fmt: skip
    return rows


_METHOD_COLUMNS = (
    "method",
    "size knob",
    "size",
    "adapter",
    "head params",
    "trainable",
    "of budget",
    "frozen",
)


def format_method_plan(rows: Sequence[MethodRow], style: Style = "table") -> str:
    """The per-method rows as a terminal ``table``, ``markdown``, ``csv`` or ``json``."""
    if style == "json":
        return json.dumps([row.to_dict() for row in rows], indent=2)
    if style == "csv":
        out = io.StringIO()
        fields = [k for k in rows[0].to_dict() if k != "groups"] if rows else []
        writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row.to_dict())
        return out.getvalue().rstrip("\n")
    body = [
        [
            f"**{row.method}** (recommended)" if row.recommended and style == "markdown" else row.method,
            row.size_key or "(none)",
            "-" if row.size is None else f"{row.size}{'*' if row.capped else ''}",
            f"{row.adapter_params:,}",
            f"{row.groups.get('head', 0):,}",
            f"{row.trainable:,}",
            f"{row.share:.1%}" if row.fits else "does not fit",
            f"{sum(row.frozen.values()):,}" if row.frozen else "",
        ]
        for row in rows
    ]
    notes = [
        "* capped: a larger size fits but adds no rank (LoRA, VeRA, LoHa: the matrices' smaller side; "
        "FourierFT: in x out; LoKr: every Kronecker factor full)"
    ]
    if any(row.frozen for row in rows):
        notes.append(
            "frozen: tensors the method adds but never trains (VeRA's shared random matrices): not counted"
        )
    if any(row.recommended for row in rows):
        notes.append(f"<- recommended: {RECOMMENDED_METHOD.why}")
    right = set(_METHOD_COLUMNS) - {"method", "size knob"}
    if style == "markdown":
        lines = ["| " + " | ".join(_METHOD_COLUMNS) + " |"]
        lines.append("| " + " | ".join("---:" if c in right else "---" for c in _METHOD_COLUMNS) + " |")
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines + ["", *(f"{n}  " for n in notes)]).rstrip()
    if style != "table":
        raise BudgetloraError(
            f"invalid value for {option('format')}: {style!r} (allowed: table, markdown, csv, json)"
        )
    widths = [max(len(c), *(len(cells[i]) for cells in body)) for i, c in enumerate(_METHOD_COLUMNS)]
    marks = ["", *("  <- recommended" if row.recommended else "" for row in rows)]
    lines = [
        "  ".join(
            cell.rjust(w) if col in right else cell.ljust(w)
            for cell, w, col in zip(cells, widths, _METHOD_COLUMNS, strict=True)
        ).rstrip()
        + mark
        for cells, mark in zip([list(_METHOD_COLUMNS), *body], marks, strict=True)
    ]
    return "\n".join(lines + notes)
