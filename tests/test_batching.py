"""Tokenization (truncation as the tokenizer's own, the on-disk cache) and length-grouped batches."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from budgetlora.data.batching import (
    Collator,
    cache_dir,
    cache_key,
    encode,
    length_grouped_batches,
    sorted_batches,
)
from conftest import AG_NEWS_SAMPLE, ROBERTA_TOKENIZER, requires_shared


def _sample_texts(n: int) -> list[str]:
    with AG_NEWS_SAMPLE.open(encoding="utf-8") as fh:
        return [f"{title} {desc}".replace("\\n", " ") for _, title, desc in list(csv.reader(fh))[:n]]


@requires_shared
def test_truncation_equals_the_tokenizers_own() -> None:
    tokenizer = AutoTokenizer.from_pretrained(ROBERTA_TOKENIZER)
    assert tokenizer("Hello world")["input_ids"] == [0, 31414, 232, 2]
    texts = _sample_texts(300)
    for max_length in (16, 48, 128):
        encoded = encode(texts, None, tokenizer, max_length, use_cache=False)
        expected = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        assert [encoded.row(i).tolist() for i in range(len(texts))] == expected
        full = [len(x) for x in tokenizer(texts)["input_ids"]]
        assert encoded.full_lengths.tolist() == full


def test_cache_returns_the_same_arrays(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["team wins the match", "market shares fall", "new chip for phones"]
    first = encode(texts, np.array([1, 2, 3]), tokenizer, 32)
    files = list((cache_dir() / "tokens").glob("*.npz"))
    assert len(files) >= 1
    second = encode(texts, np.array([1, 2, 3]), tokenizer, 32)
    assert np.array_equal(first.flat, second.flat) and np.array_equal(first.offsets, second.offsets)
    assert len(list((cache_dir() / "tokens").glob("*.npz"))) == len(files)  # read, not written again
    other = encode(texts, None, tokenizer, 8)  # another max length is another entry
    assert other.lengths.max() <= 8


def test_a_damaged_cache_entry_is_rebuilt(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["team wins the match", "market shares fall"]
    first = encode(texts, None, tokenizer, 32)
    entry = cache_dir() / "tokens" / f"{cache_key(texts, tokenizer, 32)}.npz"
    entry.write_bytes(b"not a numpy file")  # e.g. a disk that filled up mid-write elsewhere
    again = encode(texts, None, tokenizer, 32)
    assert np.array_equal(first.flat, again.flat) and np.array_equal(first.offsets, again.offsets)
    with np.load(entry) as rebuilt:
        assert np.array_equal(rebuilt["flat"], first.flat)


def test_length_grouped_batches_cover_each_sample_once_and_cut_padding() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, size=1000)
    batches = length_grouped_batches(lengths, 16, seed=1, epoch=0)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert sorted(len(b) for b in batches) == [8] + [16] * 62
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random_order = length_grouped_batches(lengths, 16, seed=1, epoch=0, group_by_length=False)
    padded_random = sum(len(b) * lengths[b].max() for b in random_order)
    waste, waste_random = 1 - lengths.sum() / padded, 1 - lengths.sum() / padded_random
    assert waste < 0.05 < 0.3 < waste_random
    assert lengths[batches[0]].max() == lengths.max()  # longest batch first
    # Deterministic for (seed, epoch); another epoch is another order.
    assert all(
        np.array_equal(a, b)
        for a, b in zip(batches, length_grouped_batches(lengths, 16, seed=1, epoch=0), strict=True)
    )
    assert not np.array_equal(np.concatenate(length_grouped_batches(lengths, 16, seed=1, epoch=1)), flat)


def test_batches_split_across_processes() -> None:
    lengths = np.arange(1, 102)  # 101 samples, 2 processes: one sample repeated to even them out
    per_rank = [length_grouped_batches(lengths, 8, seed=3, epoch=0, world_size=2, rank=r) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    seen = np.concatenate([np.concatenate(b) for b in per_rank])
    assert len(seen) == 102 and set(seen.tolist()) == set(range(101))
    for a, b in zip(*per_rank, strict=True):
        assert len(a) == len(b)
    inference = [sorted_batches(lengths, 10, world_size=2, rank=r) for r in range(2)]
    scored = np.concatenate([np.concatenate(b) for b in inference])
    assert sorted(scored.tolist()) == list(range(101))  # each sample exactly once


def test_collator_pads_per_batch() -> None:
    from budgetlora.data.batching import Encoded

    enc = Encoded(
        flat=np.array([5, 6, 7, 8, 9, 10], dtype=np.int32),
        offsets=np.array([0, 1, 3, 6]),
        full_lengths=np.array([1, 2, 3], dtype=np.int32),
        labels=np.array([0, 1, 2]),
    )
    batch = Collator(enc, pad_token_id=1, pad_to_multiple_of=4)(np.array([2, 0]))
    assert batch["input_ids"].tolist() == [[8, 9, 10, 1], [5, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [2, 0] and batch["index"].tolist() == [2, 0]


@pytest.mark.parametrize("max_length", [8])
def test_a_one_megabyte_text_is_truncated(tiny_model_dir: Path, max_length: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = encode(["market " * 150_000], None, tokenizer, max_length, use_cache=False)
    assert encoded.lengths.tolist() == [max_length]
    assert encoded.full_lengths[0] > 100_000
