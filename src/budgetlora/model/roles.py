"""Which module of an encoder does what, read from its dotted name: its role (query, key,
value, attn_out, ffn_in, ffn_out) and the encoder layer it belongs to. Names only: nothing
here loads or builds a model."""

from __future__ import annotations

import re

__all__ = [
    "ROLES",
    "ROLE_GROUPS",
    "HEAD_MODULES",
    "layer_index",
    "role_of",
    "matches_role",
    "short_name",
    "is_head_parameter",
    "is_head_output",
]

# Role name -> regexes over full module names, one per architecture family:
# BERT/RoBERTa/ELECTRA/DeBERTa-v2 (attention.self.query[_proj]), MPNet (attention.attn.q),
# DistilBERT (attention.q_lin), ModernBERT (attn.Wqkv: query, key and value are one matrix),
# ALBERT (albert_layers.0.attention.query; its ffn and ffn_output sit beside the attention).
ROLES: dict[str, tuple[str, ...]] = {
    "query": (
        r"attention\.self\.query(_proj)?$",
        r"attention\.attn\.q$",
        r"attention\.q_lin$",
        r"attn\.Wqkv$",
        r"albert_layers\.\d+\.attention\.query$",
    ),
    "key": (
        r"attention\.self\.key(_proj)?$",
        r"attention\.attn\.k$",
        r"attention\.k_lin$",
        r"attn\.Wqkv$",
        r"albert_layers\.\d+\.attention\.key$",
    ),
    "value": (
        r"attention\.self\.value(_proj)?$",
        r"attention\.attn\.v$",
        r"attention\.v_lin$",
        r"attn\.Wqkv$",
        r"albert_layers\.\d+\.attention\.value$",
    ),
    "attn_out": (
        r"attention\.output\.dense$",
        r"attention\.attn\.o$",
        r"attention\.out_lin$",
        r"attn\.Wo$",
        r"albert_layers\.\d+\.attention\.dense$",
    ),
    "ffn_in": (r"intermediate\.dense$", r"ffn\.lin1$", r"mlp\.Wi$", r"albert_layers\.\d+\.ffn$"),
    "ffn_out": (
        r"layers?\.\d+\.output\.dense$",
        r"ffn\.lin2$",
        r"mlp\.Wo$",
        r"albert_layers\.\d+\.ffn_output$",
    ),
}
ROLE_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("query", "key", "value", "attn_out"),
    "all": ("query", "key", "value", "attn_out", "ffn_in", "ffn_out"),
}
# ALBERT's layers share their weights: each of its layer groups (one in albert-base-v2) is a
# single set of modules that every layer of the group runs, so its group is its "layer".
_LAYER = re.compile(r"\.(?:layer|layers|albert_layer_groups)\.(\d+)\.")


def layer_index(module_name: str) -> int | None:
    """The encoder layer a module belongs to, from its dotted name (None outside the layers;
    ALBERT's layer group)."""
    match = _LAYER.search(module_name)
    return int(match.group(1)) if match else None


def role_of(module_name: str) -> str | None:
    """The role name (query, key, ...) of a module, or None."""
    for role, patterns in ROLES.items():
        if any(re.search(p, module_name) for p in patterns):
            return role
    return None


def matches_role(name: str, role: str) -> bool:
    """Whether a full module name plays this role."""
    return any(re.search(p, name) for p in ROLES[role])


def short_name(name: str) -> str:
    """A module name without its encoder-layer prefix (``attention.self.query``)."""
    match = _LAYER.search(name)
    return name[match.end() :] if match else name


# The classification head: these attributes of a sequence-classification model (BERT's
# classifier, RoBERTa's and MPNet's classifier.dense + classifier.out_proj, DistilBERT's
# pre_classifier + classifier, DeBERTa's pooler (a dense layer that its checkpoints do not
# ship) + classifier, score in decoder-style models). BERT's pretrained pooler sits inside
# the encoder (bert.pooler), not here.
HEAD_MODULES = ("pre_classifier", "pooler", "classifier", "score")


def is_head_parameter(name: str) -> bool:
    """Whether a parameter of a peft model belongs to the trained head (peft's trained copy,
    ``modules_to_save``)."""
    return "modules_to_save" in name


def is_head_output(key: str) -> bool:
    """Whether a saved tensor is the weight of the head's last layer, (labels, hidden): its
    rows are the labels."""
    parts = key.split(".")
    return parts[-1] == "weight" and (
        parts[-2] in ("classifier", "score") or parts[-3:-1] == ["classifier", "out_proj"]
    )
