"""Exact trainable-parameter accounting, the budget check, and the largest rank that fits."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from budgetlora.config import ModelConfig
from budgetlora.errors import BudgetloraError, OverBudgetError, setting
from budgetlora.model.methods import FROZEN_MARKERS, PARAM_MARKERS, SIZE_KEYS, size_cap, size_of
from budgetlora.model.modeling import build_model, load_base_model, resolve_targets
from budgetlora.model.roles import is_head_parameter, role_of

__all__ = ["Budget", "count_trainable", "check_budget", "resolve_rank", "resolve_size", "measure"]


@dataclass(frozen=True)
class Budget:
    """Trainable parameters by group (``lora.query``, ``vera.value``, ``head``, ``bias``, ...) against a limit.

    ``frozen``: tensors the adapter adds but never trains (VeRA's shared random matrices),
    by name; they are not trainable and not counted against the limit.
    """

    limit: int
    groups: dict[str, int]
    frozen: dict[str, int] = field(default_factory=dict)

    @property
    def trainable(self) -> int:
        return sum(self.groups.values())

    @property
    def fits(self) -> bool:
        return self.trainable <= self.limit

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "budget": self.limit,
            "trainable": self.trainable,
            "fits": self.fits,
            "groups": dict(self.groups),
        }
        if self.frozen:
            out["frozen_not_counted"] = dict(self.frozen)
        return out

    def table(self) -> str:
        """A plain-text table for the terminal."""
        width = max([len(g) for g in self.groups] + [len("trainable")])
        lines = [f"{'group':<{width}}  {'params':>11}  {'of budget':>9}"]
        for group, n in self.groups.items():
            lines.append(f"{group:<{width}}  {n:>11,}  {n / self.limit:>9.1%}")
        lines.append(f"{'trainable':<{width}}  {self.trainable:>11,}  {self.trainable / self.limit:>9.1%}")
        verdict = "fits" if self.fits else f"OVER by {self.trainable - self.limit:,}"
        lines.append(f"{'budget':<{width}}  {self.limit:>11,}  {verdict:>9}")
        for name, n in self.frozen.items():
            lines.append(f"{name:<{width}}  {n:>11,}  frozen, not counted")
        return "\n".join(lines)


def _group_of(param_name: str) -> str:
    if is_head_parameter(param_name):
        return "head"
    for marker, method in PARAM_MARKERS.items():
        if marker in param_name:
            module = param_name.split(marker)[0]
            return method + "." + (role_of(module) or module.rsplit(".", 1)[-1])
    if param_name.endswith("bias"):
        return "bias"
    return "other"


def count_trainable(model: nn.Module, limit: int) -> Budget:
    """Group every parameter with ``requires_grad`` (the exact set the optimizer trains)."""
    groups: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            group = _group_of(name)
            groups[group] = groups.get(group, 0) + param.numel()
    methods = tuple(f"{m}." for m in PARAM_MARKERS.values())
    order = sorted(groups, key=lambda g: (not g.startswith(methods), g != "head", g))
    frozen: dict[str, int] = {}
    for name, buffer in model.named_buffers():  # shared buffers are listed once
        for marker, label in FROZEN_MARKERS.items():
            if marker in name:
                frozen[label] = frozen.get(label, 0) + buffer.numel()
    return Budget(limit=limit, groups={g: groups[g] for g in order}, frozen=frozen)


def measure(cfg: ModelConfig, label_names: Sequence[str], limit: int, rank: int | None = None) -> Budget:
    """Count a configuration on its weightless skeleton (milliseconds, no weights read).

    ``rank`` overrides the method's main size knob (see :func:`budgetlora.model.modeling.build_model`).
    """
    return count_trainable(build_model(cfg, label_names, weights=False, rank=rank), limit)


def resolve_rank(cfg: ModelConfig, label_names: Sequence[str], limit: int) -> int:
    """The largest uniform LoRA rank for ``cfg``'s targets and head that fits ``limit``.

    Parameters grow linearly in the rank (rank_pattern entries aside), so two skeleton
    counts give the cost of one rank unit and the fixed part.
    """
    at1 = measure(cfg, label_names, limit, rank=1).trainable
    at2 = measure(cfg, label_names, limit, rank=2).trainable
    per_rank, fixed = at2 - at1, 2 * at1 - at2
    if per_rank <= 0:
        raise BudgetloraError("lora.r: 'auto' needs LoRA target modules that grow with the rank")
    best = (limit - fixed) // per_rank
    if best < 1:
        raise OverBudgetError(
            f"no LoRA rank fits the budget of {limit:,}: the head and other trainable parts alone "
            f"take {fixed + per_rank:,} at rank 1. Try {setting('model.head', 'linear')} or fewer target modules."
        )
    return int(best)


def resolve_size(cfg: ModelConfig, label_names: Sequence[str], limit: int) -> int | None:
    """The largest value of ``cfg.method``'s main size knob that fits ``limit`` (None: IA3, no knob).

    LoRA: :func:`resolve_rank`. The other methods stop at :func:`budgetlora.model.methods.size_cap`
    (more adds no rank, or no parameter); their counts only grow with the size, so the value
    is found from two skeleton counts when the count is linear in it (VeRA, FourierFT, LoHa),
    else by bisection (LoKr, whose factors become full one after another).
    """
    if cfg.method == "lora":
        return resolve_rank(cfg, label_names, limit)
    if SIZE_KEYS[cfg.method] is None:
        return None
    base = load_base_model(cfg, label_names, weights=False)
    modules = dict(base.named_modules())
    names = resolve_targets(base, cfg.lora.target_modules, cfg.lora.layers)
    cap = size_cap(cfg, [(modules[n].in_features, modules[n].out_features) for n in names])
    assert cap is not None  # every method but IA3 has one

    def count(size: int) -> int:
        return measure(cfg, label_names, limit, rank=size).trainable

    at1 = count(1)
    if at1 > limit:
        raise OverBudgetError(
            f"no {SIZE_KEYS[cfg.method]} fits the budget of {limit:,}: {cfg.method} at size 1 with this "
            f"head and these targets takes {at1:,}. Try {setting('model.head', 'linear')} or fewer target modules."
        )
    if cap == 1:
        return 1
    per = count(2) - at1
    guess = cap if per <= 0 else max(1, min(cap, 1 + (limit - at1) // per))
    if count(guess) <= limit and (guess == cap or count(guess + 1) > limit):
        return guess
    low, high = 1, cap  # count(low) fits; find the largest that does
    while low < high:
        mid = (low + high + 1) // 2
        if count(mid) <= limit:
            low = mid
        else:
            high = mid - 1
    return low


def _suggestion(cfg: ModelConfig, label_names: Sequence[str], limit: int) -> str:
    if cfg.method != "lora":
        return _method_suggestion(cfg, label_names, limit)
    tips = []
    try:
        rank = resolve_rank(cfg, label_names, limit)
        tips.append(f"{setting('model.lora.r', rank)} (the largest rank that fits these targets and head)")
    except OverBudgetError:
        pass
    if cfg.head == "default":
        linear = replace(cfg, head="linear")
        with contextlib.suppress(BudgetloraError):
            rank = resolve_rank(linear, label_names, limit)
            tips.append(f"{setting('model.head', 'linear')} with {setting('model.lora.r', rank)}")
    return "; or ".join(tips) if tips else "fewer target modules or layers (see `budgetlora plan`)"


def check_budget(budget: Budget, cfg: ModelConfig, label_names: Sequence[str]) -> None:
    """Raise :class:`OverBudgetError` with the breakdown and what would fit."""
    if budget.fits:
        return
    raise OverBudgetError(
        f"over budget: {budget.trainable:,} trainable parameters > budget {budget.limit:,}\n"
        f"{budget.table()}\n"
        f"would fit: {_suggestion(cfg, label_names, budget.limit)}"
    )


def _method_suggestion(cfg: ModelConfig, label_names: Sequence[str], limit: int) -> str:
    knob = f"model.{SIZE_KEYS[cfg.method]}"
    tips = []
    for head in dict.fromkeys((cfg.head, "linear")):
        variant = replace(cfg, head=head)  # type: ignore[arg-type]
        try:
            size = resolve_size(variant, label_names, limit)
        except BudgetloraError:
            continue
        where = "" if head == cfg.head else f"{setting('model.head', 'linear')} with "
        if size is None:
            if not measure(variant, label_names, limit).fits:
                continue
            tips.append(setting("model.head", head) if head != cfg.head else "")
        elif size != size_of(cfg) or head != cfg.head:
            tips.append(f"{where}{setting(knob, size)}")
    tips = [t for t in tips if t]
    return "; or ".join(tips) if tips else "fewer target modules or layers (see `budgetlora plan --methods`)"
