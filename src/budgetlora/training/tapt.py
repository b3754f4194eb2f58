"""Task-adaptive pretraining (``tapt.*``): masked-LM steps on the run's texts through the same
adapter, before the classifier trains.

The checkpoint's own masked-LM model is loaded beside the classification model, and its
encoder is replaced by the classification model's (the one the adapter sits in), so the
masked-LM loss trains exactly the adapter weights the budget counts; the pretrained MLM head
stays frozen and is dropped afterwards. A checkpoint that ships no MLM head (sentence
encoders such as all-MiniLM-L6-v2 or all-mpnet-base-v2) is refused: a freshly initialised
head would have to learn the vocabulary from these texts first, which is not what TAPT is.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from budgetlora.config import RunConfig
from budgetlora.errors import BudgetloraError
from budgetlora.runtime import Runtime, is_main_process

__all__ = ["load_mlm_head", "pretrain"]


def load_mlm_head(name_or_path: str) -> nn.Module:
    """The checkpoint's masked-LM model, or a clear error if it ships no MLM head."""
    from transformers import AutoModelForMaskedLM

    try:
        mlm, info = AutoModelForMaskedLM.from_pretrained(name_or_path, output_loading_info=True)
    except (ValueError, KeyError) as err:  # no masked-LM class for this architecture
        raise BudgetloraError(f"tapt.steps: {name_or_path} has no masked-LM form: {err}") from err
    prefix = mlm.base_model_prefix
    head_missing = sorted(k for k in info["missing_keys"] if not k.startswith(prefix + "."))
    if head_missing:
        raise BudgetloraError(
            f"tapt.steps: {name_or_path} ships no pretrained masked-LM head ({', '.join(head_missing[:3])} "
            f"{'and more ' if len(head_missing) > 3 else ''}missing), which TAPT needs: use a checkpoint "
            "that has one (roberta-base does), or tapt.steps 0"
        )
    return mlm  # type: ignore[no-any-return]


def _encoder_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The transformers model inside a peft model, and the attribute that holds its encoder."""
    inner: Any = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    prefix = str(inner.base_model_prefix)
    return getattr(inner, prefix), prefix


def pretrain(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], cfg: RunConfig, runtime: Runtime
) -> dict[str, Any]:
    """``cfg.tapt.steps`` masked-LM steps on ``texts`` through the adapter inside ``model`` (a
    peft classification model, trained in place). Returns the first and last losses."""
    settings = cfg.tapt
    mlm, encoder, prefix = _mlm_sharing_encoder(model, tokenizer, cfg)
    mlm.to(runtime.device).train()
    start = time.perf_counter()
    losses = _mlm_steps(mlm, encoder, tokenizer, texts, cfg, runtime)
    setattr(mlm, prefix, nn.Identity())  # the encoder lives on in ``model``; the head goes
    del mlm
    window = max(1, min(20, math.ceil(len(losses) / 5)))
    summary = {
        "steps": settings.steps,
        "texts": len(texts),
        "first_loss": float(np.mean(losses[:window])),
        "last_loss": float(np.mean(losses[-window:])),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if is_main_process():
        print(
            f"tapt: {settings.steps} masked-LM steps on {len(texts):,} texts, loss "
            f"{summary['first_loss']:.3f} -> {summary['last_loss']:.3f}",
            flush=True,
        )
    return summary


def _mlm_sharing_encoder(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: RunConfig
) -> tuple[nn.Module, nn.Module, str]:
    """The checkpoint's masked-LM model with its head frozen and its encoder replaced by the one
    ``model``'s adapter sits in; also that encoder and the attribute that holds it."""
    if tokenizer.mask_token_id is None:
        raise BudgetloraError(f"tapt.steps: the tokenizer of {cfg.model.name_or_path} has no mask token")
    mlm = load_mlm_head(cfg.model.name_or_path)
    encoder, prefix = _encoder_of(model)
    if mlm.base_model_prefix != prefix:
        raise BudgetloraError(
            f"tapt.steps: the masked-LM model of {cfg.model.name_or_path} holds its encoder elsewhere"
        )
    for param in mlm.parameters():
        param.requires_grad_(False)
    setattr(mlm, prefix, encoder)  # the adapter's encoder, shared: the MLM loss trains the adapter
    return mlm, encoder, prefix


def _mlm_steps(
    mlm: nn.Module,
    encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    cfg: RunConfig,
    runtime: Runtime,
) -> list[float]:
    """The masked-LM steps, each on a seeded sample of ``texts``; the loss of each step."""
    from transformers import DataCollatorForLanguageModeling, get_scheduler

    settings, train = cfg.tapt, cfg.train
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.mlm_lr or train.lr, weight_decay=train.weight_decay)
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=int(0.06 * settings.steps), num_training_steps=settings.steps
    )
    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=settings.mask_probability)
    encoded = tokenizer(texts, truncation=True, max_length=cfg.data.max_length)["input_ids"]
    rng = np.random.default_rng(train.seed)  # the rows of each step; the masks come from torch's seeded RNG
    losses: list[float] = []
    for _ in range(settings.steps):
        rows = rng.choice(len(encoded), size=min(train.batch_size, len(encoded)), replace=False)
        batch = {
            k: v.to(runtime.device) for k, v in collate([{"input_ids": encoded[i]} for i in rows]).items()
        }
        with runtime.accelerator.autocast():
            loss = mlm(**batch).loss
        loss.backward()
        if train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses
