"""Training input: the embed step's Parquet streamed by Ray Data into the Ray Train workers.

Per row the embed step stores key, caption, the encoded image, n_tokens and the caption's text embedding
flattened to n_tokens * D fp16 values (D in the schema metadata): only real tokens, never padded to the
encoder's max length (T5-XXL: 128 tokens x 4096 x 2 bytes = 1 MiB a caption in fp16). Here:

- Ray Data CPU tasks (`DecodeImages`, map_batches) decode, resize the short side and centre-crop to the
  stage's resolution, and for a super-resolution stage also make the low-resolution conditioning image from
  the same crop; nothing of that runs in the training loop;
- `streaming_split` (Ray Train's DataConfig) gives each worker a shard; no worker holds the dataset;
- `Collate` (in the worker's prefetch threads) unflattens the embeddings and pads them per batch with a mask,
  and with `DataConfig.train_crop` cuts each training sample's crop (`RandomCrop`).

Order, for exact resume: with `preserve_order` the file order (seeded, fixed) and the split of blocks across
workers are deterministic, and each epoch is reshuffled by a local buffer seeded from (seed, epoch, rank).
An epoch's order is thus a function of (seed, epoch, world size): a resumed worker re-reads its current epoch
and skips the micro-batches its checkpoint says it consumed (`epoch_batches`).
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from pipelines import storage
from pipelines.train.config import DataConfig
# The functions Ray Data runs live in a torch-free module (see there).
from pipelines.train.decode import DecodeImages, SelectSplit, Split, held_out

COLUMNS = ("key", "caption", "image", "n_tokens", "text_embedding")
"""Columns of the embed step's Parquet (pipelines/embed.py) that training reads."""


def parquet_files(paths: tuple[str, ...]) -> list[str]:
    """Training files: a finished embed step directory gives its manifest's shards (never a half-written
    run's), a file is itself, any other directory gives its *.parquet files (sorted, hidden ones skipped).
    Paths may be local or object-store URLs (s3://bucket/prefix); the files come back as what Ray Data and
    pyarrow read directly (absolute local paths or URLs)."""
    from pipelines.step import MANIFEST, finished_manifest, shard_ids_of, shard_path

    files: list[str] = []
    for entry in paths:
        where = storage.path(entry)
        if where.is_local:  # the local disk as before: no pyarrow listing of a big folder
            path = where.local
            if path.is_dir() and (path / MANIFEST).exists():
                manifest = finished_manifest(where, "embed")
                files.extend(str(shard_path(where, s)) for s in shard_ids_of(manifest))
            elif path.is_dir():
                found = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))
                files.extend(str(p) for p in found)
            elif path.is_file():
                files.append(str(path))
            else:
                raise FileNotFoundError(f"training data path {entry} does not exist (give the embed step's output)")
            continue
        if (where / MANIFEST).is_file():
            files.extend(str(shard_path(where, s)) for s in shard_ids_of(finished_manifest(where, "embed")))
        elif where.is_file():
            files.append(str(where))
        else:
            # One listing of the prefix; an object store has no empty folders, so nothing listed is "absent".
            found = [f for f in where.files("*.parquet", recursive=True)
                     if not f.name.startswith((".", "_"))]
            if not found and not where.is_dir():
                raise FileNotFoundError(f"training data path {entry} does not exist (give the embed step's output)")
            files.extend(str(f) for f in found)
    if not files:
        raise FileNotFoundError(f"no .parquet files under {list(paths)}: run the embed step first")
    return files


def read_schema(file: str) -> Any:
    """The Arrow schema of one Parquet file, local or in an object store (the footer only)."""
    import pyarrow.parquet as pq

    where = storage.path(file)
    if where.is_local:
        return pq.read_schema(str(where))
    return pq.read_schema(where.fs_path, filesystem=where.fs)


def text_embed_dim(files: list[str]) -> int:
    """D from the schema metadata (the embed step's contract), checked to agree across files and to come
    with the columns training reads."""
    from pipelines.embed import embed_dim_of

    dims = set()
    for file in files:
        schema = read_schema(file)
        missing = [c for c in COLUMNS if c not in schema.names]
        if missing:
            raise ValueError(f"{file} lacks column(s) {missing}: not the embed step's output (has {schema.names})")
        try:
            dims.add(embed_dim_of(schema))
        except ValueError as error:
            raise ValueError(f"{file}: {error}") from error
    if len(dims) != 1:
        raise ValueError(
            f"the training files disagree on the text-embedding width: {sorted(dims)}; embed them with one encoder"
        )
    return dims.pop()


def read_val_rows(files: list[str], data: DataConfig, image_size: int, lowres_size: int | None) -> dict[str, np.ndarray]:
    """The first `val_max_samples` held-out rows in file order, decoded, read in this process.

    What `build_dataset(files, "val", ...)` gives, without a Ray Data pipeline: validation is a few hundred rows
    read once per fit, where starting a streaming executor (its actors and tasks, seconds of CPU on a small
    machine) cost more than the read. Only the key column is read until a row group holds held-out rows, and
    the scan stops once enough are found."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables, needed = [], data.val_max_samples
    for file in files:
        with storage.path(file).open_input() as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.num_row_groups):
                keys = parquet.read_row_group(group, columns=["key"]).column("key").to_pylist()
                keep = [i for i, key in enumerate(keys) if held_out(str(key), data.val_fraction)][:needed]
                if keep:
                    tables.append(parquet.read_row_group(group, columns=list(COLUMNS)).take(pa.array(keep)))
                    needed -= len(keep)
                if needed == 0:
                    break
        if needed == 0:
            break
    if not tables:
        return {}
    table = pa.concat_tables(tables)
    return DecodeImages(image_size, lowres_size)({c: table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS})


def build_dataset(
    files: list[str], split: Split, data: DataConfig, image_size: int, lowres_size: int | None, seed: int
) -> Any:
    """The lazy Ray Dataset of one split, decoded to the stage's resolution (the trainer streams "train"; "val"
    is read by `read_val_rows`, which gives the same rows)."""
    import ray.data

    cpus = data.cpus_per_task
    # A fixed seeded file order (not reseeded per execution: Ray counts executions from 0 again after a
    # restart, which would break resume); epochs differ through the local shuffle buffer's seed.
    shuffle = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=False) if split == "train" else None
    ds = ray.data.read_parquet(files, shuffle=shuffle, num_cpus=cpus).select_columns(list(COLUMNS))
    ds = ds.map_batches(SelectSplit(split, data.val_fraction), batch_format="numpy", num_cpus=cpus)
    if split == "val":
        ds = ds.limit(data.val_max_samples)
    ds = ds.map_batches(
        DecodeImages(image_size, lowres_size), batch_format="numpy", batch_size=data.decode_batch_rows, num_cpus=cpus
    )
    # The trainer's tqdm bar is the progress display; per-operator bars of every epoch would drown it.
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False
    if split == "train" and data.materialize:
        ds.context.execution_options.preserve_order = True  # the same block order on every run: exact resume
        ds = ds.materialize()
    return ds


def ray_data_config() -> Any:
    """Ray Train's DataConfig: split "train" across workers (equal rows each) and keep order so the split and the
    epoch order are reproducible (see the module docstring)."""
    import ray.train
    from ray.data import ExecutionOptions

    return ray.train.DataConfig(
        datasets_to_split=["train"],
        execution_options=ExecutionOptions(preserve_order=True),
    )


@dataclasses.dataclass
class Batch:
    """One micro-batch in the layout DiffusionStage.forward takes."""

    keys: list[str]
    captions: list[str]
    images: torch.Tensor
    """(B, 3, S, S) float32 in [-1, 1]."""
    text_embeds: torch.Tensor
    """(B, L, D) float32, L = the longest caption of the batch, zero past each caption's tokens."""
    text_mask: torch.Tensor
    """(B, L) bool, True on real tokens; column 0 always True."""
    lowres: torch.Tensor | None = None
    """(B, 3, s, s) float32 in [-1, 1] for SR stages."""

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device, dtype: torch.dtype) -> "Batch":
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype, non_blocking=True)  # noqa: E731
        return dataclasses.replace(
            self, images=move(self.images), text_embeds=move(self.text_embeds),
            text_mask=self.text_mask.to(device), lowres=move(self.lowres),
        )


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def pad_embeddings(
    flat: np.ndarray, n_tokens: np.ndarray, dim: int, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened per-row embeddings (n_i * D values) -> (B, L, D) zero-padded float32 and a (B, L) mask."""
    counts = [min(int(n), max_tokens) for n in n_tokens]
    if any(n < 1 for n in counts):
        raise ValueError("a row has n_tokens < 1: every caption keeps at least its end token (embed step contract)")
    length = max(counts)
    embeds = torch.zeros(len(counts), length, dim)
    mask = torch.zeros(len(counts), length, dtype=torch.bool)
    for row, (values, n) in enumerate(zip(flat, counts)):
        values = np.asarray(values, dtype=np.float16)
        if values.size != int(n_tokens[row]) * dim:
            raise ValueError(
                f"row {row}: text_embedding has {values.size} values but n_tokens * D = {int(n_tokens[row])} * {dim}"
            )
        embeds[row, :n] = torch.from_numpy(values.reshape(-1, dim)[:n].astype(np.float32))
        mask[row, :n] = True
    return embeds, mask


@dataclasses.dataclass(frozen=True)
class RandomCrop:
    """Training on crops (Imagen App. F: the 256 -> 1024 stage trained on 64 -> 256 crops; the net is convolutional
    and runs on whole images afterwards). Each sample's crop position is a hash of (seed, epoch, key): another
    crop every epoch, and the same one when a resumed run replays that epoch. The low-resolution input is cut
    from the low-resolution image of the whole picture, at the position divided by the SR factor (`align`), so
    it is exactly what the cascade gives the stage, border context included."""

    size: int
    """Side of the high-resolution crop."""
    seed: int
    align: int = 1
    """Crop positions are multiples of this: image_size // lowres_size for an SR stage, 1 for a base stage."""
    epoch: int = 0

    def offsets(self, keys: Any, full: int) -> list[tuple[int, int]]:
        """(top, left) of each sample's crop in a `full`-sided image."""
        positions = (full - self.size) // self.align + 1
        out = []
        for key in keys:
            digest = hashlib.blake2b(f"{self.seed}/{self.epoch}/{key}".encode(), digest_size=8).digest()
            value = int.from_bytes(digest, "little")
            out.append(((value % positions) * self.align, (value // positions % positions) * self.align))
        return out

    def __call__(self, keys: Any, images: np.ndarray, lowres: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, S, S, 3) images (and (B, s, s, 3) low-res ones) -> their crops."""
        size, low = self.size, self.size // self.align
        boxes = self.offsets(keys, images.shape[1])
        cropped = np.stack([image[y:y + size, x:x + size] for image, (y, x) in zip(images, boxes)])
        if lowres is None:
            return cropped, None
        return cropped, np.stack([image[y // self.align:y // self.align + low, x // self.align:x // self.align + low]
                                  for image, (y, x) in zip(lowres, boxes)])


class Collate(NumpyBatchCollateFn):
    """iter_torch_batches collate_fn (runs in the worker's prefetch threads, not in the step)."""

    def __init__(self, embed_dim: int, max_tokens: int, crop: RandomCrop | None = None) -> None:
        self.embed_dim, self.max_tokens, self.crop = embed_dim, max_tokens, crop

    def for_epoch(self, epoch: int) -> "Collate":
        """This collate for one epoch (the crop positions depend on it)."""
        crop = dataclasses.replace(self.crop, epoch=epoch) if self.crop is not None else None
        return Collate(self.embed_dim, self.max_tokens, crop)

    def __call__(self, batch: dict[str, np.ndarray]) -> Batch:
        embeds, mask = pad_embeddings(batch["text_embedding"], batch["n_tokens"], self.embed_dim, self.max_tokens)
        images, lowres = batch["image"], batch.get("lowres")
        if self.crop is not None and len(images):
            images, lowres = self.crop(batch["key"], images, lowres)
        return Batch(
            keys=[str(k) for k in batch["key"]],
            captions=[str(c) for c in batch["caption"]],
            images=images_to_tensor(images),
            text_embeds=embeds,
            text_mask=mask,
            lowres=images_to_tensor(lowres) if lowres is not None else None,
        )


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The local shuffle seed of one worker's epoch."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def epoch_batches(
    shard: Any, *, epoch: int, skip: int, micro_batch: int, collate: Collate, data: DataConfig, seed: int, rank: int
) -> Iterator[tuple[int, Batch]]:
    """(index in epoch, batch) of one worker's epoch, after skipping the first `skip` micro-batches.

    drop_last with streaming_split(equal=True) gives every worker the same number of batches per epoch, so the
    ranks stay in step (a rank with one batch more would hang the others in the next collective).
    """
    iterator = shard.iter_torch_batches(
        batch_size=micro_batch,
        drop_last=True,
        collate_fn=collate,
        local_shuffle_buffer_size=max(data.shuffle_buffer_rows, micro_batch),
        local_shuffle_seed=shuffle_seed(seed, epoch, rank),
        prefetch_batches=data.prefetch_batches,
    )
    for index, batch in enumerate(iterator):
        if index >= skip:
            yield index, batch
