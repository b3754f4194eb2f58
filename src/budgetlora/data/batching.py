"""Tokenize once (cached on disk), then batch by length so that almost nothing is padding."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from budgetlora.rundir import atomic_path

__all__ = [
    "Encoded",
    "encode",
    "cache_dir",
    "cache_key",
    "pad_id",
    "length_grouped_batches",
    "sorted_batches",
    "Collator",
    "iterate",
]


@dataclass(frozen=True)
class Encoded:
    """Token ids of a split, truncated, unpadded: row i is ``flat[offsets[i]:offsets[i+1]]``."""

    flat: np.ndarray  # (total_tokens,) int32
    offsets: np.ndarray  # (n + 1,) int64
    full_lengths: np.ndarray  # (n,) int32, token counts before truncation
    labels: np.ndarray | None  # (n,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]


def cache_dir() -> Path:
    """Where tokenized splits are cached: $BUDGETLORA_CACHE, else ~/.cache/budgetlora."""
    if os.environ.get("BUDGETLORA_CACHE"):
        return Path(os.environ["BUDGETLORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "budgetlora"


def cache_key(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int, *extra: str) -> str:
    """A key for anything computed from ``texts`` through ``tokenizer`` at ``max_length``
    (``extra`` names whatever else it depends on, e.g. a teacher model)."""
    digest = hashlib.sha256()
    for part in extra:
        digest.update(part.encode() + b"|")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    digest.update(f"|{max_length}|{len(texts)}|".encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id batches are padded with (0 for tokenizers without a pad token)."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def _truncate(ids: list[int], max_length: int, specials: set[int]) -> list[int]:
    # As the tokenizer's own truncation of a single sequence: cut the content, keep the
    # closing special token (</s>, [SEP]) when the template adds one.
    if len(ids) <= max_length:
        return ids
    if ids[-1] in specials:
        return ids[: max_length - 1] + ids[-1:]
    return ids[:max_length]


def encode(
    texts: Sequence[str],
    labels: np.ndarray | None,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    use_cache: bool = True,
) -> Encoded:
    """Tokenize ``texts`` with truncation and no padding; a second call with the same
    texts, tokenizer and max length reads the result from the on-disk cache."""
    path = cache_dir() / "tokens" / f"{cache_key(texts, tokenizer, max_length)}.npz"
    if use_cache and path.is_file():
        try:
            with np.load(path) as cached:
                return Encoded(cached["flat"], cached["offsets"], cached["full_lengths"], labels)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt below
    specials = set(tokenizer.all_special_ids)
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    full_lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    rows = [_truncate(x, max_length, specials) for x in ids]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, flat=flat, offsets=offsets, full_lengths=full_lengths)
    return Encoded(flat, offsets, full_lengths, labels)


def length_grouped_batches(
    lengths: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    world_size: int = 1,
    rank: int = 0,
    group_by_length: bool = True,
    window_batches: int = 64,
) -> list[np.ndarray]:
    """This process's training batches for one epoch, as index arrays.

    Shuffle with (seed, epoch); then, in windows of ``window_batches`` global batches,
    sort by length so each batch holds samples of similar length; then shuffle the
    batch order. A global batch (``batch_size * world_size`` samples) is dealt out
    across processes, so every process sees the same number of batches of similar
    length. For several processes the order is padded to a multiple of the world size
    by repeating its first samples, as a distributed sampler does.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    global_size = batch_size * world_size
    if world_size > 1 and len(order) % world_size:
        order = np.concatenate([order, order[: world_size - len(order) % world_size]])
    if group_by_length:
        window = global_size * window_batches
        chunks = [order[i : i + window] for i in range(0, len(order), window)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    batches = [order[i : i + global_size] for i in range(0, len(order), global_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if group_by_length and batches:
        # The longest batch first: an out-of-memory error shows at step 1, not at step 900.
        longest = int(np.argmax([lengths[b].max() for b in batches]))
        batches.insert(0, batches.pop(longest))
    return [b[rank::world_size] for b in batches]


def sorted_batches(
    lengths: np.ndarray, batch_size: int, *, world_size: int = 1, rank: int = 0
) -> list[np.ndarray]:
    """Inference batches: all samples sorted by length (longest first), dealt out to processes.

    Every sample is in exactly one batch of exactly one process.
    """
    order = np.argsort(-lengths, kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[rank::world_size]


class Collator:
    """Pads a batch to its longest row (rounded up to ``pad_to_multiple_of``)."""

    def __init__(self, encoded: Encoded, pad_token_id: int, pad_to_multiple_of: int = 1) -> None:
        self.encoded = encoded
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        rows = [self.encoded.row(int(i)) for i in indices]
        width = max(len(r) for r in rows)
        width = -(-width // self.multiple) * self.multiple
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, row in enumerate(rows):
            input_ids[j, : len(row)] = row
            attention_mask[j, : len(row)] = 1
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "index": torch.from_numpy(np.asarray(indices, dtype=np.int64)),
        }
        if self.encoded.labels is not None:
            batch["labels"] = torch.from_numpy(self.encoded.labels[np.asarray(indices)].astype(np.int64))
        return batch


def iterate(
    batches: list[np.ndarray], collate: Collator, *, num_workers: int = 0, pin_memory: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches in order; through a DataLoader when workers or pinned memory are asked for.

    ``num_workers`` processes collate ahead of the loop; ``pin_memory`` puts each batch in
    page-locked memory, so that ``.to(device, non_blocking=True)`` overlaps compute.
    """
    if num_workers == 0 and not pin_memory:
        for b in batches:
            yield collate(b)
        return
    # A list of index arrays is a map-style dataset whose items are whole batches:
    # batch_size=None hands each one to the collator as it is.
    dataset: Any = batches
    collate_fn: Any = collate  # typed by torch as taking a list of samples; here it takes a batch
    loader: torch.utils.data.DataLoader[dict[str, torch.Tensor]] = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Its own generator: a DataLoader draws worker seeds from the global RNG otherwise,
        # which shifts every later dropout mask (and a resumed run's masks from the
        # uninterrupted run's). Collating draws no random numbers.
        generator=torch.Generator().manual_seed(0),
    )
    yield from loader
