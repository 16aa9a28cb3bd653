"""Training input: decode/crop in Ray Data, per-batch padding, held-out split, deterministic epochs.

`write_embed_shards` writes Parquet in the embed step's layout (real PNG/JPEG bytes, real tiny-T5 embeddings
flattened to n_tokens * D fp16, D in the schema metadata); the other train tests import it.
"""
from __future__ import annotations

import dataclasses
import io
import pathlib
import random

import numpy as np
import pytest
import torch

from pipelines.embed import EMBED_DIM_KEY
from pipelines.train.config import DataConfig
from pipelines.train.data import (
    Collate,
    DecodeImages,
    RandomCrop,
    held_out,
    pad_embeddings,
    parquet_files,
    text_embed_dim,
)
from pipelines.train.decode import decode_image

from imagen_core.recipes import TINY_T5  # "imagen-asset:tiny-t5", shipped with the package
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (245, 225, 30)}
SHAPES = ("circle", "square")


def _image(colour: str, shape: str, background: str, size: int, fmt: str) -> bytes:
    from PIL import Image, ImageDraw

    # Non-square on purpose: the decode step must resize the short side and centre-crop.
    image = Image.new("RGB", (size + size // 4, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    box = (size // 4 + size // 8, size // 4, size // 4 + size * 5 // 8, size * 3 // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    out = io.BytesIO()
    image.save(out, format="PNG" if fmt == "png" else "JPEG", quality=95)
    return out.getvalue()


def write_embed_shards(out_dir: pathlib.Path, num_rows: int, *, rows_per_file: int = 16, image_size: int = 40,
                       seed: int = 0) -> list[str]:
    """Embed-step Parquet shards of coloured shapes with their tiny-T5 caption embeddings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imagen_core.text_encoder import TextEncoderConfig, build_text_encoder

    rng = random.Random(seed)
    colours = list(COLOURS)
    rows = []
    for i in range(num_rows):
        colour, background = rng.sample(colours, 2)
        shape = rng.choice(SHAPES)
        caption = f"a {colour} {shape} on a {background} background"
        rows.append((f"{i:06d}", caption, _image(colour, shape, background, image_size, "png" if i % 2 else "jpg")))
    encoder = build_text_encoder(TextEncoderConfig(name=TINY_T5, max_length=16))
    embeddings = encoder.encode_batched([r[1] for r in rows])
    dim = encoder.embed_dim
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for start in range(0, num_rows, rows_per_file):
        chunk = range(start, min(start + rows_per_file, num_rows))
        table = pa.table(
            {
                "key": [rows[i][0] for i in chunk],
                "caption": [rows[i][1] for i in chunk],
                "image": pa.array([rows[i][2] for i in chunk], pa.binary()),
                "width": pa.array([image_size + image_size // 4] * len(chunk), pa.int32()),
                "height": pa.array([image_size] * len(chunk), pa.int32()),
                "clip_score": pa.array([0.3] * len(chunk), pa.float32()),
                "n_tokens": pa.array([embeddings[i].shape[0] for i in chunk], pa.int32()),
                "text_embedding": pa.array(
                    [embeddings[i].numpy().astype(np.float16).ravel() for i in chunk], pa.large_list(pa.float16())
                ),
            }
        ).replace_schema_metadata({EMBED_DIM_KEY: str(dim).encode()})
        path = out_dir / f"shard-{start // rows_per_file:05d}.parquet"
        pq.write_table(table, path)
        files.append(str(path))
    return files


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_embed_shards(tmp_path_factory.mktemp("embed"), 48)


def test_decode_image_resizes_short_side_and_centre_crops() -> None:
    data = _image("red", "square", "blue", 40, "png")  # 50x40: blue margins left/right, red square centred
    out = decode_image(data, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert tuple(out[8, 8]) == COLOURS["red"]
    assert tuple(out[0, 0]) == COLOURS["blue"]


def test_decode_batch_makes_lowres_from_the_same_crop(shards) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(shards[0]).slice(0, 4)
    batch = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    out = DecodeImages(16, 8)(batch)
    assert out["image"].shape == (4, 16, 16, 3) and out["lowres"].shape == (4, 8, 8, 3)
    # The low-res image is the high-res crop downsampled by the stage's own resize_lowres (what evaluation and
    # the cascade use), to within uint8 rounding.
    from imagen_core.stage import resize_lowres

    expected = resize_lowres(torch.from_numpy(out["image"]).permute(0, 3, 1, 2).float(), 8).permute(0, 2, 3, 1)
    assert (torch.from_numpy(out["lowres"]).float() - expected).abs().max().item() <= 0.5 + 1e-4


def test_training_crops_are_aligned_per_epoch_and_cut_the_lowres_to_match(shards) -> None:
    """Crop training (Imagen App. F): each sample's crop position depends on (seed, epoch, key) only, sits on the SR
    factor's grid, and the low-res crop is the same region of the whole picture's low-res image."""
    import pyarrow.parquet as pq

    table = pq.read_table(shards[0]).slice(0, 8)
    batch = DecodeImages(32, 16)({name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names})
    crop = RandomCrop(size=16, seed=3, align=2)
    keys = [str(k) for k in batch["key"]]
    boxes = crop.offsets(keys, 32)
    assert boxes == RandomCrop(size=16, seed=3, align=2).offsets(keys, 32)  # a resumed epoch: the same crops
    assert all(0 <= y <= 16 and 0 <= x <= 16 and y % 2 == 0 and x % 2 == 0 for y, x in boxes)
    assert dataclasses.replace(crop, epoch=1).offsets(keys, 32) != boxes  # another epoch: other crops
    assert len(set(boxes)) > 1

    out = Collate(64, 64, crop)(batch)
    assert out.images.shape == (8, 3, 16, 16) and out.lowres.shape == (8, 3, 8, 8)
    for i, (y, x) in enumerate(boxes):
        expected_hi = torch.from_numpy(batch["image"][i, y:y + 16, x:x + 16]).permute(2, 0, 1).float() / 127.5 - 1
        expected_lo = torch.from_numpy(batch["lowres"][i, y // 2:y // 2 + 8, x // 2:x // 2 + 8]).permute(2, 0, 1)
        assert torch.equal(out.images[i], expected_hi)
        assert torch.equal(out.lowres[i], expected_lo.float() / 127.5 - 1)
    assert torch.equal(Collate(64, 64)(batch).images, torch.from_numpy(batch["image"]).permute(0, 3, 1, 2) / 127.5 - 1)

    # The SR stage trains on the crops as they come (a convolutional net), residual stages included.
    from imagen_core.recipes import stage_tiny_sr
    from imagen_core.stage import DiffusionStage

    for residual in (None, 10.0):
        stage = DiffusionStage(dataclasses.replace(stage_tiny_sr(), residual_scale=residual))
        loss = stage(out.images, out.text_embeds, out.text_mask, out.lowres, generator=torch.Generator().manual_seed(0))
        assert loss.shape == (8,) and torch.isfinite(loss).all()


def test_train_crop_must_fit_the_stage() -> None:
    from imagen_core.recipes import stage_tiny_sr
    from pipelines.train.config import TrainConfig

    def config(crop: int) -> TrainConfig:
        return TrainConfig(stage=stage_tiny_sr(), output_dir="o", run_name="r", total_steps=10, schedule=_schedule(),
                           data=DataConfig(paths=("d",), train_crop=crop))

    assert config(16).train_crop == RandomCrop(size=16, seed=0, align=2)
    for bad in (32, 0, 6):
        with pytest.raises(ValueError, match="train_crop"):
            config(bad)


def _schedule():
    from pipelines.train.config import ScheduleConfig

    return ScheduleConfig(warmup_steps=1)


def test_pad_embeddings_unflattens_pads_and_masks() -> None:
    dim = 3
    a = np.arange(2 * dim, dtype=np.float16)
    b = np.arange(4 * dim, dtype=np.float16) + 100
    flat = np.empty(2, dtype=object)
    flat[:] = [a, b]
    embeds, mask = pad_embeddings(flat, np.array([2, 4]), dim, max_tokens=8)
    assert embeds.shape == (2, 4, dim) and mask.tolist() == [[True, True, False, False], [True] * 4]
    assert torch.equal(embeds[0, :2], torch.tensor(a.reshape(2, dim), dtype=torch.float32))
    assert embeds[0, 2:].abs().sum() == 0
    assert torch.equal(embeds[1], torch.tensor(b.reshape(4, dim), dtype=torch.float32))
    embeds, mask = pad_embeddings(flat, np.array([2, 4]), dim, max_tokens=3)  # truncation to the encoder's length
    assert embeds.shape == (2, 3, dim) and mask[1].all()
    with pytest.raises(ValueError, match="n_tokens"):
        pad_embeddings(flat, np.array([2, 5]), dim, max_tokens=8)


def test_held_out_split_is_stable_and_near_the_fraction() -> None:
    keys = [f"{i:06d}" for i in range(5000)]
    chosen = [k for k in keys if held_out(k, 0.1)]
    assert chosen == [k for k in keys if held_out(k, 0.1)]
    assert 400 < len(chosen) < 600


def test_parquet_contract_errors_are_clear(tmp_path, shards) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert text_embed_dim(parquet_files((str(pathlib.Path(shards[0]).parent),))) == 64
    with pytest.raises(FileNotFoundError, match="embed step"):
        parquet_files((str(tmp_path / "missing"),))
    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="lacks column"):
        text_embed_dim([str(tmp_path / "bad.parquet")])
    table = pq.read_table(shards[0])
    pq.write_table(table.replace_schema_metadata({}), tmp_path / "no_dim.parquet")
    with pytest.raises(ValueError, match="text_embed_dim"):
        text_embed_dim([str(tmp_path / "no_dim.parquet")])
    step = tmp_path / "unfinished_embed_step"
    (step / "shards").mkdir(parents=True)
    (step / "manifest.json").write_text('{"shards": [{"shard_id": "00000"}]}')
    assert parquet_files((str(step),)) == [str(step / "shards" / "00000.parquet")]  # the manifest's shards only


def tiny_train_config(data_dir: pathlib.Path, out_dir: pathlib.Path, *, deepspeed_config: str = "zero2",
                      total_steps: int = 8, stage=None, **changes):
    """The tiny stage recipe (base unless `stage` is given) on 2 CPU workers (gloo), sized for this 2-core
    machine; shared by the train tests."""
    from imagen_core.recipes import stage_tiny_base
    from pipelines.train.config import (
        CheckpointConfig,
        OptimConfig,
        ScalingConfig,
        ScheduleConfig,
        TrackingConfig,
        TrainConfig,
    )

    base = dict(
        stage=stage or stage_tiny_base(), output_dir=str(out_dir), run_name="tiny", total_steps=total_steps,
        data=DataConfig(paths=(str(data_dir),), val_fraction=0.15, shuffle_buffer_rows=16, decode_batch_rows=16),
        optim=OptimConfig(kind="adamw", lr=2e-3, ema_decay=0.9, ema_every=2),
        schedule=ScheduleConfig(warmup_steps=2),
        checkpoint=CheckpointConfig(every_steps=4, num_to_keep=2, max_failures=2),
        tracking=TrackingConfig(log_every=4, val_every=8, sample_every=8, sample_steps=3, num_samples=3),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.5, deepspeed_config=deepspeed_config,
                              micro_batch_size=4),
    )
    return TrainConfig(**{**base, **changes})
