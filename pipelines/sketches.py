"""Mergeable summaries of a score column, computed per shard and merged on the driver in bounded memory.

- `FixedHistogram`: counts in fixed bins (the report's CLIP-score histogram); merge = add.
- Exact rank selection by radix histograms (the CLIP-score percentile, DataComp-style "keep the top
  f"): a float32 maps to a uint32 whose order is the float order (`ordered_bits`); pass 1 counts the
  high 16 bits per shard, the driver adds the counts (at most 65536 bins, whatever the row count) and
  finds the bin holding the cut rank; pass 2 counts the low 16 bits of the rows in that bin, which
  gives the exact cut value; ties at that value are broken by key (pass 3 collects, per shard, the
  smallest tied keys, at most as many as the cut still needs). Exact, unlike a KLL/t-digest sketch,
  at the price of two more reads of one column; every pass is a sum of per-shard results.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HI_BINS = 1 << 16


def ordered_bits(scores: np.ndarray) -> np.ndarray:
    """float32 -> uint32 with the same order (NaN excluded by the caller): flip all bits of negatives,
    the sign bit of positives."""
    bits = np.ascontiguousarray(scores, np.float32).view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def from_ordered_bits(bits: int) -> float:
    bits = np.uint32(bits)
    raw = bits & np.uint32(0x7FFFFFFF) if bits >> 31 else ~bits
    return float(np.array([raw], np.uint32).view(np.float32)[0])


def sparse_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, counts): a shard's histogram without a dense array per shard."""
    bins, counts = np.unique(values, return_counts=True)
    return bins.astype(np.int64), counts.astype(np.int64)


def hi_counts(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1 of a shard: counts of the high 16 ordered bits."""
    return sparse_counts(ordered_bits(scores) >> 16)


def lo_counts(scores: np.ndarray, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2 of a shard: counts of the low 16 bits among rows whose high bits are `hi`."""
    bits = ordered_bits(scores)
    return sparse_counts(bits[(bits >> 16) == hi] & 0xFFFF)


@dataclass
class RankCut:
    """Accumulates per-shard counts and finds the value at a rank counted from the top (best first)."""

    dense: np.ndarray = field(default_factory=lambda: np.zeros(HI_BINS, np.int64))

    def add(self, sparse: tuple[np.ndarray, np.ndarray]) -> None:
        bins, counts = sparse
        np.add.at(self.dense, np.asarray(bins, np.int64), np.asarray(counts, np.int64))

    def locate(self, rank: int) -> tuple[int, int]:
        """The bin holding the `rank`-th largest value (1-based) and how many values lie above that bin."""
        total = int(self.dense.sum())
        if not 1 <= rank <= total:
            raise ValueError(f"rank {rank} outside 1..{total}")
        from_top = np.cumsum(self.dense[::-1])  # from_top[j]: values in the top j+1 bins
        j = int(np.searchsorted(from_top, rank))  # first j with from_top[j] >= rank
        above = int(from_top[j - 1]) if j else 0
        return HI_BINS - 1 - j, above


def cut_value(hi_bin: int, lo_bin: int) -> float:
    return from_ordered_bits((hi_bin << 16) | lo_bin)


@dataclass
class FixedHistogram:
    """Counts of values in `bins` equal-width bins over [lo, hi] (values outside are clipped in)."""

    lo: float = -1.0
    hi: float = 1.0
    bins: int = 40
    counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = np.zeros(self.bins, np.int64)

    def add_values(self, values: np.ndarray) -> "FixedHistogram":
        values = np.asarray(values, np.float64)
        values = values[~np.isnan(values)]
        idx = np.clip(((values - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64), 0, self.bins - 1)
        self.counts += np.bincount(idx, minlength=self.bins)
        return self

    def merge(self, other: "FixedHistogram | list[int]") -> "FixedHistogram":
        self.counts += np.asarray(other.counts if isinstance(other, FixedHistogram) else other, np.int64)
        return self

    def edges(self) -> list[float]:
        return [float(x) for x in np.linspace(self.lo, self.hi, self.bins + 1)]
