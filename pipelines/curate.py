"""Curate: decide, for every ingested row, keep or reject, with the filter and reason that decided it.

Two steps, each a `StepDir` (per-shard done records, manifest last):

1. `score` (expensive, CLIP): per ingest shard, the CLIP image-text cosine, the unit image embedding
   (fp16) and the zero-shot unsafe margin of every downloaded image. Runs as Ray Data `map_batches`
   on an actor pool: each actor loads CLIP once and turns one ingest shard into one score shard.
2. `select` (cheap, global): reads all scores at once, applies the per-sample filters, then the
   set-level ones (exact and near duplicates, the CLIP-score percentile) across the whole corpus, and
   writes per shard the kept rows (`shards/`) and every input row's decision (`decisions/`).
   Thresholds live only here: selecting again with other thresholds never reruns CLIP.

Filters, in the order that names a row's first failing filter (all failing ones are recorded):
download, decode, min_size, aspect_ratio, caption, unsafe, clip_score (absolute), then among rows that
passed all of those: exact_duplicate, near_duplicate, clip_score (percentile). Set-level filters are
judged among survivors so that a duplicate whose original was rejected for its caption is not lost.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipelines.clip_model import Clip, ClipConfig, check_clip_source, decode_image
from pipelines.step import (ActorPoolConfig, StepDir, atomic_write_parquet, finished_manifest,
                            map_shards_on_actor_pool, shard_ids_of, shard_path)

KEEP, REJECT = "keep", "reject"
THUMB = 8  # side of the RGB thumbnail kept per image for near-duplicate confirmation
FILTER_ORDER = ("download", "decode", "min_size", "aspect_ratio", "caption", "unsafe", "clip_score",
                "exact_duplicate", "near_duplicate")
Found = list[list[tuple[str, str, str]]]  # per row: every failing (filter, reason code, detail), in order
INGEST_META_COLUMNS = ("key", "url", "caption", "status", "width", "height", "original_width",
                       "original_height", "sha256")


# -- configs --------------------------------------------------------------------------------------
DEFAULT_UNSAFE = ("nudity", "pornography", "graphic violence", "gore", "a dead body")
DEFAULT_SAFE = ("a photo", "a drawing", "a person", "an animal", "a landscape", "an object", "text")


@dataclass(kw_only=True, frozen=True)
class ScoreConfig:
    """What the scoring pass computes (its step key): the CLIP and the zero-shot concept prompts."""

    clip: ClipConfig
    """The CLIP that scores image-caption agreement and embeds images."""
    unsafe_concepts: tuple[str, ...] = DEFAULT_UNSAFE
    """Text prompts for content to drop; an image is compared with each (CLIP zero-shot)."""
    safe_concepts: tuple[str, ...] = DEFAULT_SAFE
    """Prompts an acceptable image should match at least as well as any unsafe one."""

    def __post_init__(self) -> None:
        if not self.unsafe_concepts or not self.safe_concepts:
            raise ValueError("ScoreConfig needs at least one unsafe and one safe concept prompt "
                             "(disable the unsafe filter in SelectConfig.unsafe instead)")


@dataclass(kw_only=True, frozen=True)
class SizeFilter:
    enabled: bool = True
    """Reject images whose shorter side (before ingest resizing) is below min_side."""
    min_side: int = 64
    """Pixels."""


@dataclass(kw_only=True, frozen=True)
class AspectFilter:
    enabled: bool = True
    """Reject very wide or tall images (banners, strips): centre crops of them lose the subject."""
    max_ratio: float = 3.0
    """Largest allowed long side / short side."""

    def __post_init__(self) -> None:
        if self.max_ratio < 1:
            raise ValueError(f"AspectFilter.max_ratio must be >= 1, got {self.max_ratio}")


DEFAULT_BOILERPLATE = (
    r"(image|photo|picture|pic|img|thumbnail|untitled|placeholder|no title|stock (photo|image))s?",
    r"(img|dsc|dscn|dcim|pxl|screenshot)[ _-]?[\d_ -]*(\.(jpe?g|png|gif|webp|heic))?",
    r"click (here|to enlarge|to download)( to (download|enlarge|view))?",
    r"(image|photo|picture) (not found|unavailable|description|coming soon)",
    r"(no|image) description( available)?",
    r"(photo|image|picture) (by|via|courtesy of|credit:?) .*",
)


@dataclass(kw_only=True, frozen=True)
class CaptionFilter:
    enabled: bool = True
    """Reject empty, URL-only, boilerplate, too short or too long captions."""
    min_words: int = 2
    """Fewest whitespace-separated words."""
    max_words: int = 128
    """Most words (T5 would truncate beyond its 128 tokens anyway)."""
    boilerplate: tuple[str, ...] = DEFAULT_BOILERPLATE
    """Regexes matched (case-insensitively) against the whole stripped caption."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_words <= self.max_words:
            raise ValueError(f"CaptionFilter needs 0 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        for pattern in self.boilerplate:
            re.compile(pattern)


@dataclass(kw_only=True, frozen=True)
class ExactDupFilter:
    enabled: bool = True
    """Keep only the first row (by key) of each sha256."""


@dataclass(kw_only=True, frozen=True)
class NearDupFilter:
    enabled: bool = True
    """Drop a row whose CLIP image embedding is within `threshold` cosine of an earlier kept row
    (and, unless max_thumbnail_mad is None, whose 8x8 thumbnail is close to that row's too)."""
    threshold: float = 0.95
    """CLIP image-image cosine above which two images are candidates for "the same picture"."""
    max_thumbnail_mad: float | None = 3.0
    """Confirmation: mean absolute difference of the two 8x8 RGB thumbnails (0-255 scale) at most
    this. CLIP alone also merges different pictures of the same subject: on the demo corpus the tiny
    CLIP puts distinct scenes that share a background at cosine 0.99, and CLIP-only dedup at 0.95
    dropped 166 of 256 clean rows; with this check 18, while missing 2 of 20 shifted copies.
    None: CLIP cosine alone (semantic deduplication)."""

    def __post_init__(self) -> None:
        if not -1.0 < self.threshold < 1.0:
            raise ValueError(f"NearDupFilter.threshold must be in (-1, 1), got {self.threshold}")
        if self.max_thumbnail_mad is not None and self.max_thumbnail_mad < 0:
            raise ValueError(f"NearDupFilter.max_thumbnail_mad must be >= 0 or None, got {self.max_thumbnail_mad}")


@dataclass(kw_only=True, frozen=True)
class ClipScoreFilter:
    mode: Literal["absolute", "percentile", "off"] = "absolute"
    """absolute: keep cosine >= min_score. percentile: keep the top keep_fraction of the rows that
    passed every other filter, ranked globally (ties by key)."""
    min_score: float = 0.28
    """Absolute threshold on CLIP image-caption cosine (LAION-400M used 0.3 with ViT-B/32)."""
    keep_fraction: float = 0.9
    """Fraction kept in percentile mode."""

    def __post_init__(self) -> None:
        if self.mode not in ("absolute", "percentile", "off"):
            raise ValueError(f"ClipScoreFilter.mode must be absolute, percentile or off, got {self.mode!r}")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"ClipScoreFilter.keep_fraction must be in (0, 1], got {self.keep_fraction}")


@dataclass(kw_only=True, frozen=True)
class UnsafeFilter:
    enabled: bool = True
    """Reject images whose best unsafe-concept similarity beats the best safe one by > margin."""
    margin: float = 0.0
    """Cosine margin; larger flags less."""


@dataclass(kw_only=True, frozen=True)
class SelectConfig:
    """The thresholds (the selection pass's step key): changing them never reruns CLIP."""

    size: SizeFilter = field(default_factory=SizeFilter)
    aspect: AspectFilter = field(default_factory=AspectFilter)
    caption: CaptionFilter = field(default_factory=CaptionFilter)
    unsafe: UnsafeFilter = field(default_factory=UnsafeFilter)
    clip_score: ClipScoreFilter = field(default_factory=ClipScoreFilter)
    exact_dup: ExactDupFilter = field(default_factory=ExactDupFilter)
    near_dup: NearDupFilter = field(default_factory=NearDupFilter)


@dataclass(kw_only=True, frozen=True)
class CurateConfig:
    score: ScoreConfig
    """Pass 1: CLIP scoring."""
    select: SelectConfig = field(default_factory=SelectConfig)
    """Pass 2: thresholds."""
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """The scoring actors (size, CPUs and GPUs each, fractions allowed): resources, not part of any step key."""


# -- inputs ---------------------------------------------------------------------------------------
def _absolute(path: str | pathlib.Path) -> pathlib.Path:
    """Paths travel to Ray workers, whose working directory need not be the driver's."""
    return pathlib.Path(path).expanduser().resolve()


# -- pass 1: score --------------------------------------------------------------------------------
def score_schema(embed_dim: int, clip: ClipConfig) -> pa.Schema:
    return pa.schema(
        [
            ("key", pa.string()),
            ("clip_score", pa.float32()),
            ("image_embedding", pa.list_(pa.float16(), embed_dim)),
            ("thumbnail", pa.binary(THUMB * THUMB * 3)),
            ("unsafe_margin", pa.float32()),
            ("unsafe_concept", pa.string()),
            ("score_error", pa.string()),
        ],
        metadata={"clip": json.dumps({"model_name": clip.model_name, "pretrained": clip.pretrained})},
    )


class ShardScorer:
    """Ray Data actor: loads CLIP once, then scores one ingest shard per call."""

    def __init__(self, config: ScoreConfig, ingest_dir: str, step: StepDir, torch_threads: int) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        self.config, self.ingest_dir, self.step = config, ingest_dir, step
        self.clip = Clip(config.clip)
        concepts = self.clip.encode_texts(list(config.unsafe_concepts) + list(config.safe_concepts))
        self.unsafe_emb = concepts[: len(config.unsafe_concepts)].numpy()
        self.safe_emb = concepts[len(config.unsafe_concepts):].numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for shard_id in batch["shard_id"]:
            table = self.score_shard(shard_path(self.ingest_dir, shard_id))
            atomic_write_parquet(shard_path(self.step.root, shard_id), table)
            scored = pc.sum(pc.is_valid(table["clip_score"])).as_py() or 0
            self.step.mark_done(shard_id, {"rows": table.num_rows, "scored": scored})
        return {"shard_id": batch["shard_id"]}

    def score_shard(self, path: pathlib.Path) -> pa.Table:
        rows = pq.read_table(path, columns=["key", "caption", "status", "image"]).to_pylist()
        n, dim = len(rows), self.unsafe_emb.shape[1]
        score = np.full(n, np.nan, np.float32)
        emb = np.zeros((n, dim), np.float32)
        thumbs = np.zeros((n, THUMB * THUMB * 3), np.uint8)
        errors: list[str | None] = [None] * n
        todo = [i for i, r in enumerate(rows) if r["status"] == "success" and r["image"] is not None]
        step = self.config.clip.batch_size
        for start in range(0, len(todo), step):  # decode a batch at a time: bounded memory
            images, ok = [], []
            for i in todo[start:start + step]:
                try:
                    images.append(decode_image(rows[i]["image"]))
                    ok.append(i)
                except Exception as exc:  # noqa: BLE001 - any undecodable image is a recorded reject
                    errors[i] = f"{type(exc).__name__}: {exc}"
            if not ok:
                continue
            thumbs[ok] = [np.asarray(im.resize((THUMB, THUMB), Image.Resampling.BOX)).reshape(-1) for im in images]
            img = self.clip.encode_images(images).numpy()
            txt = self.clip.encode_texts([rows[i]["caption"] or "" for i in ok]).numpy()
            emb[ok], score[ok] = img, (img * txt).sum(-1)
        has = ~np.isnan(score)
        unsafe_sims, safe_sims = emb @ self.unsafe_emb.T, emb @ self.safe_emb.T
        margin = unsafe_sims.max(1) - safe_sims.max(1)
        concept = [self.config.unsafe_concepts[j] for j in unsafe_sims.argmax(1)]
        return pa.table(
            {
                "key": [r["key"] for r in rows],
                "clip_score": pa.array(score, mask=~has),
                # Zeros, not nulls, where unscored (clip_score is null there): pyarrow 25 cannot read
                # back a parquet fixed-size-list column with null slots.
                "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float16).reshape(-1)), dim),
                "thumbnail": pa.array([t.tobytes() for t in thumbs], pa.binary(THUMB * THUMB * 3)),
                "unsafe_margin": pa.array(margin.astype(np.float32), mask=~has),
                "unsafe_concept": pa.array([c if h else None for c, h in zip(concept, has)], pa.string()),
                "score_error": pa.array(errors, pa.string()),
            },
            schema=score_schema(dim, self.config.clip),
        )


def score(ingest_dir: str | pathlib.Path, score_dir: str | pathlib.Path, config: ScoreConfig,
          pool: ActorPoolConfig = ActorPoolConfig()) -> dict[str, Any]:
    """Pass 1: CLIP-score every ingest shard into `score_dir/shards/`. Returns the step manifest."""
    ingest_dir, score_dir = _absolute(ingest_dir), _absolute(score_dir)
    ingest = finished_manifest(ingest_dir, "ingest")
    shard_ids = shard_ids_of(ingest)
    step = StepDir.open(score_dir, "curate_score", config, [ingest["key"]])
    if (manifest := step.manifest()) is not None:
        return manifest
    started = time.monotonic()
    pending = step.pending(shard_ids)
    if pending:
        check_clip_source(config.clip)
        map_shards_on_actor_pool(
            ShardScorer,
            {"config": config, "ingest_dir": str(ingest_dir), "step": step, "torch_threads": pool.torch_threads},
            pending, pool,
        )
    step.finish(shard_ids, clip={"model_name": config.clip.model_name, "pretrained": config.clip.pretrained},
                config=dataclasses.asdict(config), elapsed_s=round(time.monotonic() - started, 2))
    return step.manifest()  # as read back: JSON types, like a rerun returns


# -- pass 2: select -------------------------------------------------------------------------------
@dataclass
class Candidates:
    """Every input row's metadata and scores, in one frame (one row per ingested row)."""

    meta: Any  # pandas.DataFrame: INGEST_META_COLUMNS + shard_id + score columns
    embeddings: np.ndarray  # (N, E) float32 unit vectors, zeros where unscored
    thumbnails: np.ndarray  # (N, THUMB*THUMB*3) int16 RGB thumbnails, zeros where unscored


def load_candidates(ingest_dir: str | pathlib.Path, score_dir: str | pathlib.Path,
                    shard_ids: Sequence[str]) -> Candidates:
    """Join ingest metadata (no image bytes) with the scores, shard by shard."""
    parts = []
    for shard_id in shard_ids:
        meta = pq.read_table(shard_path(ingest_dir, shard_id), columns=list(INGEST_META_COLUMNS))
        scores = pq.read_table(shard_path(score_dir, shard_id))
        if meta.column("key").to_pylist() != scores.column("key").to_pylist():
            raise RuntimeError(f"score shard {shard_id} does not match its ingest shard: rerun scoring "
                               f"into a fresh directory")
        table = meta
        for name in scores.column_names[1:]:
            table = table.append_column(name, scores[name])
        parts.append(table.append_column("shard_id", pa.array([shard_id] * meta.num_rows, pa.string())))
    table = pa.concat_tables(parts)
    emb_col = table["image_embedding"].combine_chunks()
    embeddings = emb_col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, emb_col.type.list_size)
    thumbs = np.frombuffer(b"".join(table["thumbnail"].to_pylist()), np.uint8).reshape(table.num_rows, -1)
    meta_df = table.drop_columns(["image_embedding", "thumbnail"]).to_pandas()
    duplicated = meta_df["key"].duplicated()
    if duplicated.any():
        raise ValueError(f"ingest keys must be unique; repeated: {meta_df['key'][duplicated].head(5).tolist()}")
    return Candidates(meta=meta_df, embeddings=embeddings, thumbnails=thumbs.astype(np.int16))


def _caption_reasons(caption: str | None, cfg: CaptionFilter, patterns: list[re.Pattern]) -> list[str]:
    text = " ".join((caption or "").split())
    if not text:
        return ["caption_empty"]
    reasons = []
    if re.fullmatch(r"(https?://|www\.)\S+", text, re.IGNORECASE):
        reasons.append("caption_url_only")
    if any(p.fullmatch(text) for p in patterns):
        reasons.append("caption_boilerplate")
    words = len(text.split())
    if words < cfg.min_words:
        reasons.append("caption_too_short")
    if words > cfg.max_words:
        reasons.append("caption_too_long")
    return reasons


def per_sample_reasons(meta: Any, config: SelectConfig) -> Found:
    """For each row, every failing per-sample filter as (filter, reason code, detail), in FILTER_ORDER."""
    patterns = [re.compile(p, re.IGNORECASE) for p in config.caption.boilerplate]
    out = []
    for row in meta.itertuples(index=False):
        found: list[tuple[str, str, str]] = []
        if row.status != "success":
            found.append(("download", f"download_{row.status}", str(row.status)))
            out.append(found)
            continue  # nothing else can be judged without the image
        if row.score_error is not None or _isnan(row.clip_score):
            found.append(("decode", "undecodable", row.score_error or "not scored"))
        w = _first_valid(row.original_width, row.width)
        h = _first_valid(row.original_height, row.height)
        if config.size.enabled and (w is None or min(w, h) < config.size.min_side):
            found.append(("min_size", "too_small", f"{w}x{h} < {config.size.min_side}"))
        if config.aspect.enabled and w and h and max(w, h) / min(w, h) > config.aspect.max_ratio:
            ratio = max(w, h) / min(w, h)
            found.append(("aspect_ratio", "bad_aspect_ratio", f"{ratio:.2f} > {config.aspect.max_ratio}"))
        if config.caption.enabled:
            reasons = _caption_reasons(row.caption, config.caption, patterns)
            found += [("caption", r, repr(row.caption)[:80]) for r in reasons]
        if config.unsafe.enabled and not _isnan(row.unsafe_margin) and row.unsafe_margin > config.unsafe.margin:
            found.append(("unsafe", "unsafe", f"{row.unsafe_concept} by {row.unsafe_margin:.3f}"))
        if (config.clip_score.mode == "absolute" and not _isnan(row.clip_score)
                and row.clip_score < config.clip_score.min_score):
            found.append(("clip_score", "low_clip_score", f"{row.clip_score:.3f} < {config.clip_score.min_score}"))
        out.append(found)
    return out


def _isnan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _first_valid(*values: Any) -> int | None:
    for v in values:
        if not _isnan(v):
            return int(v)
    return None


def near_duplicates(emb: np.ndarray, thumbs: np.ndarray, threshold: float, max_mad: float | None,
                    block: int = 1024) -> list[int | None]:
    """Greedy in row order: row i duplicates the most similar earlier *kept* row j with
    cos(i, j) > threshold (and thumbnail MAD <= max_mad). Returns, per row, j or None.
    Blocked: memory O(block x kept); at web scale the cosine search would be an ANN index."""
    n = len(emb)
    dup_of: list[int | None] = [None] * n
    kept: list[int] = []

    def same_picture(i: int, j: int) -> bool:
        return max_mad is None or float(np.abs(thumbs[i] - thumbs[j]).mean()) <= max_mad

    for start in range(0, n, block):
        idx = range(start, min(n, start + block))
        sims_kept = emb[idx.start:idx.stop] @ emb[kept].T if kept else np.empty((len(idx), 0))
        sims_block = emb[idx.start:idx.stop] @ emb[idx.start:idx.stop].T
        block_kept: list[int] = []
        for row, i in enumerate(idx):
            cands = [(sims_kept[row, c], kept[c]) for c in np.flatnonzero(sims_kept[row] > threshold)]
            cands += [(sims_block[row, k - start], k) for k in block_kept if sims_block[row, k - start] > threshold]
            dup_of[i] = next((j for _, j in sorted(cands, reverse=True) if same_picture(i, j)), None)
            if dup_of[i] is None:
                block_kept.append(i)
        kept += block_kept
    return dup_of


def decide(cands: Candidates, config: SelectConfig) -> Any:
    """Every row's decision: columns decision, filter, reason, reasons, detail, duplicate_of."""
    by_key = cands.meta.sort_values("key", kind="stable")
    order = by_key.index.to_numpy()
    meta = by_key.reset_index(drop=True)  # row i is the i-th key: "first" below means first by key
    emb, thumbs = cands.embeddings[order], cands.thumbnails[order]
    found = per_sample_reasons(meta, config)
    duplicate_of: list[str | None] = [None] * len(meta)
    if config.exact_dup.enabled:
        _mark_exact_duplicates(meta, found, duplicate_of)
    if config.near_dup.enabled:
        _mark_near_duplicates(meta, emb, thumbs, config.near_dup, found, duplicate_of)
    if config.clip_score.mode == "percentile":
        _mark_below_percentile(meta, config.clip_score.keep_fraction, found)
    meta["decision"] = [REJECT if f else KEEP for f in found]
    meta["filter"] = [f[0][0] if f else None for f in found]
    meta["reason"] = [f[0][1] if f else None for f in found]
    meta["reasons"] = [[r for _, r, _ in f] for f in found]
    meta["detail"] = [f[0][2] if f else None for f in found]
    meta["duplicate_of"] = duplicate_of
    return meta


def _alive(found: Found) -> list[int]:
    """Rows no filter has rejected so far, in key order."""
    return [i for i, f in enumerate(found) if not f]


def _mark_exact_duplicates(meta: Any, found: Found, duplicate_of: list[str | None]) -> None:
    first: dict[str, int] = {}
    for i in _alive(found):
        sha = meta.at[i, "sha256"]
        if sha in first:
            j = first[sha]
            found[i].append(("exact_duplicate", "exact_duplicate", f"same sha256 as {meta.at[j, 'key']}"))
            duplicate_of[i] = meta.at[j, "key"]
        else:
            first[sha] = i


def _mark_near_duplicates(meta: Any, emb: np.ndarray, thumbs: np.ndarray, config: NearDupFilter, found: Found,
                          duplicate_of: list[str | None]) -> None:
    alive = _alive(found)
    if not alive:
        return
    dups = near_duplicates(emb[alive], thumbs[alive], config.threshold, config.max_thumbnail_mad)
    for pos, d in enumerate(dups):
        if d is not None:
            i, j = alive[pos], alive[d]
            mad = float(np.abs(thumbs[i] - thumbs[j]).mean())
            found[i].append(("near_duplicate", "near_duplicate",
                             f"cos {float(emb[i] @ emb[j]):.3f}, thumbnail MAD {mad:.1f} with {meta.at[j, 'key']}"))
            duplicate_of[i] = meta.at[j, "key"]


def _mark_below_percentile(meta: Any, keep_fraction: float, found: Found) -> None:
    """Rank the survivors globally, best first (ties by key); keep exactly round(fraction * n)."""
    alive = _alive(found)
    if not alive:
        return
    n_keep = math.floor(keep_fraction * len(alive) + 0.5)
    ranked = sorted(alive, key=lambda i: (-meta.at[i, "clip_score"], meta.at[i, "key"]))
    cutoff = meta.at[ranked[n_keep - 1], "clip_score"] if n_keep else math.inf
    for i in ranked[n_keep:]:
        found[i].append(("clip_score", "below_clip_percentile",
                         f"{meta.at[i, 'clip_score']:.3f} below the top {keep_fraction:.0%} (cutoff {cutoff:.3f})"))


DECISION_COLUMNS = ("key", "url", "caption", "status", "decision", "filter", "reason", "reasons", "detail",
                    "clip_score", "unsafe_margin", "unsafe_concept", "duplicate_of")
KEPT_COLUMNS = ("key", "url", "caption", "image", "width", "height", "sha256")


def write_selected_shard(step: StepDir, shard_id: str, ingest_path: str, decisions: pa.Table,
                         embeddings: np.ndarray, clip_meta: str) -> dict[str, Any]:
    """One shard of pass 2: the kept rows with their image bytes, and the shard's decision table."""
    atomic_write_parquet(shard_path(step.root, shard_id, "decisions"), decisions)
    kept_mask = pc.equal(decisions["decision"], KEEP)
    kept_keys = decisions.filter(kept_mask)
    rows = pq.read_table(ingest_path, columns=list(KEPT_COLUMNS))
    rows = rows.filter(pc.is_in(rows["key"], value_set=kept_keys["key"]))
    by_key = {k: i for i, k in enumerate(kept_keys["key"].to_pylist())}
    pick = [by_key[k] for k in rows["key"].to_pylist()]
    emb = embeddings[np.asarray(kept_mask.to_numpy(zero_copy_only=False), bool)][pick]
    dim = embeddings.shape[1]
    rows = rows.append_column("clip_score", kept_keys["clip_score"].take(pick))
    rows = rows.append_column("clip_image_embedding", pa.FixedSizeListArray.from_arrays(
        pa.array(emb.astype(np.float16).reshape(-1)), dim))
    rows = rows.replace_schema_metadata({"clip": clip_meta})
    # Small row groups: training reads a few rows at a time, and a group holds whole images.
    atomic_write_parquet(shard_path(step.root, shard_id), rows, row_group_size=256)
    stats = {"rows": decisions.num_rows, "kept": rows.num_rows}
    step.mark_done(shard_id, stats)
    return stats


def select(ingest_dir: str | pathlib.Path, score_dir: str | pathlib.Path, curate_dir: str | pathlib.Path,
           config: SelectConfig = SelectConfig()) -> dict[str, Any]:
    """Pass 2: global selection from stored scores (no CLIP). Returns the step manifest."""
    import ray

    from pipelines.ray_env import init_ray
    from pipelines.step import run_shards

    ingest_dir, score_dir, curate_dir = _absolute(ingest_dir), _absolute(score_dir), _absolute(curate_dir)
    ingest = finished_manifest(ingest_dir, "ingest")
    scores = finished_manifest(score_dir, "curate scoring")
    shard_ids = shard_ids_of(ingest)
    step = StepDir.open(curate_dir, "curate_select", config, [ingest["key"], scores["key"]])
    if (manifest := step.manifest()) is not None:
        return manifest
    started = time.monotonic()
    cands = load_candidates(ingest_dir, score_dir, shard_ids)
    decided = decide(cands, config)
    emb_by_key = dict(zip(cands.meta["key"], range(len(cands.meta))))
    clip_meta = json.dumps(scores["clip"])
    pending = step.pending(shard_ids)
    if pending:
        init_ray()
        writer = ray.remote(num_cpus=0.5)(write_selected_shard)
        args = {}
        for shard_id in pending:
            part = decided[decided["shard_id"] == shard_id]
            table = pa.Table.from_pandas(part[list(DECISION_COLUMNS)], preserve_index=False,
                                         schema=_decision_schema())
            emb = cands.embeddings[[emb_by_key[k] for k in part["key"]]]
            args[shard_id] = (step, shard_id, str(shard_path(ingest_dir, shard_id)), table, emb, clip_meta)
        run_shards(writer, args, max_in_flight=4)
    step.finish(shard_ids, funnel=funnel(decided), clip=scores["clip"], config=dataclasses.asdict(config),
                ingest_dir=str(ingest_dir), score_dir=str(score_dir), elapsed_s=round(time.monotonic() - started, 2))
    return step.manifest()  # as read back: JSON types, like a rerun returns


def _decision_schema() -> pa.Schema:
    return pa.schema([
        ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
        ("decision", pa.string()), ("filter", pa.string()), ("reason", pa.string()),
        ("reasons", pa.list_(pa.string())), ("detail", pa.string()), ("clip_score", pa.float32()),
        ("unsafe_margin", pa.float32()), ("unsafe_concept", pa.string()), ("duplicate_of", pa.string()),
    ])


def funnel(decided: Any) -> dict[str, Any]:
    """input -> each filter (rows it removed first, by reason) -> kept."""
    stages = []
    remaining = len(decided)
    for name in FILTER_ORDER:
        removed = decided[decided["filter"] == name]
        by_reason = removed["reason"].value_counts().sort_index().to_dict()
        remaining -= len(removed)
        stages.append({"filter": name, "removed": len(removed), "remaining": remaining,
                       "reasons": {k: int(v) for k, v in by_reason.items()}})
    downloaded = int((decided["status"] == "success").sum())
    return {"input": len(decided), "downloaded": downloaded, "stages": stages,
            "kept": int((decided["decision"] == KEEP).sum())}


def curate(ingest_dir: str | pathlib.Path, curate_dir: str | pathlib.Path, config: CurateConfig, *,
           score_dir: str | pathlib.Path | None = None) -> dict[str, Any]:
    """Score (into `score_dir`, default `<curate_dir>/scores`) then select into `curate_dir`.

    To select again with other thresholds, call with a new `curate_dir` and the same `score_dir`.
    """
    score_dir = pathlib.Path(curate_dir) / "scores" if score_dir is None else pathlib.Path(score_dir)
    score(ingest_dir, score_dir, config.score, config.pool)
    return select(ingest_dir, score_dir, curate_dir, config.select)


def read_decisions(curate_dir: str | pathlib.Path) -> pa.Table:
    """All decision shards of a finished selection, concatenated."""
    manifest = finished_manifest(curate_dir, "curate")
    return pa.concat_tables([pq.read_table(shard_path(curate_dir, s, "decisions")) for s in shard_ids_of(manifest)])
