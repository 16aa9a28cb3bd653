"""Search curated images by text or by image: top-k CLIP cosine from the data directory's IVF index.

Works on a curate or an embed directory (both carry `clip_image_embedding`, fp16 unit vectors made
by the scoring CLIP). The query is embedded by that same CLIP: the shards record which one, and a
different model is refused rather than compared in an unrelated space.

The index (`<data_dir>/index/`, pipelines/ann_index.py) is built by curation, or here on the first
search of a directory without one (an embed directory); a query reads the coarse quantizer and its
`nprobe` nearest lists only, then the image bytes of the k hits from their shards' row groups, so
memory does not grow with the number of rows.
"""
from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines import storage
from pipelines.ann_index import INDEX_DIR, IvfConfig, IvfIndex, build_search_index, parquet_file, read_parquet_schema
from pipelines.clip_model import Clip, ClipConfig
from pipelines.report import Cell, contact_sheet, save_png
from pipelines.step import finished_manifest, shard_ids_of, shard_path
from pipelines.storage import StoragePath

Where = str | os.PathLike | StoragePath


@dataclass(frozen=True)
class SearchResult:
    table: pa.Table
    """rank, key, caption, similarity (query-image cosine), clip_score (image-caption cosine)."""
    contact_sheet: StoragePath
    """PNG grid of the hits, best first (a local path or an object-store URL)."""


def _check_same_clip(stored: bytes | None, clip: ClipConfig, shard: StoragePath) -> None:
    if stored is None:
        raise ValueError(f"{shard} has no CLIP record in its metadata: not a curate/embed shard")
    made_by = json.loads(stored)
    asked = {"model_name": clip.model_name, "pretrained": clip.pretrained}
    if made_by != asked:
        raise ValueError(f"the embeddings in {shard} were made by CLIP {made_by}; the query CLIP is {asked}. "
                         "Search with the CLIP that curated the data (its ScoreConfig.clip).")


def _query_image(image: Where | bytes | Image.Image) -> tuple[Image.Image, str]:
    """An image query -> (RGB image, a name for the sheet's title and file)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB"), "image"
    if isinstance(image, bytes):
        data, name = image, "image"
    else:
        path = storage.path(image)
        if not path.is_file():
            raise FileNotFoundError(f"query image {path} does not exist")
        data, name = path.read_bytes(), path.name
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB"), name
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ValueError(f"query image {name} is not a readable image: {exc}") from exc


def open_index(data_dir: Where, config: IvfConfig = IvfConfig()) -> IvfIndex:
    """The data directory's search index, built first if it has none (Ray tasks over its shards)."""
    data_dir = storage.path(data_dir)
    if not (data_dir / INDEX_DIR / "manifest.json").exists():
        build_search_index(data_dir, config)
    return IvfIndex(data_dir / INDEX_DIR)


def search(data_dir: Where, query: str | None = None, *, clip: ClipConfig | Clip, k: int = 20,
           out_png: Where | None = None, image: Where | bytes | Image.Image | None = None,
           nprobe: int = 16) -> SearchResult:
    """The k curated images nearest to `query` (text) or to `image` (a file, bytes or PIL image), as a
    table and a contact sheet PNG (default `<data_dir>/search/<query>.png`). `nprobe` lists of the
    index are read (all of them when the index has no more)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if nprobe < 1:
        raise ValueError(f"nprobe must be >= 1, got {nprobe}")
    if (query is None) == (image is None):
        raise ValueError("give exactly one of a text query or an image query")
    data_dir = storage.path(data_dir)
    shard_ids = shard_ids_of(finished_manifest(data_dir, "curate or embed"))
    model = clip if isinstance(clip, Clip) else Clip(clip)
    first = shard_path(data_dir, shard_ids[0])
    _check_same_clip((read_parquet_schema(first).metadata or {}).get(b"clip"), model.config, first)
    if query is not None:
        vector, title, name = model.encode_texts([query]).numpy(), f"query: {query}", _slug(query)
    else:
        picture, label = _query_image(image)
        vector, title, name = model.encode_images([picture]).numpy(), f"image query: {label}", f"image-{_slug(label)}"
    index = open_index(data_dir)
    try:
        if index.meta["rows"] == 0:
            raise ValueError(f"{data_dir} holds no curated rows to search")
        hits = index.search(vector, k, nprobe)[0]
    finally:
        index.close()
    if hits is None or hits.num_rows == 0:
        raise ValueError(f"{data_dir} holds no curated rows to search")
    sims = np.asarray(hits["similarity"], np.float32)
    result = pa.table({
        "rank": pa.array(range(1, hits.num_rows + 1), pa.int32()),
        "key": hits["key"],
        "caption": hits["caption"],
        "similarity": pa.array(sims, pa.float32()),
        "clip_score": hits["clip_score"],
    })
    locations = [(index.meta["shard_ids"][s], r) for s, r in zip(hits["shard"].to_pylist(), hits["row"].to_pylist())]
    images = _images(data_dir, locations)
    cells = [Cell(img, (f"#{r} sim {s:.3f}", c or "")) for r, img, s, c in
             zip(range(1, hits.num_rows + 1), images, sims, result["caption"].to_pylist())]
    png = storage.path(out_png) if out_png else data_dir / "search" / f"{name}.png"
    save_png(contact_sheet(cells, title=title), png)
    return SearchResult(table=result, contact_sheet=png)


def _images(data_dir: StoragePath, locations: list[tuple[str, int]]) -> list[bytes | None]:
    """Image bytes of (shard, row) hits, reading only the row groups that hold them."""
    found: dict[tuple[str, int], Any] = {}
    by_shard: dict[str, list[int]] = {}
    for shard_id, row in locations:
        by_shard.setdefault(shard_id, []).append(row)
    for shard_id, rows in by_shard.items():
        parquet = parquet_file(shard_path(data_dir, shard_id))
        starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
        for group in sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rows}):
            column = parquet.read_row_group(group, columns=["image"])["image"]
            for r in rows:
                if starts[group] <= r < starts[group + 1]:
                    found[(shard_id, r)] = column[r - int(starts[group])].as_py()
    return [found.get(loc) for loc in locations]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "query"
