"""The peft adapter methods budgetlora trains, and the one place each becomes a peft config.

Every method adapts the same Linear modules (``lora.target_modules`` and ``lora.layers``,
resolved by :func:`budgetlora.model.modeling.resolve_targets`), trains the same head
(``modules_to_save``) and merges into the weights for inference. Each has at most one main
size knob (``SIZE_KEYS``), which may be ``auto``: the largest value that fits the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from peft import FourierFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftConfig, VeraConfig
from peft.tuners.lokr.layer import factorization

from budgetlora.config import METHODS, ModelConfig
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
    "size_flag",
]

# method -> its main size knob (model.<key>); IA3 has none: one vector per adapted module.
SIZE_KEYS: dict[str, str | None] = {
    "lora": "lora.r",
    "vera": "vera.r",
    "fourierft": "fourierft.n_frequency",
    "ia3": None,
    "loha": "loha.r",
    "lokr": "lokr.r",
}
# The methods' names as their papers write them (report titles).
TITLES: dict[str, str] = {
    "lora": "LoRA", "vera": "VeRA", "fourierft": "FourierFT", "ia3": "IA3", "loha": "LoHa", "lokr": "LoKr",
}  # fmt: skip
# A trained parameter's name holds one of these -> the method it belongs to (the budget groups).
PARAM_MARKERS: dict[str, str] = {
    ".lora_": "lora",
    ".vera_lambda_": "vera",
    ".fourierft_spectrum": "fourierft",
    ".ia3_l": "ia3",
    ".hada_": "loha",
    ".lokr_": "lokr",
}
# Frozen tensors a method adds (buffers, never trained): reported, not counted.
FROZEN_MARKERS: dict[str, str] = {".vera_A.": "vera.shared_A", ".vera_B.": "vera.shared_B"}


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


def size_flag(method: str) -> str | None:
    """The ``budgetlora train`` option of a method's size knob: --lora-r, --vera-r, ..."""
    key = SIZE_KEYS[method]
    return None if key is None else "--" + key.replace(".", "-").replace("_", "-")


def size_cap(cfg: ModelConfig, shapes: Sequence[tuple[int, int]]) -> int | None:
    """The largest useful size for adapted matrices of these (in, out) shapes.

    LoRA, VeRA and LoHa stop at the matrices' smaller side (a larger rank adds parameters
    and time, not rank to the update); FourierFT at in * out (peft refuses more); LoKr at the
    rank where every low-rank Kronecker factor is full (beyond it only alpha / r changes).
    None for IA3 (no knob).
    """
    if cfg.method == "ia3":
        return None
    if cfg.method == "fourierft":
        return min(i * o for i, o in shapes)
    if cfg.method == "lokr":
        factor = cfg.lokr.decompose_factor
        sides = []
        for i, o in shapes:
            (in_small, in_large), (out_small, out_large) = factorization(i, factor), factorization(o, factor)
            sides.append(max(in_large, out_large))
            if cfg.lokr.decompose_both:
                sides.append(max(in_small, out_small))
        return max(math.ceil(side / 2) for side in sides)
    return min(min(i, o) for i, o in shapes)


def _bias(bias: str, own: str) -> str:
    return own if bias == "lora_only" else bias


def adapter_config(cfg: ModelConfig, targets: list[str], size: int | None, heads: list[str]) -> PeftConfig:
    """The peft config of ``cfg.method`` for these module names, main size knob and head modules.

    ``size`` is the method's main size knob (ignored by IA3). Feed-forward output modules
    (role ffn_out) are IA3 feedforward modules: their input is scaled, as in the IA3 paper.
    """
    common: dict[str, Any] = {"target_modules": targets, "modules_to_save": heads, "task_type": "SEQ_CLS"}
    if cfg.method != "ia3" and not isinstance(size, int):
        raise BudgetloraError(f"{SIZE_KEYS[cfg.method]} is 'auto': resolve it with budget.resolve_size first")
    lora = cfg.lora
    if cfg.method == "lora":
        return LoraConfig(
            r=size,  # type: ignore[arg-type]
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft accepts a float scale
            lora_dropout=lora.dropout,
            bias=lora.bias,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            rank_pattern=dict(lora.rank_pattern),
            alpha_pattern=dict(lora.alpha_pattern),
            **common,
        )
    if cfg.method == "vera":
        return VeraConfig(
            r=size,  # type: ignore[arg-type]
            d_initial=cfg.vera.d_initial,
            projection_prng_key=cfg.vera.projection_prng_key,
            save_projection=cfg.vera.save_projection,
            bias=_bias(lora.bias, "vera_only"),
            **common,
        )
    if cfg.method == "fourierft":
        return FourierFTConfig(
            n_frequency=size,  # type: ignore[arg-type]
            scaling=cfg.fourierft.scaling,
            random_loc_seed=cfg.fourierft.random_loc_seed,
            bias=_bias(lora.bias, "fourier_only"),
            **common,
        )
    if cfg.method == "ia3":
        feedforward = [name for name in targets if role_of(name) == "ffn_out"]
        return IA3Config(feedforward_modules=feedforward, **common)
    if cfg.method == "loha":
        return LoHaConfig(r=size, alpha=cfg.loha.alpha, **common)  # type: ignore[arg-type]
    if cfg.method == "lokr":
        return LoKrConfig(
            r=size,  # type: ignore[arg-type]
            alpha=cfg.lokr.alpha,  # type: ignore[arg-type]
            decompose_factor=cfg.lokr.decompose_factor,
            decompose_both=cfg.lokr.decompose_both,
            **common,
        )
    raise BudgetloraError(f"invalid value for model.method: {cfg.method!r} (allowed: {', '.join(METHODS)})")
