"""Near-duplicate detection inside inverted lists (SemDeDup-style), and the pixel check that confirms it.

Candidates: within each k-means list (pipelines/ann_index.py), every pair of rows whose CLIP image
cosine exceeds the threshold: list members against each other, and rows probing the list from their
own nearer lists against its members (so a pair split across a list boundary is still seen). Work is
O(list size) per row, never O(rows).

Which copy stays: a row is removed when a row with a *smaller key* is its confirmed near duplicate
(SemDeDup's rule: in a fixed order, drop every row with a near duplicate earlier in that order). It is
a per-pair rule, so it does not depend on shard or list layout, nor on the order work runs in; the
removed row names its most similar earlier copy (ties: the smallest key).

Confirmation, because CLIP alone merges different pictures of one subject (the demo's tiny CLIP puts
distinct scenes sharing a background at cosine 0.99):
1. `thumbnail_mad`: mean absolute difference of the 8x8 RGB thumbnails stored by scoring; cheap, a
   loose pre-check.
2. `changed_pixels`: both images at 64x64 RGB, B shifted by every offset up to `max_shift` pixels;
   at the best offset, the pixels whose largest channel difference exceeds `tolerance`, after a 2x2
   erosion (JPEG noise and the partial-pixel edges a shift or rescale leaves are thin; a different
   shape or colour is a blob). A re-encoded, shifted or slightly cropped copy has 0-1 such pixels; a
   different shape at the same place (a circle against a cross) has tens.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

COMPARE_SIDE = 64
"""Side at which `changed_pixels` compares two images."""


@dataclass
class Pairs:
    """Candidate pairs: `b` is the row with the larger key (the one a confirmed pair removes)."""

    a: np.ndarray  # indices into the list table
    b: np.ndarray
    cos: np.ndarray

    @classmethod
    def empty(cls) -> "Pairs":
        z = np.zeros(0, np.int64)
        return cls(z, z.copy(), np.zeros(0, np.float32))


def pairs_above(emb: np.ndarray, keys: np.ndarray, is_member: np.ndarray, threshold: float,
                block: int = 2048) -> Pairs:
    """Pairs with cosine > threshold among the rows of one list: member-member and query-member
    (queries are rows probing this list; query-query pairs are another list's business).
    `keys` orders the pair (a: smaller key). Blocked: memory O(block^2)."""
    members = np.flatnonzero(is_member)
    queries = np.flatnonzero(~is_member)
    out_a, out_b, out_cos = [], [], []
    m_emb = emb[members]
    for start in range(0, len(members), block):
        rows = members[start:start + block]
        sims = emb[rows] @ m_emb.T  # (block, members)
        # member-member: count each unordered pair once (j > i in member order)
        i, j = np.nonzero(sims > threshold)
        keep = j > (start + i)
        _append(out_a, out_b, out_cos, rows[i[keep]], members[j[keep]], sims[i[keep], j[keep]], keys)
    for start in range(0, len(queries), block):
        rows = queries[start:start + block]
        sims = emb[rows] @ m_emb.T
        i, j = np.nonzero(sims > threshold)
        _append(out_a, out_b, out_cos, rows[i], members[j], sims[i, j], keys)
    if not out_a:
        return Pairs.empty()
    return Pairs(np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_cos).astype(np.float32))


def _append(out_a: list, out_b: list, out_cos: list, x: np.ndarray, y: np.ndarray, cos: np.ndarray,
            keys: np.ndarray) -> None:
    if not len(x):
        return
    x_first = keys[x] < keys[y]
    out_a.append(np.where(x_first, x, y))
    out_b.append(np.where(x_first, y, x))
    out_cos.append(cos)


def thumbnail_mad(thumbs_a: np.ndarray, thumbs_b: np.ndarray) -> np.ndarray:
    """(P, 192) uint8 thumbnails -> (P,) mean absolute difference (0-255 scale)."""
    return np.abs(thumbs_a.astype(np.int16) - thumbs_b.astype(np.int16)).mean(1).astype(np.float32)


def fingerprints(images: list[bytes | None], side: int = COMPARE_SIDE) -> np.ndarray:
    """Encoded images -> (N, side, side, 3) uint8 (box-resized when not already that size); an
    undecodable or missing image becomes all zeros (it then confirms nothing)."""
    from PIL import Image

    out = np.zeros((len(images), side, side, 3), np.uint8)
    for n, data in enumerate(images):  # decoding is per image by nature (as in scoring)
        if data is None:
            continue
        try:
            with Image.open(io.BytesIO(data)) as img:
                img = img.convert("RGB")
                if img.size != (side, side):
                    img = img.resize((side, side), Image.Resampling.BOX)
                out[n] = np.asarray(img)
        except Exception:  # noqa: BLE001 - unreadable bytes: no fingerprint, so no confirmation
            pass
    return out


def changed_pixels(fa: np.ndarray, fb: np.ndarray, max_shift: int = 3, tolerance: int = 64,
                   chunk: int = 256) -> np.ndarray:
    """(P, S, S, 3) uint8 image pairs -> (P,) int: at the best shift of B (up to max_shift px either
    way), the pixels of the interior where A and B differ by more than `tolerance` in some channel,
    after a 2x2 erosion of that mask. Vectorised over pairs; one pass per shift."""
    n, side = len(fa), fa.shape[1] if len(fa) else COMPARE_SIDE
    best = np.zeros(n, np.int64)
    m = max_shift
    inner = side - 2 * m
    for start in range(0, n, chunk):
        # channel-first int16: each channel's difference is a plain contiguous array operation
        a = np.ascontiguousarray(fa[start:start + chunk, m:side - m, m:side - m].transpose(3, 0, 1, 2), np.int16)
        b = np.ascontiguousarray(fb[start:start + chunk].transpose(3, 0, 1, 2), np.int16)
        count = len(a[0])
        low = np.full(count, np.iinfo(np.int64).max, np.int64)
        for dy in range(-m, m + 1):
            for dx in range(-m, m + 1):
                mask = np.zeros((count, inner, inner), bool)
                for c in range(3):
                    diff = a[c] - b[c, :, m + dy:m + dy + inner, m + dx:m + dx + inner]
                    mask |= (diff > tolerance) | (diff < -tolerance)
                eroded = mask[:, :-1, :-1] & mask[:, 1:, :-1] & mask[:, :-1, 1:] & mask[:, 1:, 1:]
                low = np.minimum(low, np.count_nonzero(eroded.reshape(count, -1), axis=1))
        best[start:start + chunk] = low
    return best


def first_per_group(group: np.ndarray) -> np.ndarray:
    """Mask of the first row of each run of equal values in an already sorted array."""
    if not len(group):
        return np.zeros(0, bool)
    first = np.ones(len(group), bool)
    first[1:] = group[1:] != group[:-1]
    return first


def exact_duplicates(sha: pa.Array, keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Rows sharing a sha256: (indices of the duplicates, index of the first by key for each)."""
    import pyarrow.compute as pc

    order = np.asarray(pc.sort_indices(pa.table({"sha": sha, "key": keys}),
                                       sort_keys=[("sha", "ascending"), ("key", "ascending")]))
    sorted_sha = sha.take(pa.array(order)).to_numpy(zero_copy_only=False).astype(str)
    first = first_per_group(sorted_sha)
    start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    dups = ~first
    return order[dups], order[start[dups]]
