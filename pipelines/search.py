"""Search curated images by text: CLIP cosine between a query and the stored image embeddings.

Works on a curate or an embed directory (both carry `clip_image_embedding`, fp16 unit vectors made
by the scoring CLIP). The query must be embedded by that same CLIP: the shards record which one, and
a different model is refused rather than compared in an unrelated space.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.clip_model import Clip, ClipConfig
from pipelines.step import finished_manifest, shard_ids_of, shard_path
from pipelines.report import Cell, contact_sheet, save_png

INDEX_COLUMNS = ["key", "caption", "clip_score", "clip_image_embedding"]


@dataclass(frozen=True)
class SearchResult:
    table: pa.Table
    """rank, key, caption, similarity (query-image cosine), clip_score (image-caption cosine)."""
    contact_sheet: pathlib.Path
    """PNG grid of the hits, best first."""


def _check_same_clip(stored: bytes | None, clip: ClipConfig, shard: pathlib.Path) -> None:
    if stored is None:
        raise ValueError(f"{shard} has no CLIP record in its metadata: not a curate/embed shard")
    made_by = json.loads(stored)
    asked = {"model_name": clip.model_name, "pretrained": clip.pretrained}
    if made_by != asked:
        raise ValueError(f"the embeddings in {shard} were made by CLIP {made_by}; the query CLIP is {asked}. "
                         "Search with the CLIP that curated the data (its ScoreConfig.clip).")


def search(data_dir: str | os.PathLike, query: str, *, clip: ClipConfig | Clip, k: int = 20,
           out_png: str | os.PathLike | None = None) -> SearchResult:
    """The k curated images nearest to `query`, as a table and a contact sheet PNG
    (default `<data_dir>/search/<query>.png`)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    data_dir = pathlib.Path(data_dir)
    shard_ids = shard_ids_of(finished_manifest(data_dir, "curate or embed"))
    model = clip if isinstance(clip, Clip) else Clip(clip)
    tables, where = [], []
    for shard_id in shard_ids:
        path = shard_path(data_dir, shard_id)
        table = pq.read_table(path, columns=INDEX_COLUMNS)
        _check_same_clip((table.schema.metadata or {}).get(b"clip"), model.config, path)
        tables.append(table)
        where += [(shard_id, row) for row in range(table.num_rows)]
    index = pa.concat_tables(tables)
    if index.num_rows == 0:
        raise ValueError(f"{data_dir} holds no curated rows to search")
    emb_col = index["clip_image_embedding"].combine_chunks()
    emb = emb_col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, emb_col.type.list_size)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # fp16 storage leaves norms ~1e-3 off
    sims = emb @ model.encode_texts([query]).numpy()[0]
    top = np.argsort(-sims, kind="stable")[:k]
    result = pa.table({
        "rank": pa.array(range(1, len(top) + 1), pa.int32()),
        "key": index["key"].take(top),
        "caption": index["caption"].take(top),
        "similarity": pa.array(sims[top], pa.float32()),
        "clip_score": index["clip_score"].take(top),
    })
    images = _images(data_dir, [where[i] for i in top])
    cells = [Cell(img, (f"#{r} sim {s:.3f}", c or "")) for r, img, s, c in
             zip(range(1, len(top) + 1), images, sims[top], result["caption"].to_pylist())]
    png = pathlib.Path(out_png) if out_png else data_dir / "search" / f"{_slug(query)}.png"
    save_png(contact_sheet(cells, title=f"query: {query}"), png)
    return SearchResult(table=result, contact_sheet=png)


def _images(data_dir: pathlib.Path, locations: list[tuple[str, int]]) -> list[bytes | None]:
    """Image bytes of (shard, row) hits, reading each needed shard's image column once."""
    by_shard: dict[str, list[int]] = {}
    for shard_id, row in locations:
        by_shard.setdefault(shard_id, []).append(row)
    found = {}
    for shard_id, rows in by_shard.items():
        column = pq.read_table(shard_path(data_dir, shard_id), columns=["image"])["image"]
        found.update({(shard_id, r): column[r].as_py() for r in rows})
    return [found[loc] for loc in locations]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "query"
