"""Embed: the frozen text encoder's per-token embeddings of every kept caption, next to its image.

Imagen conditions each cascade stage on the full token sequence of a frozen T5-XXL (Saharia et al.
2022, section 2.1), so embeddings are computed once, offline, and training never runs the encoder.
Stored per row: the real tokens only (no padding), fp16, as one flat `large_list<halffloat>` of
n_tokens x D values; D is in the schema metadata. Padding every caption to 128 tokens would store
128 / n_tokens times more (about 10x at demo captions' ~12 tokens).

Each output shard holds what a training step reads in one pass: key, caption, image bytes, size,
CLIP score, n_tokens and the text embedding; row groups are small so a reader can shuffle by group
without loading a shard. Large-list offsets are int64: no 2 GiB overflow at T5-XXL's D = 4096.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from imagen_core.text_encoder import TextEncoderConfig
from pipelines import storage
from pipelines.ann_index import parquet_file, read_parquet
from pipelines.step import ActorPoolConfig, finished_manifest, map_shards_on_actor_pool, shard_ids_of, shard_path
from pipelines.step import StepDir, atomic_write_parquet
from pipelines.storage import StoragePath

Where = str | pathlib.Path | StoragePath

EMBED_DIM_KEY = b"text_embed_dim"
ENCODER_KEY = b"text_encoder"


@dataclass(kw_only=True, frozen=True)
class EmbedConfig:
    text_encoder: TextEncoderConfig
    """The stage's frozen text encoder (all Imagen stages share T5-XXL; one embed run per encoder)."""
    device: str = "cpu"
    """Torch device of the encoder in each actor ("cuda" with pool.num_gpus > 0)."""
    row_group_rows: int = 64
    """Rows per Parquet row group: small, so readers shuffle groups without reading whole shards."""
    pool: ActorPoolConfig = ActorPoolConfig()
    """The encoder actors (size, CPUs and GPUs each, fractions allowed)."""

    def key(self) -> dict[str, Any]:
        """What decides the output: not the device, the batch size or the pool, which only change the speed."""
        encoder = dataclasses.replace(self.text_encoder, batch_size=1)
        return {"text_encoder": encoder, "row_group_rows": self.row_group_rows}

    def __post_init__(self) -> None:
        if self.row_group_rows < 1:
            raise ValueError(f"EmbedConfig.row_group_rows must be >= 1, got {self.row_group_rows}")


def embeddings_column(embeds: list[torch.Tensor]) -> tuple[pa.Array, pa.Array]:
    """Per-caption (n_i, D) tensors -> (n_tokens int32, flat large_list<halffloat> of n_i * D)."""
    counts = np.array([e.shape[0] for e in embeds], np.int64)
    dim = embeds[0].shape[1]
    flat = torch.cat([e.reshape(-1) for e in embeds]).to(torch.float16).numpy()
    offsets = np.concatenate([[0], np.cumsum(counts * dim)]).astype(np.int64)
    column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float16()))
    return pa.array(counts.astype(np.int32)), column


class ShardEmbedder:
    """Ray Data actor: loads the text encoder once, then embeds one curated shard per call."""

    def __init__(self, config: EmbedConfig, curate_dir: str, step: StepDir, torch_threads: int) -> None:
        from imagen_core.text_encoder import build_text_encoder

        torch.set_num_threads(torch_threads)
        self.config, self.curate_dir, self.step = config, curate_dir, step
        self.encoder = build_text_encoder(config.text_encoder, config.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for shard_id in batch["shard_id"]:
            table = read_parquet(shard_path(self.curate_dir, shard_id))
            if table.num_rows:
                # encode_batched groups captions by token count: little padding inside a forward pass.
                counts, column = embeddings_column(self.encoder.encode_batched(table["caption"].to_pylist()))
            else:
                counts, column = pa.array([], pa.int32()), pa.array([], pa.large_list(pa.float16()))
            table = table.append_column("n_tokens", counts).append_column("text_embedding", column)
            metadata = dict(table.schema.metadata or {})
            metadata[EMBED_DIM_KEY] = str(self.encoder.embed_dim).encode()
            metadata[ENCODER_KEY] = json.dumps(dataclasses.asdict(self.config.text_encoder)).encode()
            table = table.replace_schema_metadata(metadata)
            # zstd, no dictionary: fp16 values and image bytes do not repeat; zstd still saves ~8%.
            atomic_write_parquet(shard_path(self.step.root, shard_id), table, row_group_size=self.config.row_group_rows,
                                 compression="zstd", use_dictionary=False)
            self.step.mark_done(shard_id, {"rows": table.num_rows, "tokens": int(pc.sum(counts).as_py() or 0)})
        return {"shard_id": batch["shard_id"]}


def embed(curate_dir: Where, embed_dir: Where, config: EmbedConfig) -> dict[str, Any]:
    """Embed every curated shard into `embed_dir/shards/` (local paths or object-store URLs). Returns the
    step manifest."""
    curate_dir, embed_dir = storage.path(curate_dir), storage.path(embed_dir)  # absolute: sent to workers
    curated = finished_manifest(curate_dir, "curate")
    shard_ids = shard_ids_of(curated)
    step = StepDir.open(embed_dir, "embed", config.key(), [curated["key"]])
    pool = config.pool
    if (manifest := step.manifest()) is not None:
        return manifest
    started = time.monotonic()
    pending = step.pending(shard_ids)
    if pending:
        map_shards_on_actor_pool(
            ShardEmbedder,
            {"config": config, "curate_dir": str(curate_dir), "step": step, "torch_threads": pool.torch_threads},
            pending, pool, pool_field="embed.pool",
        )
    step.finish(shard_ids, config=dataclasses.asdict(config), elapsed_s=round(time.monotonic() - started, 2),
                storage=storage_stats(embed_dir, shard_ids))
    return step.manifest()  # as read back: JSON types, like a rerun returns


def shard_files(path: Where) -> list[StoragePath]:
    """One shard file, or every shard of a finished step directory (local or on a store)."""
    path = storage.path(path)
    if path.is_file():
        return [path]
    return [shard_path(path, s) for s in shard_ids_of(finished_manifest(path, "embed"))]


def embed_dim_of(schema: pa.Schema) -> int:
    if not schema.metadata or EMBED_DIM_KEY not in schema.metadata:
        raise ValueError("not an embed shard: its schema metadata has no text_embed_dim")
    return int(schema.metadata[EMBED_DIM_KEY])


def read_embeddings(path: Where) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, fp16 Tensor (n_tokens, D)) per row, row group by row group, in file order."""
    for file in shard_files(path):
        parquet = parquet_file(file)
        dim = embed_dim_of(parquet.schema_arrow)
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=["key", "n_tokens", "text_embedding"])
            column = table["text_embedding"].combine_chunks()
            values = torch.from_numpy(np.array(column.values.to_numpy(zero_copy_only=False)))  # writable copy
            offsets = column.offsets.to_numpy()
            for row, (key, n) in enumerate(zip(table["key"].to_pylist(), table["n_tokens"].to_pylist())):
                start = int(offsets[row])
                yield key, values[start:start + n * dim].view(n, dim)


def storage_stats(path: Where, shard_ids: list[str] | None = None) -> dict[str, float]:
    """Stored (compressed) bytes of the text embeddings per sample vs. padding to 128 tokens in fp16."""
    files = shard_files(path) if shard_ids is None else [shard_path(path, s) for s in shard_ids]
    rows = tokens = stored = 0
    dim = None
    for file in files:
        parquet = parquet_file(file)
        meta = parquet.metadata
        dim = embed_dim_of(parquet.schema_arrow)
        names = [meta.schema.column(i).path for i in range(meta.num_columns)]
        cols = [i for i, name in enumerate(names) if name.startswith(("text_embedding", "n_tokens"))]
        stored += sum(meta.row_group(g).column(i).total_compressed_size
                      for g in range(meta.num_row_groups) for i in cols)
        rows += meta.num_rows
        tokens += parquet.read(columns=["n_tokens"])["n_tokens"].to_numpy().sum()
    padded = 128 * (dim or 0) * 2
    per_sample = stored / rows if rows else 0.0
    return {"rows": rows, "embed_dim": dim or 0, "mean_tokens": tokens / rows if rows else 0.0,
            "bytes_per_sample": per_sample, "padded128_fp16_bytes": padded,
            "ratio_to_padded": per_sample / padded if padded else 0.0}
