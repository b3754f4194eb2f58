"""A trained run reloaded for inference, and batched forward passes over an encoded split:
the fast path of evaluation, prediction and distillation's teacher.

Batches sorted by length (almost no padding), ``inference_mode``, batches pinned and
copied asynchronously where the device plan says so, logits kept on the device until the
end; with several processes each scores its share and all get every row, once.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from budgetlora.config import RunConfig, load_config
from budgetlora.data.batching import Collator, Encoded, encode, iterate, pad_id, sorted_batches
from budgetlora.errors import BudgetloraError, option
from budgetlora.model.modeling import check_max_length, load_base_model, load_tokenizer
from budgetlora.rundir import CONFIG, RunFolder, check_run_dir, tokenizer_source
from budgetlora.runtime import Runtime, make_runtime, unwrap

__all__ = [
    "LoadedRun",
    "read_run_config",
    "load_run",
    "inference_model",
    "predict_logits",
    "check_batch_size",
]


@dataclass
class LoadedRun:
    """A trained run ready for inference: LoRA merged, eval mode, on its device, in the
    inference dtype of its device plan (bf16 where training autocast to bf16)."""

    cfg: RunConfig
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    label_names: tuple[str, ...]
    runtime: Runtime

    def logits(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        progress: bool = False,
        use_cache: bool = True,
    ) -> np.ndarray:
        """(n, num_labels) logits for ``texts``, in their order, on the fast path."""
        encoded = encode(list(texts), None, self.tokenizer, self.cfg.data.max_length, use_cache=use_cache)
        return predict_logits(
            self.model,
            encoded,
            self.runtime,
            batch_size=batch_size,
            pad_token_id=pad_id(self.tokenizer),
            progress=progress,
        )


def check_batch_size(batch_size: int | None) -> None:
    """Refuse an inference batch size that is not a positive integer (None: the device plan's)."""
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise BudgetloraError(
            f"invalid value for {option('batch_size')}: {batch_size!r} (a positive integer)"
        )


def read_run_config(run_dir: Path, model: str | None) -> RunConfig:
    """A run folder's config (base model replaced by ``model``), checked before any weights load."""
    check_run_dir(run_dir)
    cfg = load_config(RunFolder(run_dir).config)
    if model is not None:
        cfg = replace(cfg, model=replace(cfg.model, name_or_path=model))
    if not cfg.data.label_names:
        raise BudgetloraError(f"{run_dir / CONFIG} records no data.label_names")
    check_max_length(cfg.model, cfg.data.max_length)
    return cfg


def load_run(
    run_dir: str | Path,
    *,
    model: str | None = None,
    mixed_precision: str | None = None,
    cfg: RunConfig | None = None,
) -> LoadedRun:
    """Rebuild the base model, load the adapter and head, and merge them for inference.

    ``model`` replaces the base model path recorded in the run (e.g. a local copy);
    ``mixed_precision`` defaults to the run's own training setting. ``cfg``: the run's
    config as :func:`read_run_config` already read and checked it (not read twice).
    """
    run_dir = Path(run_dir)
    cfg = cfg if cfg is not None else read_run_config(run_dir, model)
    label_names = cfg.data.label_names
    assert label_names is not None
    runtime = make_runtime(mixed_precision or cfg.train.mixed_precision)
    base = load_base_model(cfg.model, label_names, weights=True)
    try:
        peft_model = PeftModel.from_pretrained(base, str(run_dir))
    except (ValueError, RuntimeError, KeyError) as err:
        raise BudgetloraError(
            f"the adapter in {run_dir} does not fit the model {cfg.model.name_or_path!r} "
            f"({type(base).__name__}): {str(err).splitlines()[0][:300]}. Pass the base model the run "
            f"was trained on with {option('model')}"
        ) from err
    merged = inference_model(peft_model, runtime)
    tokenizer = load_tokenizer(tokenizer_source(run_dir, cfg.model.name_or_path))
    return LoadedRun(cfg, merged, tokenizer, tuple(label_names), runtime)


def inference_model(model: nn.Module, runtime: Runtime, *, keep: bool = False) -> nn.Module:
    """The fast form of a model for inference: LoRA merged into the weights (in float32,
    as every model loads), eval mode, on the runtime's device, cast once to its plan's
    inference dtype (bf16 where training autocasts to bf16), so that no forward autocasts.

    Every inference path goes through here (a run reloaded for evaluate/predict, a teacher,
    the final metrics of a training run), so they all score with the same numbers.
    ``keep``: merge a copy and leave ``model`` as it is (a training model), else ``model``
    itself is merged.
    """
    if keep:
        model = copy.deepcopy(model)
    if isinstance(model, PeftModel):
        _unwrap_saved_modules(model)
        model = model.merge_and_unload()
    model.eval()
    return model.to(runtime.device, runtime.plan.inference_dtype)  # type: ignore[arg-type]


def _unwrap_saved_modules(model: PeftModel) -> None:
    """Put each trained head copy (``modules_to_save``) in its wrapper's place, as unloading does.

    Done here because peft's generic unloading (VeRA, FourierFT, LoHa, LoKr, IA3; LoRA has
    its own) copies ``weight`` onto the unwrapped module, and a head module such as
    RoBERTa's classifier (dense + out_proj) has none: it raises AttributeError.
    """
    wrappers = [(name, m) for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for name, wrapper in wrappers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        active = wrapper.active_adapters
        setattr(parent, child, wrapper.modules_to_save[active[0]] if active else wrapper.original_module)


def predict_logits(
    model: nn.Module,
    encoded: Encoded,
    runtime: Runtime,
    *,
    batch_size: int | None = None,
    pad_token_id: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Logits for every row of ``encoded``, in input order: (n, num_labels) float32.

    ``model`` may be a training model (fp32 weights: autocast to the run's precision, the
    bare module: DDP's forward would sync buffers across processes that score different
    numbers of batches, and evaluation stays off a compiled training graph) or a merged
    inference model already in half precision (no autocast). ``batch_size`` None: the
    device plan's (256 on a GPU, 16 on a CPU).
    """
    model = unwrap(runtime.accelerator, model)
    device = runtime.device
    batches = sorted_batches(
        encoded.lengths,
        batch_size or runtime.plan.inference_batch_size,
        world_size=runtime.num_processes,
        rank=runtime.process_index,
    )
    collate = Collator(encoded, pad_token_id, runtime.plan.pad_to_multiple_of)
    fp32_weights = next(model.parameters()).dtype == torch.float32
    was_training = model.training
    model.eval()
    indices: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    loader = iterate(batches, collate, pin_memory=runtime.plan.pin_memory)
    shown = progress and runtime.is_main_process
    with torch.inference_mode(), runtime.accelerator.autocast() if fp32_weights else nullcontext():
        for batch in tqdm(loader, total=len(batches), desc="predict", unit="batch", disable=not shown):
            logits = model(
                input_ids=batch["input_ids"].to(device, non_blocking=True),
                attention_mask=batch["attention_mask"].to(device, non_blocking=True),
            ).logits  # (batch, labels)
            outputs.append(logits.float())
            indices.append(batch["index"])
    model.train(was_training)
    num_labels = int(outputs[0].shape[1]) if outputs else 0
    # One device-to-host copy at the end, not one per batch.
    parts = [(torch.cat(indices).numpy(), torch.cat(outputs).cpu().numpy())] if outputs else []
    if runtime.num_processes > 1:
        parts = [p for chunk in gather_object([parts]) for p in chunk]
        num_labels = max((p[1].shape[1] for p in parts), default=0)
    out = np.zeros((len(encoded), num_labels), dtype=np.float32)
    seen = np.zeros(len(encoded), dtype=bool)
    for rows, logits_np in parts:
        out[rows] = logits_np
        seen[rows] = True
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} rows were not scored")
    return out
