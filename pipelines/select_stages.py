"""The selection pass's work, as functions Ray runs per shard or per bucket (pipelines/curate.py's
`select` drives them; the driver holds counts, never rows).

Kept free of torch (and so of pipelines.clip_model): a Ray worker imports this module to run a task,
and importing torch costs seconds per worker. Tasks receive the SelectConfig as a namespace of its
fields (`as_namespace`), so unpickling one never imports pipelines.curate.

Files, all under `<curate_dir>/_work/<stage>/` with a done record per shard or bucket:
filter/shards/<id>.parquet (per-sample results), filter/sample/<id>.parquet (k-means sample),
quantizer/ (lists), assign/{exact,near}/<id>.arrow (rows by bucket), dedup/{exact,by_b,by_a}/<b>.arrow
(results by shard), export/shards/<id>.parquet (64x64 originals), decide/shards/<id>.parquet.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import storage
from pipelines.step import StepDir, atomic_write_parquet, shard_path
from pipelines.storage import StoragePath

if TYPE_CHECKING:
    from pipelines.curate import CaptionFilter, NearDupFilter, SelectConfig

KEEP, REJECT = "keep", "reject"
THUMB = 8  # side of the RGB thumbnail kept per image for near-duplicate pre-checks
FILTER_ORDER = ("download", "decode", "min_size", "aspect_ratio", "caption", "unsafe", "unsafe_classifier",
                "aesthetic", "clip_score", "exact_duplicate", "near_duplicate")
INGEST_META_COLUMNS = ("key", "url", "caption", "status", "width", "height", "original_width",
                       "original_height", "sha256")


def as_namespace(config: Any) -> Any:
    """A (nested) config dataclass -> the same fields as attributes of plain namespaces."""
    if dataclasses.is_dataclass(config):
        return types.SimpleNamespace(**{f.name: as_namespace(getattr(config, f.name))
                                        for f in dataclasses.fields(config)})
    return config

DECISION_COLUMNS = ("key", "url", "caption", "status", "decision", "filter", "reason", "reasons", "detail",
                    "clip_score", "unsafe_margin", "unsafe_concept", "duplicate_of", "unsafe_score",
                    "aesthetic_score")
KEPT_COLUMNS = ("key", "url", "caption", "image", "width", "height", "sha256")
WORK = "_work"
SCORE_HIST_BINS = 40


def _decision_schema() -> pa.Schema:
    return pa.schema([
        ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
        ("decision", pa.string()), ("filter", pa.string()), ("reason", pa.string()),
        ("reasons", pa.list_(pa.string())), ("detail", pa.string()), ("clip_score", pa.float32()),
        ("unsafe_margin", pa.float32()), ("unsafe_concept", pa.string()), ("duplicate_of", pa.string()),
        ("unsafe_score", pa.float32()), ("aesthetic_score", pa.float32()),
    ])


@dataclass(frozen=True)
class _Select:
    """What every selection task needs (small: paths, ids, the config)."""

    ingest_dir: str
    score_dir: str
    curate_dir: str
    shard_ids: tuple[str, ...]
    config: SelectConfig
    clip: dict[str, Any]

    @property
    def work(self) -> StoragePath:
        """Under the curate directory (on the store when it is a URL): tasks on every node read what others wrote."""
        return storage.path(self.curate_dir) / WORK

    def ingest(self, shard: str) -> StoragePath:
        return shard_path(self.ingest_dir, shard)

    def scores(self, shard: str) -> StoragePath:
        return shard_path(self.score_dir, shard)

    def stage(self, name: str) -> StoragePath:
        return self.work / name


# -- per-sample filters, vectorised -----------------------------------------------------------------
def _read(path: str | StoragePath, columns: Sequence[str] | None = None) -> pa.Table:
    from pipelines.ann_index import read_parquet

    return read_parquet(path, columns)


def _np(column: pa.ChunkedArray | pa.Array, fill: Any = np.nan, dtype: Any = np.float64) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return pc.fill_null(arr.cast(pa.float64()), fill).to_numpy(zero_copy_only=False).astype(dtype)


def _strings(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)


def _fmt(fmt: str, *columns: np.ndarray) -> np.ndarray:
    """Per-row detail strings for the (few) rows a filter names first."""
    return np.array([fmt.format(*values) for values in zip(*columns)], dtype=object)


def _caption_masks(captions: pa.ChunkedArray | pa.Array, cfg: CaptionFilter) -> dict[str, np.ndarray]:
    """Every caption rule as a boolean mask over rows (pyarrow string kernels, RE2 regexes)."""
    text = pc.fill_null(captions, "")
    text = pc.utf8_trim_whitespace(pc.replace_substring_regex(text, pattern=r"\s+", replacement=" "))
    empty = pc.equal(pc.utf8_length(text), 0)
    url = pc.match_substring_regex(text, pattern=r"^(https?://|www\.)\S+$", ignore_case=True)
    if cfg.boilerplate:
        joined = "^(?:" + "|".join(f"(?:{p})" for p in cfg.boilerplate) + ")$"
        try:
            boiler = pc.match_substring_regex(text, pattern=joined, ignore_case=True)
        except pa.ArrowInvalid as exc:
            raise ValueError(f"CaptionFilter.boilerplate: a pattern is not valid RE2 syntax (the selection runs "
                             f"them in pyarrow): {exc}") from exc
    else:
        boiler = pa.array(np.zeros(len(text), bool))
    words = pc.add(pc.count_substring(text, " "), 1)
    full = ~np.asarray(empty)
    as_np = lambda m: np.asarray(pc.fill_null(m, False)).astype(bool)  # noqa: E731
    n_words = np.asarray(words)
    return {
        "caption_empty": ~full,
        "caption_url_only": full & as_np(url),
        "caption_boilerplate": full & as_np(boiler),
        "caption_too_short": full & (n_words < cfg.min_words),
        "caption_too_long": full & (n_words > cfg.max_words),
    }


def caption_reasons(caption: str | None, cfg: CaptionFilter) -> list[str]:
    """The caption rules' reason codes for one caption (what the vectorised filter gives that row)."""
    masks = _caption_masks(pa.array([caption], pa.string()), cfg)
    return [code for code, mask in masks.items() if mask[0]]


def per_sample_decisions(table: pa.Table, config: SelectConfig,
                         head_scores: dict[str, np.ndarray] | None = None) -> pa.Table:
    """Every per-sample filter on one shard's rows (ingest metadata + scores), vectorised.

    Returns, per row: `reasons` (every failing reason code, in FILTER_ORDER), `filter`, `reason`,
    `detail` (the first failing one) and `alive` (no per-sample filter failed).
    `head_scores` may hold "unsafe_score" and "aesthetic_score" arrays (NaN where unscored)."""
    n = table.num_rows
    head_scores = head_scores or {}
    status = table["status"].to_numpy(zero_copy_only=False).astype(object)
    ok = status == "success"
    score = _np(table["clip_score"])
    error = np.asarray(pc.is_valid(table["score_error"])).astype(bool) if "score_error" in table.column_names \
        else np.zeros(n, bool)
    w = _np(table["original_width"])
    w = np.where(np.isnan(w), _np(table["width"]), w)
    h = _np(table["original_height"])
    h = np.where(np.isnan(h), _np(table["height"]), h)
    has_size = ~np.isnan(w) & ~np.isnan(h)
    short, long_ = np.fmin(w, h), np.fmax(w, h)
    ratio = np.divide(long_, short, out=np.full(n, np.inf), where=has_size & (short > 0))
    margin = _np(table["unsafe_margin"])
    unsafe_score = head_scores.get("unsafe_score", np.full(n, np.nan))
    aesthetic = head_scores.get("aesthetic_score", np.full(n, np.nan))
    captions = table["caption"]

    # (filter, reason code, mask, detail(rows) -> strings): the slots, in FILTER_ORDER.
    slots: list[tuple[str, str, np.ndarray, Any]] = []
    slots.append(("download", "download", ~ok, lambda r: status[r].astype(str)))
    slots.append(("decode", "undecodable", ok & (error | np.isnan(score)),
                  lambda r: np.where(pd_isna(table["score_error"], r), "not scored", _strings(table["score_error"])[r])
                  if "score_error" in table.column_names else np.full(len(r), "not scored", object)))
    if config.size.enabled:
        too_small = ok & (~has_size | (short < config.size.min_side))
        slots.append(("min_size", "too_small", too_small,
                      lambda r: _fmt("{}x{} < {}", _ints(w[r]), _ints(h[r]), [config.size.min_side] * len(r))))
    if config.aspect.enabled:
        slots.append(("aspect_ratio", "bad_aspect_ratio", ok & has_size & (short > 0) & (ratio > config.aspect.max_ratio),
                      lambda r: _fmt("{:.2f} > {}", ratio[r], [config.aspect.max_ratio] * len(r))))
    if config.caption.enabled:
        quoted = lambda r: _fmt("{!r:.80}", [c for c in _strings(captions)[r]])  # noqa: E731
        for code, mask in _caption_masks(captions, config.caption).items():
            slots.append(("caption", code, ok & mask, quoted))
    if config.unsafe.enabled:
        slots.append(("unsafe", "unsafe", ok & ~np.isnan(margin) & (margin > config.unsafe.margin),
                      lambda r: _fmt("{} by {:.3f}", _strings(table["unsafe_concept"])[r], margin[r])))
    if config.unsafe_classifier.enabled:
        cut = config.unsafe_classifier.max_score
        slots.append(("unsafe_classifier", "unsafe_classifier", ok & ~np.isnan(unsafe_score) & (unsafe_score > cut),
                      lambda r: _fmt("head score {:.3f} > {}", unsafe_score[r], [cut] * len(r))))
    if config.aesthetic.enabled:
        cut_a = config.aesthetic.min_score
        slots.append(("aesthetic", "low_aesthetic", ok & ~np.isnan(aesthetic) & (aesthetic < cut_a),
                      lambda r: _fmt("head score {:.3f} < {}", aesthetic[r], [cut_a] * len(r))))
    if config.clip_score.mode == "absolute":
        cut_c = config.clip_score.min_score
        slots.append(("clip_score", "low_clip_score", ok & ~np.isnan(score) & (score < cut_c),
                      lambda r: _fmt("{:.3f} < {}", score[r], [cut_c] * len(r))))

    masks = np.stack([s[2] for s in slots], axis=1)  # (n, slots)
    codes = np.array([s[1] for s in slots], dtype=object)
    codes_per_row = np.where(masks, codes[None, :], None)
    codes_per_row[:, 0] = np.where(~ok, np.char.add("download_", status.astype(str)).astype(object), None)
    any_fail = masks.any(1)
    first = np.where(any_fail, masks.argmax(1), -1)
    rows, cols = np.nonzero(masks)  # row-major: per row, the slots in order
    values = pa.array(codes_per_row[rows, cols].tolist(), pa.string())
    offsets = np.concatenate([[0], np.cumsum(masks.sum(1))]).astype(np.int32)
    reasons = pa.ListArray.from_arrays(pa.array(offsets), values)
    filt = np.full(n, None, object)
    reason = np.full(n, None, object)
    detail = np.full(n, None, object)
    for k, (name, _, _, describe) in enumerate(slots):
        r = np.flatnonzero(first == k)
        if len(r):
            filt[r] = name
            reason[r] = codes_per_row[r, k]
            detail[r] = describe(r)
    return pa.table({"reasons": reasons, "filter": pa.array(filt.tolist(), pa.string()),
                     "reason": pa.array(reason.tolist(), pa.string()),
                     "detail": pa.array(detail.tolist(), pa.string()), "alive": pa.array(~any_fail)})


def pd_isna(column: pa.ChunkedArray, rows: np.ndarray) -> np.ndarray:
    return ~np.asarray(pc.is_valid(column)).astype(bool)[rows]


def _ints(values: np.ndarray) -> list[int | None]:
    return [None if np.isnan(v) else int(v) for v in values]


# -- stage 1: filter (per shard) ----------------------------------------------------------------------
FILTER_COLUMNS = ("key", "url", "caption", "status", "sha256", "clip_score", "unsafe_margin", "unsafe_concept",
                  "unsafe_score", "aesthetic_score", "reasons", "filter", "reason", "detail", "alive")


def _load_heads(config: SelectConfig) -> dict[str, Any]:
    from pipelines.heads import load_head

    heads = {}
    if config.unsafe_classifier.enabled:
        heads["unsafe_score"] = load_head(config.unsafe_classifier.head, "unsafe-content classifier")
    if config.aesthetic.enabled:
        heads["aesthetic_score"] = load_head(config.aesthetic.head, "aesthetic")
    return heads


SCORE_COLUMNS = ("key", "clip_score", "image_embedding", "thumbnail", "unsafe_margin", "unsafe_concept", "score_error")
"""What selection reads from a score shard (curate scoring's schema, `pipelines.curate.score_schema`)."""


def check_score_shard(path: str | StoragePath, shard_id: str) -> pa.Schema:
    """The shard's schema; a score shard lacking a column selection reads fails here with what to do, not as an
    Arrow error (the driver checks the first shard before any work, a task its own when reading it fails)."""
    from pipelines.ann_index import read_parquet_schema

    schema = read_parquet_schema(path)
    missing = [c for c in SCORE_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"score shard {shard_id} ({path}) lacks the column(s) {missing}: it was not written by "
                         "curate scoring (or by an older version of it); rerun scoring into a fresh directory")
    return schema


def _read_joined(job: _Select, shard_id: str, score_columns: Sequence[str]) -> pa.Table:
    meta = _read(job.ingest(shard_id), columns=list(INGEST_META_COLUMNS))
    try:
        scores = _read(job.scores(shard_id), columns=["key", *score_columns])
    except pa.ArrowInvalid:
        check_score_shard(job.scores(shard_id), shard_id)  # names a missing column
        raise
    if meta.num_rows != scores.num_rows or not pc.all(pc.equal(meta["key"], scores["key"])).as_py() in (True, None):
        raise RuntimeError(f"score shard {shard_id} does not match its ingest shard: rerun scoring into a fresh "
                           "directory")
    for name in score_columns:
        meta = meta.append_column(name, scores[name])
    return meta


def _filter_shard(job: _Select, shard_id: str, sample_fraction: float) -> dict[str, Any]:
    """Per-sample filters of one shard -> `filter/shards/<id>.parquet`; the k-means sample of its alive
    rows (a hash of the key decides, so it does not depend on sharding) -> `filter/sample/<id>.parquet`."""
    from pipelines.ann_index import embeddings_of, sample_mask

    step = StepDir(root=job.stage("filter"), name="curate_select_filter", key="")
    table = _read_joined(job, shard_id, ["clip_score", "image_embedding", "unsafe_margin", "unsafe_concept",
                                         "score_error"])
    if pc.count_distinct(table["key"]).as_py() != table.num_rows:
        raise ValueError(f"ingest keys must be unique; shard {shard_id} repeats some")
    heads = _load_heads(job.config)
    scored = ~np.isnan(_np(table["clip_score"]))
    head_scores = {}
    if heads:
        emb = embeddings_of(table["image_embedding"])
        for name, head in heads.items():
            head.check_clip(job.clip, emb.shape[1])
            values = np.full(table.num_rows, np.nan, np.float32)
            values[scored] = head(emb[scored])
            head_scores[name] = values
    decided = per_sample_decisions(table, job.config, head_scores)
    out = table.select(["key", "url", "caption", "status", "sha256", "clip_score", "unsafe_margin", "unsafe_concept"])
    for name in ("unsafe_score", "aesthetic_score"):
        values = head_scores.get(name)
        out = out.append_column(name, pa.array(values, pa.float32(), mask=np.isnan(values)) if values is not None
                                else pa.nulls(table.num_rows, pa.float32()))
    for name in decided.column_names:
        out = out.append_column(name, decided[name])
    atomic_write_parquet(shard_path(step.root, shard_id), out)
    alive = np.asarray(decided["alive"]).astype(bool)
    sampled = 0
    if sample_fraction > 0:
        pick = alive & sample_mask(table["key"], sample_fraction, job.config.near_dup.seed)
        sample = pa.table({"key": table["key"].filter(pa.array(pick)),
                           "embedding": table["image_embedding"].filter(pa.array(pick))})
        atomic_write_parquet(shard_path(step.root, shard_id, "sample"), sample)
        sampled = sample.num_rows
    stats = {"rows": table.num_rows, "alive": int(alive.sum()), "sampled": sampled}
    step.mark_done(shard_id, stats)
    return stats


# -- stage 2: assign to lists and buckets (per shard) -------------------------------------------------
def _assign_shard(job: _Select, shard_id: str, shard_index: int, n_buckets: int, use_near: bool) -> dict[str, Any]:
    """The shard's alive rows -> exact-duplicate entries (bucket = hash of sha256) and near-duplicate
    entries (each row as a member of its nearest list and a query of its next nprobe-1 lists; bucket =
    list mod buckets), one partitioned file each."""
    from pipelines.ann_index import Quantizer, embeddings_of, single_threaded_faiss, string_hash, unit, write_partitioned

    step = StepDir(root=job.stage("assign"), name="curate_select_assign", key="")
    decided = _read(shard_path(job.stage("filter"), shard_id), columns=["key", "sha256", "alive"])
    alive = np.asarray(decided["alive"]).astype(bool)
    rows = np.flatnonzero(alive).astype(np.int32)
    keys = decided["key"].take(pa.array(rows))
    stats = {"alive": len(rows)}
    if job.config.exact_dup.enabled:
        sha = decided["sha256"].take(pa.array(rows))
        exact = pa.table({"sha": sha, "key": keys, "shard": pa.array(np.full(len(rows), shard_index, np.int32)),
                          "row": pa.array(rows)})
        has = np.asarray(pc.is_valid(sha)).astype(bool)
        exact = exact.filter(pa.array(has))
        write_partitioned(job.stage("assign") / "exact" / f"{shard_id}.arrow", exact,
                          (string_hash(exact["sha"]) % np.uint64(n_buckets)).astype(np.int64), n_buckets)
    if use_near:
        scores = _read(job.scores(shard_id), columns=["image_embedding", "thumbnail"])
        emb16 = scores["image_embedding"].take(pa.array(rows))
        emb = unit(embeddings_of(emb16))
        single_threaded_faiss()
        quantizer = Quantizer.load(job.stage("quantizer"))
        lists, _ = quantizer.assign(emb, job.config.near_dup.nprobe)
        p = lists.shape[1]
        valid = lists >= 0
        entry_row = np.repeat(np.arange(len(rows)), p).reshape(len(rows), p)[valid]
        entry_list = lists[valid]
        role = np.tile(np.arange(p) > 0, (len(rows), 1))[valid]  # 0: member (home list), 1: query
        take = pa.array(entry_row)
        near = pa.table({
            "list": pa.array(entry_list.astype(np.int32)), "query": pa.array(role),
            "key": keys.take(take), "shard": pa.array(np.full(len(entry_row), shard_index, np.int32)),
            "row": pa.array(rows[entry_row]), "embedding": emb16.take(take),
            "thumbnail": scores["thumbnail"].take(pa.array(rows)).take(take),
        })
        write_partitioned(job.stage("assign") / "near" / f"{shard_id}.arrow", near, entry_list % n_buckets, n_buckets)
        stats["entries"] = len(entry_row)
    step.mark_done(shard_id, stats)
    return stats


# -- stage 3: duplicates (per bucket) -------------------------------------------------------------------
PAIR_COLUMNS = ("b_key", "b_shard", "b_row", "a_key", "a_shard", "a_row", "cos", "mad")


def _dedup_bucket(job: _Select, bucket: int, n_shards: int, use_exact: bool, use_near: bool) -> dict[str, Any]:
    """Exact duplicates among the rows whose sha256 hashes to this bucket; near-duplicate candidate pairs
    inside this bucket's lists. Results go out partitioned by shard (of the removed row, and for the
    pixel check also of the original)."""
    from pipelines.ann_index import embeddings_of, read_partition, unit, write_partitioned
    from pipelines.dedup import exact_duplicates, pairs_above, thumbnail_mad

    root = job.stage("dedup")
    step = StepDir(root=root, name="curate_select_dedup", key="")
    name = f"{bucket:05d}"
    stats: dict[str, Any] = {"bucket": bucket}
    if use_exact:
        entries = read_partition([job.stage("assign") / "exact" / f"{s}.arrow" for s in job.shard_ids], bucket)
        if entries is None:
            entries = pa.table({"sha": pa.array([], pa.string()), "key": pa.array([], pa.string()),
                                "shard": pa.array([], pa.int32()), "row": pa.array([], pa.int32())})
        dups, firsts = exact_duplicates(entries["sha"], entries["key"])
        result = pa.table({"row": entries["row"].take(pa.array(dups)),
                           "dup_of": entries["key"].take(pa.array(firsts))})
        shard_of = np.asarray(entries["shard"].take(pa.array(dups)), np.int64)
        write_partitioned(root / "exact" / f"{name}.arrow", result, shard_of, n_shards)
        stats["exact"] = len(dups)
    if use_near:
        cfg = job.config.near_dup
        entries = read_partition([job.stage("assign") / "near" / f"{s}.arrow" for s in job.shard_ids], bucket)
        pairs = []
        if entries is not None:
            entries = entries.take(pc.sort_indices(entries, sort_keys=[("list", "ascending"), ("query", "ascending"),
                                                                        ("key", "ascending")]))
            lists = np.asarray(entries["list"], np.int64)
            bounds = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1], True])
            emb = unit(embeddings_of(entries["embedding"]))
            keys = entries["key"].to_numpy(zero_copy_only=False).astype(str)
            member = ~np.asarray(entries["query"]).astype(bool)
            for lo, hi in zip(bounds[:-1], bounds[1:]):  # one list at a time
                found = pairs_above(emb[lo:hi], keys[lo:hi], member[lo:hi], cfg.threshold)
                if len(found.a):
                    pairs.append((found.a + lo, found.b + lo, found.cos))
        if pairs:
            a = np.concatenate([p[0] for p in pairs])
            b = np.concatenate([p[1] for p in pairs])
            cos = np.concatenate([p[2] for p in pairs])
            thumbs = entries["thumbnail"].combine_chunks()
            width = THUMB * THUMB * 3
            raw = np.frombuffer(thumbs.buffers()[1], np.uint8)[thumbs.offset * width:(thumbs.offset + len(thumbs)) * width]
            raw = raw.reshape(-1, width)
            mad = thumbnail_mad(raw[a], raw[b])
            keep = mad <= cfg.max_thumbnail_mad if cfg.max_thumbnail_mad is not None else np.ones(len(a), bool)
            a, b, cos, mad = a[keep], b[keep], cos[keep], mad[keep]
        else:
            a = b = np.zeros(0, np.int64)
            cos = mad = np.zeros(0, np.float32)
        def col(name: str, idx: np.ndarray) -> pa.Array:
            if entries is None:
                return pa.array([], pa.string() if name == "key" else pa.int32())
            return entries[name].take(pa.array(idx))
        found = pa.table({"b_key": col("key", b), "b_shard": col("shard", b), "b_row": col("row", b),
                          "a_key": col("key", a), "a_shard": col("shard", a), "a_row": col("row", a),
                          "cos": pa.array(cos, pa.float32()), "mad": pa.array(mad, pa.float32())})
        write_partitioned(root / "by_b" / f"{name}.arrow", found, np.asarray(found["b_shard"], np.int64), n_shards)
        wanted = found.select(["a_shard", "a_row"])
        write_partitioned(root / "by_a" / f"{name}.arrow", wanted, np.asarray(wanted["a_shard"], np.int64), n_shards)
        stats["pairs"] = found.num_rows
    step.mark_done(name, stats)
    return stats


# -- stage 4: fingerprints of the originals (per shard) ---------------------------------------------------
def _export_shard(job: _Select, shard_id: str, shard_index: int, n_buckets: int) -> dict[str, Any]:
    """64x64 images of this shard's rows that are the original of some candidate pair, for the pixel
    check of the shards holding the copies."""
    from pipelines.ann_index import read_partition
    from pipelines.dedup import fingerprints

    step = StepDir(root=job.stage("export"), name="curate_select_export", key="")
    wanted = read_partition([job.stage("dedup") / "by_a" / f"{b:05d}.arrow" for b in range(n_buckets)], shard_index)
    rows = np.unique(np.asarray(wanted["a_row"], np.int64)) if wanted is not None else np.zeros(0, np.int64)
    images = _read(job.ingest(shard_id), columns=["image"])["image"].take(pa.array(rows)) if len(rows) \
        else pa.array([], pa.binary())
    prints = fingerprints(images.to_pylist())
    side = prints.shape[1]
    table = pa.table({"row": pa.array(rows.astype(np.int32)),
                      "pixels": pa.array([p.tobytes() for p in prints], pa.binary(side * side * 3))})
    atomic_write_parquet(shard_path(step.root, shard_id), table)
    stats = {"exported": len(rows)}
    step.mark_done(shard_id, stats)
    return stats


# -- stage 5: decide duplicates (per shard) ------------------------------------------------------------
def _decide_shard(job: _Select, shard_id: str, shard_index: int, n_buckets: int, use_exact: bool,
                  use_near: bool, percentile: bool) -> dict[str, Any]:
    """Per-sample results + this shard's exact duplicates + its confirmed near duplicates ->
    `decide/<id>.parquet`. Returns, in percentile mode, the survivors' high-bits score counts."""
    from pipelines.ann_index import read_partition
    from pipelines.dedup import first_per_group
    from pipelines.sketches import hi_counts

    step = StepDir(root=job.stage("decide"), name="curate_select_decide", key="")
    table = _read(shard_path(job.stage("filter"), shard_id))
    n = table.num_rows
    filt = _strings(table["filter"])
    reason = _strings(table["reason"])
    detail = _strings(table["detail"])
    duplicate_of = np.full(n, None, object)
    alive = np.asarray(table["alive"]).astype(bool)
    exact = np.zeros(n, bool)
    if use_exact:
        found = read_partition([job.stage("dedup") / "exact" / f"{b:05d}.arrow" for b in range(n_buckets)], shard_index)
        if found is not None:
            rows = np.asarray(found["row"], np.int64)
            exact[rows] = True
            originals = _strings(found["dup_of"])
            duplicate_of[rows] = originals
            filt[rows], reason[rows] = "exact_duplicate", "exact_duplicate"
            detail[rows] = _fmt("same sha256 as {}", originals)
    if use_near:
        cfg = job.config.near_dup
        pairs = read_partition([job.stage("dedup") / "by_b" / f"{b:05d}.arrow" for b in range(n_buckets)], shard_index)
        if pairs is not None:
            b_row = np.asarray(pairs["b_row"], np.int64)
            pairs = pairs.filter(pa.array(~exact[b_row]))  # an exact duplicate is judged as one already
        if pairs is not None and pairs.num_rows:
            changed = np.full(pairs.num_rows, -1, np.int64)
            if cfg.max_changed_pixels is not None:
                changed = _changed_pixels_of(job, shard_id, pairs, cfg)
                pairs = pairs.filter(pa.array(changed <= cfg.max_changed_pixels))
                changed = changed[changed <= cfg.max_changed_pixels]
            pairs = pairs.append_column("changed", pa.array(changed))
            order = pc.sort_indices(pairs, sort_keys=[("b_row", "ascending"), ("cos", "descending"),
                                                      ("a_key", "ascending")])
            pairs = pairs.take(order)
            b_row = np.asarray(pairs["b_row"], np.int64)
            best = first_per_group(b_row)
            chosen = pairs.filter(pa.array(best))
            rows = np.asarray(chosen["b_row"], np.int64)
            originals = _strings(chosen["a_key"])
            duplicate_of[rows] = originals
            filt[rows], reason[rows] = "near_duplicate", "near_duplicate"
            changed_txt = ["" if c < 0 else f", {c} changed px" for c in np.asarray(chosen["changed"])]
            detail[rows] = _fmt("cos {:.3f}, thumbnail MAD {:.1f}{} with {}", np.asarray(chosen["cos"]),
                                np.asarray(chosen["mad"]), changed_txt, originals)
    set_level = alive & (duplicate_of != None)  # noqa: E711 - object array
    reasons = _replace_reasons(table["reasons"], set_level, reason)
    survivor = alive & (duplicate_of == None)  # noqa: E711 - object array
    out = table.drop_columns(["reasons", "filter", "reason", "detail", "alive"])
    out = out.append_column("reasons", reasons)
    out = out.append_column("filter", pa.array(filt.tolist(), pa.string()))
    out = out.append_column("reason", pa.array(reason.tolist(), pa.string()))
    out = out.append_column("detail", pa.array(detail.tolist(), pa.string()))
    out = out.append_column("duplicate_of", pa.array(duplicate_of.tolist(), pa.string()))
    out = out.append_column("survivor", pa.array(survivor))
    atomic_write_parquet(shard_path(step.root, shard_id), out)
    stats = {"rows": n, "survivors": int(survivor.sum())}
    step.mark_done(shard_id, stats)
    if percentile:
        bins, counts = hi_counts(_np(table["clip_score"])[survivor].astype(np.float32))
        return {**stats, "hi": (bins, counts)}
    return stats


def _replace_reasons(reasons: pa.ChunkedArray, rows: np.ndarray, codes: np.ndarray) -> pa.Array:
    """The reasons list column with `[codes[i]]` where `rows[i]` (a set-level filter's single reason)."""
    n = len(reasons)
    codes = np.asarray(codes, dtype=object)
    single = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)),
                                      pa.array(np.where(rows, codes, "").tolist(), pa.string()))
    return pc.if_else(pa.array(rows), single, reasons.combine_chunks())


def _changed_pixels_of(job: _Select, shard_id: str, pairs: pa.Table, cfg: NearDupFilter) -> np.ndarray:
    """The pixel check for one shard's candidate pairs: copies from this shard's images, originals
    from the exports of their shards."""
    from pipelines.dedup import COMPARE_SIDE, changed_pixels, fingerprints

    side = COMPARE_SIDE
    b_rows = np.asarray(pairs["b_row"], np.int64)
    uniq, inverse = np.unique(b_rows, return_inverse=True)
    images = _read(job.ingest(shard_id), columns=["image"])["image"].take(pa.array(uniq))
    fb = fingerprints(images.to_pylist())[inverse]
    fa = np.zeros((pairs.num_rows, side, side, 3), np.uint8)
    a_shard = np.asarray(pairs["a_shard"], np.int64)
    a_row = np.asarray(pairs["a_row"], np.int64)
    for s in np.unique(a_shard):  # the shards holding originals
        exported = _read(shard_path(job.stage("export"), job.shard_ids[s]))
        ex_rows = np.asarray(exported["row"], np.int64)
        pixels = exported["pixels"].combine_chunks()
        raw = np.frombuffer(pixels.buffers()[1], np.uint8)[pixels.offset * side * side * 3:]
        raw = raw[:len(pixels) * side * side * 3].reshape(-1, side, side, 3)
        mine = np.flatnonzero(a_shard == s)
        fa[mine] = raw[np.searchsorted(ex_rows, a_row[mine])]
    return changed_pixels(fa, fb, cfg.max_shift_px, cfg.pixel_tolerance)


# -- the CLIP-score percentile, exactly, from per-shard counts ------------------------------------------
def _survivor_scores(job: _Select, shard_id: str) -> tuple[np.ndarray, pa.Array]:
    table = _read(shard_path(job.stage("decide"), shard_id), columns=["key", "clip_score", "survivor"])
    table = table.filter(table["survivor"])
    return _np(table["clip_score"]).astype(np.float32), table["key"]


def _lo_task(job: _Select, shard_id: str, hi: int) -> tuple[np.ndarray, np.ndarray]:
    from pipelines.sketches import lo_counts

    return lo_counts(_survivor_scores(job, shard_id)[0], hi)


def _ties_task(job: _Select, shard_id: str, value: float, need: int) -> list[str]:
    scores, keys = _survivor_scores(job, shard_id)
    tied = keys.filter(pa.array(scores == np.float32(value)))
    return tied.take(pc.sort_indices(tied))[:need].to_pylist()


@dataclass(frozen=True)
class PercentileCut:
    """Keep a survivor when score > value, or score == value and key <= tie_key (None: all ties)."""

    value: float
    tie_key: str | None
    keep: int
    survivors: int


def _percentile_cut(job: _Select, hi_results: dict[str, Any], keep_fraction: float) -> PercentileCut:
    import ray

    from pipelines.sketches import RankCut, cut_value
    from pipelines.step import run_shards

    cut = RankCut()
    for result in hi_results.values():
        cut.add(result["hi"])
    total = int(cut.dense.sum())
    n_keep = math.floor(keep_fraction * total + 0.5)
    if n_keep == 0:
        return PercentileCut(value=math.inf, tie_key=None, keep=0, survivors=total)
    hi, above = cut.locate(n_keep)
    lo_fn = ray.remote(num_cpus=0.5)(_lo_task)
    lo_cut = RankCut()
    for counts in run_shards(lo_fn, {s: (job, s, hi) for s in job.shard_ids}, max_in_flight=4).values():
        lo_cut.add(counts)
    within = n_keep - above
    lo, above_lo = lo_cut.locate(within)
    value = cut_value(hi, lo)
    strictly_above = above + above_lo
    need = n_keep - strictly_above
    tied_total = int(lo_cut.dense[lo])
    if need == tied_total:
        return PercentileCut(value=value, tie_key=None, keep=n_keep, survivors=total)
    ties_fn = ray.remote(num_cpus=0.5)(_ties_task)
    smallest: list[str] = []
    for keys in run_shards(ties_fn, {s: (job, s, value, need) for s in job.shard_ids}, max_in_flight=4).values():
        smallest = sorted(smallest + list(keys))[:need]  # at most `need` keys held
    return PercentileCut(value=value, tie_key=smallest[-1], keep=n_keep, survivors=total)


# -- stage 6: write (per shard) -------------------------------------------------------------------------
def _write_shard(job: _Select, step: StepDir, shard_id: str, cut: PercentileCut | None,
                 keep_fraction: float) -> dict[str, Any]:
    """Final decisions (`decisions/<id>.parquet`) and the kept rows with image bytes and embeddings
    (`shards/<id>.parquet`); the done record carries the shard's funnel counts and score histograms."""
    from pipelines.sketches import FixedHistogram

    table = _read(shard_path(job.stage("decide"), shard_id))
    n = table.num_rows
    survivor = np.asarray(table["survivor"]).astype(bool)
    score = _np(table["clip_score"])
    keep = survivor.copy()
    if cut is not None:
        keys = table["key"].to_numpy(zero_copy_only=False).astype(str)
        score32 = score.astype(np.float32)
        value = np.float32(cut.value) if math.isfinite(cut.value) else np.float32(np.inf)
        above = score32 > value
        tied = score32 == value
        if cut.tie_key is not None:
            tied &= keys <= cut.tie_key
        keep = survivor & (above | tied)
        below = np.flatnonzero(survivor & ~keep)
        if len(below):
            filt, reason, detail = _strings(table["filter"]), _strings(table["reason"]), _strings(table["detail"])
            filt[below], reason[below] = "clip_score", "below_clip_percentile"
            detail[below] = _fmt("{:.3f} below the top {:.0%} (cutoff {:.3f})", score[below],
                                 [keep_fraction] * len(below), [cut.value] * len(below))
            mask = np.zeros(n, bool)
            mask[below] = True
            reasons = _replace_reasons(table["reasons"], mask, reason)
            table = table.set_column(table.schema.get_field_index("filter"), "filter", pa.array(filt.tolist(), pa.string()))
            table = table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reason.tolist(), pa.string()))
            table = table.set_column(table.schema.get_field_index("detail"), "detail", pa.array(detail.tolist(), pa.string()))
            table = table.set_column(table.schema.get_field_index("reasons"), "reasons", reasons)
    decision = np.where(keep, KEEP, REJECT).astype(object)
    table = table.append_column("decision", pa.array(decision.tolist(), pa.string()))
    decisions = table.select(list(DECISION_COLUMNS)).cast(_decision_schema())
    atomic_write_parquet(shard_path(step.root, shard_id, "decisions"), decisions)
    kept_rows = pa.array(np.flatnonzero(keep))
    rows = _read(job.ingest(shard_id), columns=list(KEPT_COLUMNS)).take(kept_rows)
    emb = _read(job.scores(shard_id), columns=["image_embedding"])["image_embedding"].take(kept_rows)
    rows = rows.append_column("clip_score", decisions["clip_score"].take(kept_rows))
    rows = rows.append_column("clip_image_embedding", emb)
    rows = rows.replace_schema_metadata({"clip": json.dumps(job.clip)})
    # Small row groups: training reads a few rows at a time, and a group holds whole images.
    atomic_write_parquet(shard_path(step.root, shard_id), rows, row_group_size=256)
    kept_mask = keep
    hist_kept = FixedHistogram(bins=SCORE_HIST_BINS).add_values(score[kept_mask])
    hist_rejected = FixedHistogram(bins=SCORE_HIST_BINS).add_values(score[~kept_mask])
    stats = {"rows": n, "kept": int(kept_mask.sum()), "funnel": shard_funnel(decisions),
             "clip_score_hist": {"kept": hist_kept.counts.tolist(), "rejected": hist_rejected.counts.tolist()}}
    step.mark_done(shard_id, stats)
    return stats


def shard_funnel(decisions: pa.Table) -> dict[str, Any]:
    """One shard's counts: rows, downloaded, kept, and per filter the rows it removed first, by reason."""
    rejected = decisions.filter(pc.equal(decisions["decision"], REJECT))
    grouped = rejected.group_by(["filter", "reason"]).aggregate([("key", "count")]).to_pylist()
    by_filter: dict[str, dict[str, int]] = {}
    for g in grouped:
        by_filter.setdefault(g["filter"], {})[g["reason"]] = int(g["key_count"])
    return {"input": decisions.num_rows,
            "downloaded": int(pc.sum(pc.equal(decisions["status"], "success")).as_py() or 0),
            "kept": decisions.num_rows - rejected.num_rows, "removed": by_filter}


def merge_funnels(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Shard funnels -> the step's: input -> each filter (rows it removed first, by reason) -> kept."""
    total = {"input": 0, "downloaded": 0, "kept": 0}
    removed: dict[str, dict[str, int]] = {}
    for part in parts:
        for k in total:
            total[k] += part[k]
        for name, reasons in part["removed"].items():
            into = removed.setdefault(name, {})
            for r, c in reasons.items():
                into[r] = into.get(r, 0) + c
    stages = []
    remaining = total["input"]
    for name in FILTER_ORDER:
        reasons = dict(sorted(removed.get(name, {}).items()))
        count = sum(reasons.values())
        remaining -= count
        stages.append({"filter": name, "removed": count, "remaining": remaining, "reasons": reasons})
    return {"input": total["input"], "downloaded": total["downloaded"], "stages": stages, "kept": total["kept"]}


def funnel(decisions: pa.Table) -> dict[str, Any]:
    """The funnel of a decision table (all rows or one shard's)."""
    return merge_funnels([shard_funnel(decisions)])


