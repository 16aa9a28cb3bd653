"""Embed step: exact round trip of per-token embeddings, storage size, kill -9 and resume."""
from __future__ import annotations

import io
import os
import pathlib
import random
import signal
import statistics
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from imagen_core.text_encoder import TextEncoderConfig, build_text_encoder
from pipelines.demo import corpus as dc
from pipelines.step import ActorPoolConfig
from pipelines.embed import EmbedConfig, embed, read_embeddings, storage_stats
from pipelines.step import StepDir, atomic_write_parquet

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_T5 = "imagen-asset:tiny-t5"  # shipped with the package (imagen_core/assets/tiny-t5)
CURATED_SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string()), ("image", pa.binary()),
                            ("width", pa.int32()), ("height", pa.int32()), ("clip_score", pa.float32())])


def write_curated_like(root: pathlib.Path, shards: int, rows_per_shard: int, seed: int = 0) -> pathlib.Path:
    """A finished curate step of clean demo rows (the embed step reads key, caption, image, ...)."""
    rng = random.Random(seed)
    step = StepDir.open(root, "curate_select", {"demo_seed": seed, "rows": rows_per_shard}, [])
    ids = []
    for s in range(shards):
        rows = []
        for i in range(rows_per_shard):
            scene = dc.random_scene(rng)
            buf = io.BytesIO()
            dc.render(scene, 64).save(buf, format="JPEG", quality=95)
            rows.append({"key": f"{s:05d}{i:04d}", "caption": scene.caption(), "image": buf.getvalue(),
                         "width": 64, "height": 64, "clip_score": 0.9})
        ids.append(f"{s:05d}")
        atomic_write_parquet(root / "shards" / f"{ids[-1]}.parquet", pa.Table.from_pylist(rows, CURATED_SCHEMA))
        step.mark_done(ids[-1], {"rows": rows_per_shard})
    step.finish(ids)
    return root


@pytest.fixture(scope="module")
def embedded(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    curated = write_curated_like(root / "curate", shards=3, rows_per_shard=40)
    config = EmbedConfig(text_encoder=TextEncoderConfig(kind="t5", name=TINY_T5, batch_size=16), row_group_rows=16)
    started = time.monotonic()
    manifest = embed(curated, root / "embed", config)
    print(f"\nembed 120 rows, 3 shards: {time.monotonic() - started:.1f}s")
    return curated, root / "embed", config, manifest


def test_embeddings_read_back_equal_the_encoders_output(embedded):
    curated, out, config, manifest = embedded
    source = pa.concat_tables([pq.read_table(curated / "shards" / f"0000{i}.parquet") for i in range(3)])
    encoder = build_text_encoder(config.text_encoder)
    expected = dict(zip(source["key"].to_pylist(), encoder.encode_batched(source["caption"].to_pylist())))
    got = list(read_embeddings(out))
    assert [k for k, _ in got] == source["key"].to_pylist()  # every row, once, in order
    for key, emb in got:
        assert emb.dtype == torch.float16 and emb.shape == expected[key].shape
        # fp16 rounding (rel 2^-11) plus float32 noise from other batch shapes and thread counts.
        torch.testing.assert_close(emb.float(), expected[key], rtol=1e-3, atol=1e-3)
    table = pq.read_table(out / "shards" / "00000.parquet")
    assert table.column_names[:6] == source.column_names  # image and caption travel with the embedding
    assert table["n_tokens"].to_pylist() == encoder.token_counts(table["caption"].to_pylist())
    assert table.schema.field("text_embedding").type == pa.large_list(pa.float16())
    assert int(table.schema.metadata[b"text_embed_dim"]) == encoder.embed_dim == 64
    assert pq.ParquetFile(out / "shards" / "00000.parquet").metadata.num_row_groups == 3  # 40 rows / 16


def test_stored_bytes_are_a_fraction_of_padding_to_128(embedded):
    _, out, _, manifest = embedded
    stats = storage_stats(out)
    tokens = [n for i in range(3) for n in pq.read_table(out / "shards" / f"0000{i}.parquet")["n_tokens"].to_pylist()]
    per_token = stats["bytes_per_sample"] / stats["mean_tokens"]
    at_median = per_token * statistics.median(tokens)
    print(f"\nembedding bytes/sample {stats['bytes_per_sample']:.0f} (mean {stats['mean_tokens']:.1f} tokens), "
          f"{at_median:.0f} at the median {statistics.median(tokens)} tokens, vs padded-128 fp16 "
          f"{stats['padded128_fp16_bytes']} (ratio {stats['ratio_to_padded']:.3f})")
    assert at_median <= stats["padded128_fp16_bytes"] / 4 and stats["ratio_to_padded"] <= 0.25
    assert manifest["storage"] == pytest.approx(stats)


def test_rerun_does_nothing(embedded):
    curated, out, config, manifest = embedded
    mtime = (out / "shards" / "00000.parquet").stat().st_mtime_ns
    assert embed(curated, out, config) == manifest
    assert (out / "shards" / "00000.parquet").stat().st_mtime_ns == mtime


KILLED_RUN = """
import sys
from imagen_core.text_encoder import TextEncoderConfig
from pipelines.step import ActorPoolConfig
from pipelines.embed import EmbedConfig, embed
from pipelines.ray_env import RayConfig, init_ray
init_ray(RayConfig(num_cpus=2))
config = EmbedConfig(text_encoder=TextEncoderConfig(kind="t5", name=sys.argv[3], batch_size=1), row_group_rows=16,
                     pool=ActorPoolConfig(size=1))
embed(sys.argv[1], sys.argv[2], config)
"""


@pytest.mark.slow  # starts a second Ray in a subprocess
def test_kill_9_during_embed_then_rerun_gives_the_clean_result(ray_session, tmp_path):
    curated = write_curated_like(tmp_path / "curate", shards=12, rows_per_shard=30, seed=1)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(curated), str(killed), TINY_T5], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list((killed / "_done").glob("*.json")):  # the first shard's done record
            assert proc.poll() is None, "the embed run ended before finishing one shard"
            assert time.monotonic() < deadline, "no shard finished within 240 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    done_at_kill = len(list((killed / "_done").glob("*.json")))
    assert not (killed / "manifest.json").exists() and 1 <= done_at_kill < 12
    config = EmbedConfig(text_encoder=TextEncoderConfig(kind="t5", name=TINY_T5, batch_size=1), row_group_rows=16,
                         pool=ActorPoolConfig(size=1))
    resumed = embed(curated, killed, config)
    clean = embed(curated, tmp_path / "clean", config)
    print(f"\nkilled after {done_at_kill} of 12 shards; rerun finished the rest")
    got, want = list(read_embeddings(killed)), list(read_embeddings(tmp_path / "clean"))
    keys = [k for k, _ in got]
    assert keys == [k for k, _ in want] and len(keys) == len(set(keys)) == 360
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))
    assert [s["rows"] for s in resumed["shards"]] == [s["rows"] for s in clean["shards"]]
