"""The peft adapter methods budgetlora trains, and the one place each becomes a peft config.

Each method is one record, :data:`budgetlora.config.ADAPTER_METHODS` (its settings, size knob,
the parameters it trains, peft's config class): a plain record in the config module, which the
config tree beneath this one checks options with and the CLI titles its help with, without
importing peft. This module is the peft side: :func:`adapter_config` makes peft's config from a
record, :func:`size_cap` knows where a size stops adding rank.

Every method adapts the same Linear modules (``lora.target_modules`` and ``lora.layers``,
resolved by :func:`budgetlora.model.modeling.resolve_targets`), trains the same head
(``modules_to_save``) and merges into the weights for inference. Each has at most one main
size knob (``SIZE_KEYS``), which may be ``auto``: the largest value that fits the budget.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import peft
from peft import PeftConfig
from peft.tuners.lokr.layer import factorization

from budgetlora.config import ADAPTER_METHODS, METHODS, ModelConfig
from budgetlora.errors import BudgetloraError
from budgetlora.model.roles import role_of

__all__ = [
    "METHODS",
    "SIZE_KEYS",
    "TITLES",
    "PARAM_MARKERS",
    "FROZEN_MARKERS",
    "adapter_config",
    "size_of",
    "with_size",
    "size_cap",
]

# Views of the records, by what each asks.
# method -> its main size knob (model.<key>); IA3 has none: one vector per adapted module.
SIZE_KEYS: dict[str, str | None] = {m.name: m.size_knob for m in ADAPTER_METHODS.values()}
# The methods' names as their papers write them (report titles).
TITLES: dict[str, str] = {m.name: m.title for m in ADAPTER_METHODS.values()}
# A trained parameter's name holds one of these -> the method it belongs to (the budget groups).
PARAM_MARKERS: dict[str, str] = {m.trains: m.name for m in ADAPTER_METHODS.values()}
# Frozen tensors a method adds (buffers, never trained): reported, not counted.
FROZEN_MARKERS: dict[str, str] = {k: v for m in ADAPTER_METHODS.values() for k, v in m.frozen.items()}


def size_of(cfg: ModelConfig) -> int | str | None:
    """The value of ``cfg.method``'s main size knob (None for IA3)."""
    key = SIZE_KEYS[cfg.method]
    if key is None:
        return None
    block, knob = key.split(".")
    return getattr(getattr(cfg, block), knob)  # type: ignore[no-any-return]


def with_size(cfg: ModelConfig, size: int) -> ModelConfig:
    """``cfg`` with its method's main size knob set to ``size`` (IA3: unchanged)."""
    key = SIZE_KEYS[cfg.method]
    if key is None:
        return cfg
    block, knob = key.split(".")
    return replace(cfg, **{block: replace(getattr(cfg, block), **{knob: size})})


def size_cap(cfg: ModelConfig, shapes: Sequence[tuple[int, int]]) -> int | None:
    """The largest useful size for adapted matrices of these (in, out) shapes, by the method's
    record (``size_stops``); None for a method without a size knob (IA3).

    LoRA, VeRA and LoHa stop at the matrices' smaller side (a larger rank adds parameters
    and time, not rank to the update); FourierFT at in * out (peft refuses more); LoKr at the
    rank where every low-rank Kronecker factor is full (beyond it only alpha / r changes).
    """
    method = ADAPTER_METHODS[cfg.method]
    if method.size_knob is None:
        return None
    if method.size_stops == "area":
        return min(i * o for i, o in shapes)
    if method.size_stops == "kronecker":
        return _kronecker_cap(getattr(cfg, str(method.settings)), shapes)
    return min(min(i, o) for i, o in shapes)


def _kronecker_cap(settings: Any, shapes: Sequence[tuple[int, int]]) -> int:
    """The rank where every low-rank factor of peft's Kronecker split of these shapes is full."""
    sides = []
    for i, o in shapes:
        (in_small, in_large), (out_small, out_large) = (
            factorization(i, settings.decompose_factor),
            factorization(o, settings.decompose_factor),
        )
        sides.append(max(in_large, out_large))
        if settings.decompose_both:
            sides.append(max(in_small, out_small))
    return max(math.ceil(side / 2) for side in sides)


def adapter_config(cfg: ModelConfig, targets: list[str], size: int | None, heads: list[str]) -> PeftConfig:
    """The peft config of ``cfg.method`` for these module names, main size knob and head modules.

    ``size`` is the method's main size knob (ignored by a method without one). The settings'
    fields go to peft under their own names (or the record's ``peft_names``); ``lora.bias``
    to the methods that train biases; the feed-forward output modules (role ffn_out) to a
    method that scales their input (IA3, as in its paper).
    """
    method = ADAPTER_METHODS.get(cfg.method)
    if method is None:
        raise BudgetloraError(
            f"invalid value for model.method: {cfg.method!r} (allowed: {', '.join(METHODS)})"
        )
    if method.size_knob is not None and not isinstance(size, int):
        raise BudgetloraError(f"{method.size_knob} is 'auto': resolve it with budget.resolve_size first")
    fields: dict[str, Any] = {"target_modules": targets, "modules_to_save": heads, "task_type": "SEQ_CLS"}
    if method.settings is not None:
        settings = getattr(cfg, method.settings)
        for f in dataclasses.fields(settings):
            name = method.peft_names.get(f.name, f.name)
            value = size if f"{method.settings}.{f.name}" == method.size_knob else getattr(settings, f.name)
            if name is not None:
                fields[name] = dict(value) if isinstance(value, dict) else value  # peft keeps the mapping
    if method.bias is not None:
        fields["bias"] = method.bias if cfg.lora.bias == "lora_only" else cfg.lora.bias
    if method.feedforward:
        fields["feedforward_modules"] = [name for name in targets if role_of(name) == "ffn_out"]
    return getattr(peft, method.peft_config)(**fields)  # type: ignore[no-any-return]
