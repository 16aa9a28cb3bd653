"""Curate: decide, for every ingested row, keep or reject, with the filter and reason that decided it.

Two steps, each a `StepDir` (per-shard done records, manifest last):

1. `score` (expensive, CLIP): per ingest shard, the CLIP image-text cosine, the unit image embedding
   (fp16) and the zero-shot unsafe margin of every downloaded image. One Ray Data pipeline: CPU tasks
   (`DecodeConfig`) decode and CLIP-preprocess each shard's images into chunks of pixel tensors (one forward
   pass each), which feed the model's actor pool (`ActorPoolConfig`, GPUs per actor); the driver writes each
   score shard and its done record once all of the shard's chunks are scored.
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
import functools
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
from PIL import Image

from pipelines import storage
from pipelines.ann_index import IvfConfig, load_npy, read_parquet, remove_tree
from pipelines.clip_model import Clip, ClipConfig, check_clip_source, clip_preprocess, decode_image
from pipelines.select_stages import (DECISION_COLUMNS, FILTER_ORDER, INGEST_META_COLUMNS, KEEP, KEPT_COLUMNS,  # noqa: F401
                                     REJECT, SCORE_HIST_BINS, THUMB, PercentileCut, _Select, as_namespace,
                                     caption_reasons, funnel, merge_funnels, per_sample_decisions, shard_funnel)
from pipelines.step import (ActorPoolConfig, StepDir, atomic_write_parquet, finished_manifest,
                            shard_ids_of, shard_path)
from pipelines.storage import StoragePath

Where = str | pathlib.Path | StoragePath


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

    def __post_init__(self) -> None:
        if self.min_side < 0:
            raise ValueError(f"SizeFilter.min_side must be >= 0 pixels, got {self.min_side}")


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
    """Drop a row whose CLIP image embedding is within `threshold` cosine of a row with a smaller key
    that passed every per-sample filter, when the pixel checks below confirm it is the same picture.
    Candidates come from an inverted-file index (k-means lists, pipelines/ann_index.py), compared only
    within lists (pipelines/dedup.py)."""
    threshold: float = 0.95
    """CLIP image-image cosine above which two images are candidates for "the same picture"."""
    max_thumbnail_mad: float | None = 8.0
    """Cheap pre-check: mean absolute difference of the two 8x8 RGB thumbnails (0-255 scale) at most
    this. None: skip it. Shifted copies of demo images reach 4.2, so 3.0 (the old sole check) missed
    some; distinct demo scenes sharing a background go as low as 0.3, hence the pixel check below."""
    max_changed_pixels: int | None = 2
    """Confirmation: both images at 64x64, at the best shift up to max_shift_px, at most this many
    pixels differ by more than pixel_tolerance (after a 2x2 erosion). Shifted, re-encoded demo copies
    have 0-1; distinct scenes with the same layout (a circle against a cross) tens. On the demo corpus
    (480 rows) it removes every planted copy and 3 of 308 clean rows (the 8x8 thumbnail check alone at
    3.0: 29 clean rows). None: CLIP (and the thumbnail pre-check) alone, i.e. semantic deduplication."""
    max_shift_px: int = 3
    """Largest shift (pixels at 64x64) tried when aligning the two images."""
    pixel_tolerance: int = 64
    """Channel difference (0-255) above which a pixel counts as changed."""
    rows_per_list: int = 1024
    """Rows per k-means list of the index (lists = ceil(rows / rows_per_list)); each row is compared with
    the members of its `nprobe` nearest lists only: work per row is O(nprobe x rows_per_list)."""
    nprobe: int = 3
    """Lists each row is compared in: its own and the next nearest (pairs split by a list border)."""
    seed: int = 1234
    """k-means seed (and of the key-hash sample it trains on)."""

    def __post_init__(self) -> None:
        if not -1.0 < self.threshold < 1.0:
            raise ValueError(f"NearDupFilter.threshold must be in (-1, 1), got {self.threshold}")
        if self.max_thumbnail_mad is not None and self.max_thumbnail_mad < 0:
            raise ValueError(f"NearDupFilter.max_thumbnail_mad must be >= 0 or None, got {self.max_thumbnail_mad}")
        if self.max_changed_pixels is not None and self.max_changed_pixels < 0:
            raise ValueError(f"NearDupFilter.max_changed_pixels must be >= 0 or None, got {self.max_changed_pixels}")
        if not 0 <= self.max_shift_px <= 8 or not 0 <= self.pixel_tolerance <= 255:
            raise ValueError(f"NearDupFilter needs 0 <= max_shift_px <= 8 and 0 <= pixel_tolerance <= 255, got "
                             f"{self.max_shift_px}, {self.pixel_tolerance}")
        if self.rows_per_list < 1 or self.nprobe < 1:
            raise ValueError(f"NearDupFilter needs rows_per_list >= 1 and nprobe >= 1, got {self.rows_per_list}, "
                             f"{self.nprobe}")

    def ivf(self) -> IvfConfig:
        return IvfConfig(rows_per_list=self.rows_per_list, seed=self.seed)


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
        if not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f"ClipScoreFilter.min_score is a cosine, in [-1, 1]; got {self.min_score}")


@dataclass(kw_only=True, frozen=True)
class UnsafeFilter:
    enabled: bool = True
    """Reject images whose best unsafe-concept similarity beats the best safe one by > margin."""
    margin: float = 0.0
    """Cosine margin; larger flags less."""

    def __post_init__(self) -> None:
        if not -2.0 <= self.margin <= 2.0:
            raise ValueError(f"UnsafeFilter.margin is a difference of two cosines, in [-2, 2]; got {self.margin}")


@dataclass(kw_only=True, frozen=True)
class UnsafeClassifierFilter:
    enabled: bool = False
    """Reject images a trained unsafe-content head (LAION NSFW-detector shape: an MLP on the CLIP image
    embedding, pipelines/heads.py) scores above max_score. Off by default: it needs a head file made
    for the scoring CLIP."""
    head: str | None = None
    """The head's .safetensors file (required when enabled)."""
    max_score: float = 0.5
    """Highest allowed head output (a probability for a sigmoid head)."""

    def __post_init__(self) -> None:
        if self.enabled and not self.head:
            raise ValueError("UnsafeClassifierFilter is enabled but names no head file (head = \"path.safetensors\")")
        if not math.isfinite(self.max_score):
            raise ValueError(f"UnsafeClassifierFilter.max_score must be a finite number, got {self.max_score}")


@dataclass(kw_only=True, frozen=True)
class AestheticFilter:
    enabled: bool = False
    """Reject images a trained aesthetic head (LAION improved-aesthetic-predictor shape: an MLP on the
    CLIP image embedding, pipelines/heads.py) scores below min_score. Off by default: it needs a head
    file made for the scoring CLIP."""
    head: str | None = None
    """The head's .safetensors file (required when enabled)."""
    min_score: float = 5.0
    """Lowest allowed head output (LAION-Aesthetics subsets cut at 5, 6 and 6.5 on its 1-10 scale)."""

    def __post_init__(self) -> None:
        if self.enabled and not self.head:
            raise ValueError("AestheticFilter is enabled but names no head file (head = \"path.safetensors\")")
        if not math.isfinite(self.min_score):
            raise ValueError(f"AestheticFilter.min_score must be a finite number, got {self.min_score}")


@dataclass(kw_only=True, frozen=True)
class SelectConfig:
    """The thresholds (the selection pass's step key): changing them never reruns CLIP."""

    size: SizeFilter = field(default_factory=SizeFilter)
    aspect: AspectFilter = field(default_factory=AspectFilter)
    caption: CaptionFilter = field(default_factory=CaptionFilter)
    unsafe: UnsafeFilter = field(default_factory=UnsafeFilter)
    unsafe_classifier: UnsafeClassifierFilter = field(default_factory=UnsafeClassifierFilter)
    aesthetic: AestheticFilter = field(default_factory=AestheticFilter)
    clip_score: ClipScoreFilter = field(default_factory=ClipScoreFilter)
    exact_dup: ExactDupFilter = field(default_factory=ExactDupFilter)
    near_dup: NearDupFilter = field(default_factory=NearDupFilter)


@dataclass(kw_only=True, frozen=True)
class DecodeConfig:
    """The CPU stage of scoring: Ray Data tasks that decode each image and apply CLIP's preprocessing (resize,
    crop, normalise), feeding the model's actors pixel tensors. Resources only, not part of any step key."""

    num_cpus: float = 0.5
    """CPUs reserved per decode task (fractions allowed; each task decodes on one core)."""
    concurrency: int | None = None
    """Most decode tasks at once (None: as many as the free CPUs allow)."""

    def __post_init__(self) -> None:
        if self.num_cpus <= 0 or (self.concurrency is not None and self.concurrency < 1):
            raise ValueError(f"DecodeConfig needs num_cpus > 0 and concurrency >= 1 or None: {self}")


@dataclass(kw_only=True, frozen=True)
class CurateConfig:
    score: ScoreConfig
    """Pass 1: CLIP scoring."""
    select: SelectConfig = field(default_factory=SelectConfig)
    """Pass 2: thresholds."""
    search_index: IvfConfig | None = field(default_factory=IvfConfig)
    """The index `imagen data search` queries, built over the kept rows after selection (None: build
    it on the first search instead)."""
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """The scoring model's actors (size, CPUs and GPUs each, fractions allowed): resources, not part of any step
    key."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """The CPU decode/preprocess tasks that feed those actors (CPUs each): resources, not part of any step key."""


# -- inputs ---------------------------------------------------------------------------------------
def _absolute(path: Where) -> StoragePath:
    """A local path made absolute (paths travel to Ray workers, whose working directory need not be the
    driver's), or an object-store URL."""
    return storage.path(path)


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


def _rows_to_score(rows: list[dict]) -> list[int]:
    return [i for i, r in enumerate(rows) if r["status"] == "success" and r["image"] is not None]


def decode_chunks(shard_id: str, rows: list[dict], preprocess: Any, batch_size: int) -> list[dict[str, Any]]:
    """CPU work of one ingest shard's scoring, no model: decode, 8x8 thumbnail and CLIP preprocessing (resize,
    crop; normalising is the model's) of every downloaded image, in chunks of `batch_size` rows (one model
    forward pass each, the rows that decoded). Each chunk is one record: `pixels` (batch_size, H, W, 3) uint8
    with the first `n` filled, their shard row numbers `rows` (-1 beyond n), `thumbs`, captions and decode errors (JSON). A shard
    with nothing to score gives one empty chunk, so that every shard reaches the model stage; chunk 0 carries
    every key of the shard (in order) and every chunk the shard's chunk count."""
    todo = _rows_to_score(rows)
    starts = list(range(0, len(todo), batch_size)) or [0]
    chunks = []
    for c, start in enumerate(starts):
        pixels, ok, thumbs, errors = [], [], [], {}
        for i in todo[start:start + batch_size]:
            try:
                image = decode_image(rows[i]["image"])
            except Exception as exc:  # noqa: BLE001 - any undecodable image is a recorded reject
                errors[str(i)] = f"{type(exc).__name__}: {exc}"
                continue
            ok.append(i)
            thumbs.append(np.asarray(image.resize((THUMB, THUMB), Image.Resampling.BOX)).reshape(-1))
            pixels.append(preprocess(image))
        n = len(ok)
        shape = pixels[0].shape if pixels else preprocess(Image.new("RGB", (THUMB, THUMB))).shape
        block = np.zeros((batch_size, *shape), np.uint8)
        if n:
            block[:n] = np.stack(pixels)
        thumb_block = np.zeros((batch_size, THUMB * THUMB * 3), np.uint8)
        if n:
            thumb_block[:n] = np.stack(thumbs)
        chunks.append({
            "shard_id": shard_id, "chunk": c, "n_chunks": len(starts), "n": n,
            "rows": np.array(ok + [-1] * (batch_size - n), np.int64), "pixels": block, "thumbs": thumb_block,
            "captions": json.dumps([rows[i]["caption"] or "" for i in ok]), "errors": json.dumps(errors),
            "keys": json.dumps([r["key"] for r in rows]) if c == 0 else "",
        })
    return chunks


class DecodeShards:
    """Ray Data task UDF (CPU): one ingest shard id in, its chunks of preprocessed pixels out, one at a time."""

    def __init__(self, ingest_dir: str, preprocess: Any, batch_size: int) -> None:
        self.ingest_dir, self.preprocess, self.batch_size = ingest_dir, preprocess, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        for shard_id in batch["shard_id"]:
            rows = read_parquet(shard_path(self.ingest_dir, str(shard_id)),
                                columns=["key", "caption", "status", "image"]).to_pylist()
            for chunk in decode_chunks(str(shard_id), rows, self.preprocess, self.batch_size):
                yield {k: np.asarray([v]) if not isinstance(v, np.ndarray) else v[None] for k, v in chunk.items()}


def _decode_batch(batch: dict[str, np.ndarray], ingest_dir: str, preprocess: Any, batch_size: int) -> Any:
    yield from DecodeShards(ingest_dir, preprocess, batch_size)(batch)


class ClipScorer:
    """Ray Data actor (the model stage): loads CLIP once, then scores one chunk of preprocessed pixels per
    call. It never sees image bytes: decoding and preprocessing ran in the CPU tasks before it."""

    def __init__(self, config: ScoreConfig, torch_threads: int, preprocess_repr: str | None = None) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        self.config = config
        self.clip = Clip(config.clip)
        if preprocess_repr is not None and repr(self.clip.preprocess) != preprocess_repr:
            raise RuntimeError(f"the decode tasks' CLIP transform {preprocess_repr} differs from the model's "
                               f"{self.clip.preprocess!r}")
        concepts = self.clip.encode_texts(list(config.unsafe_concepts) + list(config.safe_concepts))
        self.unsafe_emb = concepts[: len(config.unsafe_concepts)].numpy()
        self.safe_emb = concepts[len(config.unsafe_concepts):].numpy()

    def score_chunk(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """One chunk -> clip score, image embedding (float32), unsafe margin and concept index per filled row."""
        n, width = int(chunk["n"]), len(chunk["rows"])
        dim = self.unsafe_emb.shape[1]
        emb = np.zeros((width, dim), np.float32)
        score = np.full(width, np.nan, np.float32)
        if n:
            img = self.clip.encode_pixels(chunk["pixels"][:n]).numpy()
            txt = self.clip.encode_texts(json.loads(chunk["captions"])).numpy()
            emb[:n], score[:n] = img, (img * txt).sum(-1)
        unsafe_sims, safe_sims = emb @ self.unsafe_emb.T, emb @ self.safe_emb.T
        margin = (unsafe_sims.max(1) - safe_sims.max(1)).astype(np.float32)
        return {"emb": emb, "score": score, "margin": margin, "concept": unsafe_sims.argmax(1).astype(np.int32)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {}
        for j in range(len(batch["shard_id"])):
            chunk = {k: v[j] for k, v in batch.items()}
            scored = self.score_chunk(chunk)
            for k in ("shard_id", "chunk", "n_chunks", "n", "rows", "thumbs", "errors", "keys"):
                out.setdefault(k, []).append(chunk[k])
            for k, v in scored.items():
                out.setdefault(k, []).append(v)
        return {k: np.stack(v) if isinstance(v[0], np.ndarray) else np.asarray(v) for k, v in out.items()}


def assemble_scores(config: ScoreConfig, dim: int, chunks: Sequence[dict[str, Any]]) -> pa.Table:
    """One score shard from all its scored chunks (any order): every ingest row, in the shard's order."""
    chunks = sorted(chunks, key=lambda c: int(c["chunk"]))
    keys = json.loads(chunks[0]["keys"])
    n = len(keys)
    score = np.full(n, np.nan, np.float32)
    emb = np.zeros((n, dim), np.float32)
    thumbs = np.zeros((n, THUMB * THUMB * 3), np.uint8)
    margin = np.zeros(n, np.float32)
    concept_ix = np.zeros(n, np.int64)
    errors: list[str | None] = [None] * n
    for c in chunks:
        k = int(c["n"])
        ok = np.asarray(c["rows"][:k], np.int64)
        score[ok], emb[ok], thumbs[ok] = c["score"][:k], c["emb"][:k], c["thumbs"][:k]
        margin[ok], concept_ix[ok] = c["margin"][:k], c["concept"][:k]
        for i, error in json.loads(c["errors"]).items():
            errors[int(i)] = error
    has = ~np.isnan(score)
    concept = [config.unsafe_concepts[j] if h else None for j, h in zip(concept_ix, has)]
    return pa.table(
        {
            "key": keys,
            "clip_score": pa.array(score, mask=~has),
            # Zeros, not nulls, where unscored (clip_score is null there): pyarrow 25 cannot read
            # back a parquet fixed-size-list column with null slots.
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float16).reshape(-1)), dim),
            "thumbnail": pa.array([t.tobytes() for t in thumbs], pa.binary(THUMB * THUMB * 3)),
            "unsafe_margin": pa.array(margin, mask=~has),
            "unsafe_concept": pa.array(concept, pa.string()),
            "score_error": pa.array(errors, pa.string()),
        },
        schema=score_schema(dim, config.clip),
    )


class ShardScorer(ClipScorer):
    """Both stages in one process, shard after shard (the benchmark's plain-loop baseline, and a debugger's)."""

    def __init__(self, config: ScoreConfig, ingest_dir: str, step: StepDir, torch_threads: int) -> None:
        super().__init__(config, torch_threads)
        self.ingest_dir, self.step = ingest_dir, step

    def score_shard(self, path: Where) -> pa.Table:
        rows = read_parquet(path, columns=["key", "caption", "status", "image"]).to_pylist()
        chunks = decode_chunks(storage.path(path).stem, rows, self.clip.preprocess, self.config.clip.batch_size)
        return assemble_scores(self.config, self.unsafe_emb.shape[1],
                               [{**c, **self.score_chunk(c)} for c in chunks])


def scoring_dataset(ingest_dir: StoragePath, config: ScoreConfig, shard_ids: Sequence[str], pool: ActorPoolConfig,
                    decode: "DecodeConfig", scorer_cls: type = ClipScorer) -> Any:
    """The lazy Ray Data pipeline: shard ids -> CPU decode tasks (chunks of preprocessed pixels) -> the model's
    actor pool (scores, embeddings). Nothing runs until it is iterated."""
    import ray

    preprocess = clip_preprocess(config.clip)
    ds = ray.data.from_items([{"shard_id": s} for s in shard_ids], override_num_blocks=len(shard_ids))
    # ray_remote_args_fn keeps Ray Data from fusing this stage into the actors' (it fuses a task map into the
    # actor map after it when their resources match): decoding must stay out of the model's processes.
    ds = ds.map_batches(_decode_batch, batch_size=1, num_cpus=decode.num_cpus, concurrency=decode.concurrency,
                        ray_remote_args_fn=functools.partial(dict, num_cpus=decode.num_cpus),
                        fn_kwargs={"ingest_dir": str(ingest_dir), "preprocess": preprocess,
                                   "batch_size": config.clip.batch_size})
    return pool.wait_for_actors(ds.map_batches(
        scorer_cls, batch_size=1,
        fn_constructor_kwargs={"config": config, "torch_threads": pool.torch_threads,
                               "preprocess_repr": repr(preprocess)},
        compute=ray.data.ActorPoolStrategy(size=pool.size), num_cpus=pool.num_cpus, num_gpus=pool.num_gpus or None,
    ))


def _score_pending(ingest_dir: StoragePath, step: StepDir, config: ScoreConfig, pending: Sequence[str],
                   pool: ActorPoolConfig, decode: "DecodeConfig", scorer_cls: type = ClipScorer) -> None:
    """Stream every pending shard through the two stages; a shard's scores file and done record are written
    (here, on the driver) as soon as all its chunks are scored, so a killed run resumes shard by shard.

    Limit: every row's scores pass through this process (about 2.5 KB a row with a 512-wide embedding: the
    embedding, thumbnail and scores), so one driver core caps scoring at some tens of thousands of rows a
    second, which is about a hundred GPU nodes' worth. Past that the assembly belongs in a distributed stage
    (scored chunks written as parts by the actors, merged per shard by a task)."""
    from pipelines.ray_env import init_ray

    init_ray()
    ds = scoring_dataset(ingest_dir, config, pending, pool, decode, scorer_cls)
    partial: dict[str, list[dict[str, Any]]] = {}
    written: set[str] = set()
    with pool.explained_start_timeout("curate.pool"):  # Ray's timeout if the actors cannot start
        for row in ds.iter_rows():
            shard_id = str(row["shard_id"])
            got = partial.setdefault(shard_id, [])
            got.append(row)
            if len(got) == int(row["n_chunks"]):
                table = assemble_scores(config, row["emb"].shape[-1], got)
                atomic_write_parquet(shard_path(step.root, shard_id), table)
                scored = pc.sum(pc.is_valid(table["clip_score"])).as_py() or 0
                step.mark_done(shard_id, {"rows": table.num_rows, "scored": scored})
                written.add(shard_id)
                del partial[shard_id]
    missing = set(pending) - written
    if missing:
        raise RuntimeError(f"scoring returned incomplete results for shards {sorted(missing)}")


def score(ingest_dir: Where, score_dir: Where, config: ScoreConfig,
          pool: ActorPoolConfig = ActorPoolConfig(), decode: "DecodeConfig | None" = None) -> dict[str, Any]:
    """Pass 1: CLIP-score every ingest shard into `score_dir/shards/`. Returns the step manifest.

    Decoding and CLIP preprocessing run as CPU Ray Data tasks (`decode`), the model on an actor pool (`pool`,
    GPUs per actor with ClipConfig.device "cuda"); neither is part of the step key."""
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
        _score_pending(ingest_dir, step, config, pending, pool, decode or DecodeConfig())
    step.finish(shard_ids, clip={"model_name": config.clip.model_name, "pretrained": config.clip.pretrained},
                config=dataclasses.asdict(config), elapsed_s=round(time.monotonic() - started, 2))
    return step.manifest()  # as read back: JSON types, like a rerun returns


# -- the selection step -----------------------------------------------------------------------------------
def _sub_step(job: _Select, name: str, shard_ids: Sequence[str], fn: Any, args: dict[str, tuple],
              max_in_flight: int = 4) -> dict[str, Any]:
    """Run `fn` (a ray.remote) for the not yet done ids of one work stage; returns their results."""
    from pipelines.step import run_shards

    stage = StepDir(root=job.stage(name), name=f"curate_select_{name}", key="")
    todo = {s: args[s] for s in shard_ids if not stage.is_done(s)}
    return run_shards(fn, todo, max_in_flight=max_in_flight) if todo else {}


def select(ingest_dir: Where, score_dir: Where, curate_dir: Where,
           config: SelectConfig = SelectConfig(), *, search_index: IvfConfig | None = IvfConfig(),
           max_in_flight: int = 4) -> dict[str, Any]:
    """Pass 2: selection from stored scores (no CLIP), as Ray tasks over shards; the driver holds only
    per-shard counts (and, in percentile mode, a 65536-bin histogram and the keys tied at the cut).

    Stages, each resumable (done records under `<curate_dir>/_work/<stage>/`):
    1. filter (per shard): every per-sample filter, vectorised; the k-means sample (by key hash).
    2. train (one task): k-means lists + HNSW quantizer on the sample (pipelines/ann_index.py).
    3. assign (per shard): alive rows to sha256 buckets and to their nprobe nearest lists.
    4. dedup (per bucket): exact duplicates (first by key stays); near-duplicate candidates within
       lists that pass the thumbnail pre-check (pipelines/dedup.py).
    5. export (per shard): 64x64 images of the candidates' originals.
    6. decide (per shard): exact and confirmed near duplicates; percentile counts.
    7. the percentile cut, exact, from summed per-shard radix counts (pipelines/sketches.py).
    8. write (per shard): decisions/ and shards/, funnel counts and score histograms.
    Then the search index over the kept rows (`search_index`; None: built on the first search).
    Returns the step manifest."""
    import ray

    from pipelines import select_stages as st
    from pipelines.ann_index import build_search_index
    from pipelines.heads import file_digest
    from pipelines.ray_env import init_ray

    ingest_dir, score_dir, curate_dir = _absolute(ingest_dir), _absolute(score_dir), _absolute(curate_dir)
    ingest = finished_manifest(ingest_dir, "ingest")
    scores = finished_manifest(score_dir, "curate scoring")
    shard_ids = shard_ids_of(ingest)
    if not shard_ids:
        raise ValueError(f"nothing to select: the ingest step at {ingest_dir} has no shards (an empty URL list?)")
    # a wrong score dir fails here, before any work; every shard's embeddings are as wide as the first's
    schema = st.check_score_shard(shard_path(score_dir, shard_ids[0]), shard_ids[0])
    dim = schema.field("image_embedding").type.list_size
    heads = st._load_heads(config)  # a missing head file fails here, before any work
    if heads:
        for head in heads.values():
            head.check_clip(scores["clip"], dim)
    head_keys = [file_digest(h.path) for h in heads.values()]
    step = StepDir.open(curate_dir, "curate_select", config, [ingest["key"], scores["key"], *head_keys])
    if (manifest := step.manifest()) is not None:
        return manifest
    started = time.monotonic()
    timings: dict[str, float] = {}
    clip = scores["clip"]
    job = _Select(ingest_dir=str(ingest_dir), score_dir=str(score_dir), curate_dir=str(curate_dir),
                  shard_ids=tuple(shard_ids), config=as_namespace(config), clip=clip)
    init_ray()
    remote = lambda fn: ray.remote(num_cpus=0.5)(fn)  # noqa: E731 - fractional: see ActorPoolConfig
    index = {s: i for i, s in enumerate(shard_ids)}
    near = config.near_dup
    scored = sum(int(s.get("scored", s.get("rows", 0))) for s in scores["shards"])
    ivf = near.ivf()
    fraction = ivf.sample_fraction(scored) if near.enabled else 0.0

    def timed(name: str, fn: Any) -> Any:
        t = time.monotonic()
        result = fn()
        timings[name] = round(time.monotonic() - t, 2)
        return result

    filter_step = StepDir(root=job.stage("filter"), name="curate_select_filter", key="")
    timed("filter", lambda: _sub_step(job, "filter", shard_ids, remote(st._filter_shard),
                                      {s: (job, s, fraction) for s in shard_ids}, max_in_flight))
    alive = sum(filter_step.shard_stats(s)["alive"] for s in shard_ids)
    use_exact = config.exact_dup.enabled and alive > 0
    use_near = near.enabled and alive > 0
    n_buckets = 1
    if use_near:
        n_lists = ivf.n_lists(alive)
        samples = [str(shard_path(job.stage("filter"), s, "sample")) for s in shard_ids
                   if filter_step.shard_stats(s)["sampled"]]
        if not (job.stage("quantizer") / "centroids.npy").exists():
            from pipelines.ann_index import train_from_samples

            trainer = ray.remote(num_cpus=1)(train_from_samples)
            n_lists = timed("train", lambda: ray.get(trainer.remote(
                samples if n_lists > 1 else [], "embedding", n_lists, ivf, dim, str(job.stage("quantizer")))))
        else:
            n_lists = len(load_npy(job.stage("quantizer") / "centroids.npy"))
        n_buckets = min(n_lists, ivf.n_buckets(alive * min(near.nprobe, n_lists)))
    if use_exact and not use_near:
        n_buckets = ivf.n_buckets(alive)
    if use_exact or use_near:
        timed("assign", lambda: _sub_step(job, "assign", shard_ids, remote(st._assign_shard),
                                          {s: (job, s, index[s], n_buckets, use_near) for s in shard_ids},
                                          max_in_flight))
        buckets = [f"{b:05d}" for b in range(n_buckets)]
        timed("dedup", lambda: _sub_step(job, "dedup", buckets, remote(st._dedup_bucket),
                                         {f"{b:05d}": (job, b, len(shard_ids), use_exact, use_near)
                                          for b in range(n_buckets)}, max_in_flight))
    if use_near and near.max_changed_pixels is not None:
        timed("export", lambda: _sub_step(job, "export", shard_ids, remote(st._export_shard),
                                          {s: (job, s, index[s], n_buckets) for s in shard_ids}, max_in_flight))
    percentile = config.clip_score.mode == "percentile"
    decide_args = {s: (job, s, index[s], n_buckets, use_exact, use_near, percentile) for s in shard_ids}
    decide_step = StepDir(root=job.stage("decide"), name="curate_select_decide", key="")
    if percentile and any(decide_step.is_done(s) for s in shard_ids):
        # counts are returned, not stored: redo the stage so every shard's counts are in hand
        for s in shard_ids:
            decide_step.done_path(s).remove()
    decided = timed("decide", lambda: _sub_step(job, "decide", shard_ids, remote(st._decide_shard), decide_args,
                                                max_in_flight))
    cut = None
    if percentile:
        t0 = time.monotonic()
        cut = st._percentile_cut(job, decided, config.clip_score.keep_fraction)
        timings["percentile"] = round(time.monotonic() - t0, 2)
    decided = None  # per-shard counts, no longer needed
    writer = remote(st._write_shard)
    pending = step.pending(shard_ids)
    if pending:
        from pipelines.step import run_shards

        timed("write", lambda: run_shards(writer, {s: (job, step, s, cut, config.clip_score.keep_fraction)
                                                   for s in pending}, max_in_flight=max_in_flight))
    from pipelines.sketches import FixedHistogram

    hist = {"kept": FixedHistogram(bins=SCORE_HIST_BINS), "rejected": FixedHistogram(bins=SCORE_HIST_BINS)}
    funnels = []
    for s in shard_ids:
        stats = step.shard_stats(s)
        funnels.append(stats["funnel"])
        for k in hist:
            hist[k].merge(stats["clip_score_hist"][k])
    summary = {
        "funnel": merge_funnels(funnels), "clip": clip, "config": dataclasses.asdict(config),
        "ingest_dir": str(ingest_dir), "score_dir": str(score_dir),
        "clip_score_histogram": {"edges": hist["kept"].edges(), "kept": hist["kept"].counts.tolist(),
                                 "rejected": hist["rejected"].counts.tolist()},
        "percentile_cut": None if cut is None else dataclasses.asdict(cut),
        "dedup": {"buckets": n_buckets, "alive": alive}, "stage_s": timings,
        "elapsed_s": round(time.monotonic() - started, 2),
    }
    step.finish(shard_ids, **summary)
    remove_tree(job.work)
    if search_index is not None and summary["funnel"]["kept"] > 0:
        build_search_index(curate_dir, search_index)
    return step.manifest()  # as read back: JSON types, like a rerun returns


def curate(ingest_dir: Where, curate_dir: Where, config: CurateConfig, *,
           score_dir: Where | None = None) -> dict[str, Any]:
    """Score (into `score_dir`, default `<curate_dir>/scores`) then select into `curate_dir`.

    To select again with other thresholds, call with a new `curate_dir` and the same `score_dir`.
    """
    score_dir = storage.path(curate_dir) / "scores" if score_dir is None else storage.path(score_dir)
    score(ingest_dir, score_dir, config.score, config.pool, config.decode)
    return select(ingest_dir, score_dir, curate_dir, config.select, search_index=config.search_index)


def read_decisions(curate_dir: Where) -> pa.Table:
    """All decision shards of a finished selection, concatenated."""
    manifest = finished_manifest(curate_dir, "curate")
    return pa.concat_tables([read_parquet(shard_path(curate_dir, s, "decisions")) for s in shard_ids_of(manifest)])
