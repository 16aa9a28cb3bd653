"""Curation, embedding, the report and search with their directories on an object store (s3://, a loopback
moto server), against the same steps on a local disk: the same decisions, shards and hits.

Ray's workers take the AWS_* variables from the environment Ray starts in, so this module sets them
(`s3_env`) before its Ray starts (`ray_s3`).
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_curate import (DEMO_SELECT, STAND_IN_SAFE, STAND_IN_UNSAFE, clip_cache_root, demo_corpus,
                         tiny_clip_checkpoint, write_ingest_like)

from pipelines import storage
from pipelines.clip_model import Clip, ClipConfig
from pipelines.curate import CurateConfig, ScoreConfig, curate, read_decisions
from pipelines.step import ActorPoolConfig

TINY_T5 = "imagen-asset:tiny-t5"


# -- fast: the storage-aware building blocks, no Ray -----------------------------------------------------
def test_partitioned_files_quantizer_and_heads_on_s3(s3, tmp_path):
    from pipelines.ann_index import PartitionedFile, Quantizer, read_partition, write_partitioned
    from pipelines.heads import file_digest, load_head, save_head

    server, bucket = s3
    table = pa.table({"x": np.arange(10), "s": [str(i) for i in range(10)]})
    part = np.array([2, 0, 2, 1, 0, 2, 2, 0, 1, 2])
    parts = {}
    for where in (tmp_path / "p.arrow", f"s3://{bucket}/work/p.arrow"):
        write_partitioned(where, table, part, 4)
        f = PartitionedFile(where)
        parts[str(where).startswith("s3")] = [f.part(p)["x"].to_pylist() for p in range(4)]
        f.close()
        assert read_partition([where, where], 2)["x"].to_pylist() == [0, 2, 5, 6, 9] * 2
        assert read_partition([where], 3) is None
    assert parts[True] == parts[False] == [[1, 4, 7], [3, 8], [0, 2, 5, 6, 9], []]

    import faiss

    index = faiss.IndexFlatIP(3)
    index.add(np.eye(3, dtype=np.float32))
    Quantizer(centroids=np.eye(3, dtype=np.float32), index=index).save(f"s3://{bucket}/q")
    loaded = Quantizer.load(f"s3://{bucket}/q")
    assert loaded.n_lists == 3 and loaded.assign(np.array([[0, 0, 1.0]]), 1)[0].tolist() == [[2]]

    weights = [(np.ones((1, 4), np.float32), np.zeros(1, np.float32))]
    remote = save_head(f"s3://{bucket}/heads/h.safetensors", weights, output="sigmoid")
    local = save_head(tmp_path / "h.safetensors", weights, output="sigmoid")
    assert str(remote).startswith("s3://") and load_head(remote).output == "sigmoid"
    import hashlib

    assert file_digest(remote) == hashlib.sha256(remote.read_bytes()).hexdigest()  # safetensors' metadata order varies
    assert file_digest(local) == hashlib.sha256(local.local.read_bytes()).hexdigest()
    assert server.keys(bucket) == ["heads/h.safetensors", "q/centroids.npy", "q/quantizer.faiss", "work/p.arrow"]


# -- the steps on a bucket, against a local run ------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_env(s3_server):
    """The loopback server's AWS_* for this whole module, set before Ray starts (its workers inherit them)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.env.items():
            patch.setenv(key, value)
        yield s3_server


@pytest.fixture(scope="module")
def ray_s3(s3_env, ray_session):
    yield s3_env


@pytest.fixture(scope="module")
def clip_config(request, tmp_path_factory) -> ClipConfig:
    return ClipConfig.tiny(tiny_clip_checkpoint(clip_cache_root(request, tmp_path_factory)))


@pytest.fixture(scope="module")
def curated(ray_s3, clip_config, tmp_path_factory):
    """60 demo rows in 2 shards, curated from a local ingest into a local folder, and from the same ingest
    uploaded to a bucket into the bucket."""
    server = ray_s3
    root = tmp_path_factory.mktemp("s3curate")
    paths, truth = demo_corpus(root / "corpus", 60, seed=3)
    write_ingest_like(paths, root / "ingest", rows_per_shard=30)
    bucket = server.create_bucket()
    remote = storage.path(f"s3://{bucket}/run")
    (remote / "ingest").upload_from(root / "ingest")
    config = CurateConfig(score=ScoreConfig(clip=clip_config, unsafe_concepts=STAND_IN_UNSAFE,
                                            safe_concepts=STAND_IN_SAFE),
                          select=DEMO_SELECT, pool=ActorPoolConfig(size=1))
    local = curate(root / "ingest", root / "curate", config)
    on_s3 = curate(str(remote / "ingest"), str(remote / "curate"), config)
    return server, bucket, root, remote, local, on_s3, config


def _last_modified(server, bucket: str, prefix: str) -> dict[str, object]:
    out = {}
    for page in server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({o["Key"]: o["LastModified"] for o in page.get("Contents", [])})
    return out


@pytest.mark.slow
def test_curate_on_s3_writes_what_a_local_run_writes(curated):
    server, bucket, root, remote, local, on_s3, config = curated
    keys = server.keys(bucket, "run/curate/")
    for shard in ("00000", "00001"):
        for sub in ("decisions", "shards", "_done", "scores/shards", "scores/_done"):
            suffix = ".json" if sub.endswith("_done") else ".parquet"
            assert f"run/curate/{sub}/{shard}{suffix}" in keys
    assert {"run/curate/manifest.json", "run/curate/scores/manifest.json", "run/curate/index/manifest.json",
            "run/curate/index/index.json", "run/curate/index/centroids.npy"} <= set(keys)
    assert not [k for k in keys if "/_work/" in k], "the selection's work files are removed when it finishes"
    assert not (root / "curate" / "_work").exists()
    stamps = _last_modified(server, bucket, "run/curate/")
    written = [t for k, t in stamps.items() if k.startswith(("run/curate/decisions/", "run/curate/shards/",
                                                             "run/curate/_done/"))]
    assert stamps["run/curate/manifest.json"] >= max(written)  # the manifest is written last
    assert on_s3["funnel"] == local["funnel"] and on_s3["dedup"] == local["dedup"]
    assert on_s3["funnel"]["kept"] > 0 and any(s["removed"] for s in on_s3["funnel"]["stages"]
                                               if s["filter"] == "near_duplicate" or s["filter"] == "exact_duplicate")
    assert read_decisions(str(remote / "curate")).to_pylist() == read_decisions(root / "curate").to_pylist()
    from pipelines.ann_index import read_parquet

    kept_local = pa.concat_tables([pq.read_table(root / "curate" / "shards" / f"0000{i}.parquet") for i in range(2)])
    kept_s3 = pa.concat_tables([read_parquet(remote / "curate" / "shards" / f"0000{i}.parquet") for i in range(2)])
    assert kept_s3.equals(kept_local) and kept_s3.schema.metadata == kept_local.schema.metadata
    # a rerun reads the finished manifests back and writes nothing
    before = _last_modified(server, bucket, "run/curate/")
    assert curate(str(remote / "ingest"), str(remote / "curate"), config) == on_s3
    assert _last_modified(server, bucket, "run/curate/") == before


@pytest.mark.slow
def test_report_on_s3_matches_the_local_report_and_logs_to_mlflow(curated, tmp_path):
    import mlflow

    from pipelines.report import report

    server, bucket, root, remote, *_ = curated
    local = report(root / "curate", examples=4)
    on_s3 = report(str(remote / "curate"), examples=4)
    assert on_s3 == local
    out = remote / "curate" / "report"
    assert (out / "report.json").read_json() == json.loads((root / "curate" / "report" / "report.json").read_text())
    assert set(server.keys(bucket, "run/curate/report/")) == {f"run/curate/report/{n}"
                                                              for n in local["files"] + ["report.json"]}
    for name in local["files"]:
        with Image.open(io.BytesIO((out / name).read_bytes())) as png:
            assert png.width > 100 and png.height > 100
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("s3-report", artifact_location=(tmp_path / "artifacts").as_uri())
    from pipelines.report import log_to_mlflow

    run_id = log_to_mlflow(on_s3, out, uri, "s3-report")
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_id, "curation")}
    assert {f"curation/{n}" for n in local["files"] + ["report.json"]} <= artifacts


@pytest.mark.slow
def test_search_on_s3_finds_what_a_local_search_finds(curated, clip_config, tmp_path, capsys):
    from pipelines.ann_index import IvfConfig, IvfIndex, build_search_index
    from pipelines.search import search

    server, bucket, root, remote, *_ = curated
    kept = [r for r in read_decisions(root / "curate").to_pylist() if r["decision"] == "keep"]
    clip = Clip(clip_config)
    query = kept[0]["caption"]
    local = search(root / "curate", query, clip=clip, k=5)
    on_s3 = search(str(remote / "curate"), query, clip=clip, k=5)
    assert on_s3.table.equals(local.table)
    assert str(on_s3.contact_sheet).startswith(f"s3://{bucket}/run/curate/search/") and on_s3.contact_sheet.exists()
    with Image.open(io.BytesIO(on_s3.contact_sheet.read_bytes())) as sheet:
        assert sheet.width > 5 * 96
    by_image = search(str(remote / "curate"), clip=clip, k=3, image=str(remote / "curate" / "search" /
                                                                        on_s3.contact_sheet.name))
    assert by_image.table.num_rows == 3
    # an index of many lists (sampled, trained, assigned and reduced by Ray tasks) on the store
    small = IvfConfig(rows_per_list=4, train_points_per_list=4)
    m_local = build_search_index(root / "curate", small, out_dir=tmp_path / "index")
    m_s3 = build_search_index(str(remote / "curate"), small, out_dir=str(remote / "index_small"))
    assert m_s3["lists"] == m_local["lists"] > 2 and m_s3["buckets"] == m_local["buckets"]
    assert not [k for k in server.keys(bucket, "run/index_small/") if "/_work/" in k]
    queries = clip.encode_texts([r["caption"] for r in kept[:3]]).numpy()
    a, b = IvfIndex(tmp_path / "index"), IvfIndex(str(remote / "index_small"))
    for x, y in zip(a.search(queries, 5, nprobe=4), b.search(queries, 5, nprobe=4)):
        assert x.equals(y)
    a.close()
    b.close()
    # `imagen data search` with --data on the bucket
    from jobs.cli import main

    code = main(["data", "search", "--data", str(remote / "curate"), "--k", "4", "--clip-model",
                 clip_config.model_name, query])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["contact_sheet"] == str(on_s3.contact_sheet)


@pytest.mark.slow
def test_embed_on_s3_equals_a_local_embed(curated, clip_config):
    from imagen_core.text_encoder import TextEncoderConfig
    from pipelines.embed import EmbedConfig, embed, read_embeddings, storage_stats

    server, bucket, root, remote, *_ = curated
    config = EmbedConfig(text_encoder=TextEncoderConfig(kind="t5", name=TINY_T5, batch_size=16), row_group_rows=8,
                         pool=ActorPoolConfig(size=1))
    local = embed(root / "curate", root / "embed", config)
    on_s3 = embed(str(remote / "curate"), str(remote / "embed"), config)
    keys = server.keys(bucket, "run/embed/")
    assert {"run/embed/manifest.json", "run/embed/shards/00000.parquet", "run/embed/shards/00001.parquet",
            "run/embed/_done/00000.json", "run/embed/_done/00001.json"} <= set(keys)
    stamps = _last_modified(server, bucket, "run/embed/")
    assert stamps["run/embed/manifest.json"] >= max(t for k, t in stamps.items() if k != "run/embed/manifest.json")
    assert on_s3["storage"] == local["storage"] == storage_stats(str(remote / "embed"))
    got, want = list(read_embeddings(str(remote / "embed"))), list(read_embeddings(root / "embed"))
    assert [k for k, _ in got] == [k for k, _ in want] and len(got) == local["storage"]["rows"] > 0
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(got, want))
    assert embed(str(remote / "curate"), str(remote / "embed"), config) == on_s3  # finished: read back
    # search builds the index of an embed directory on its first query, on the store too
    from pipelines.search import search

    assert not server.keys(bucket, "run/embed/index/")
    hits = search(str(remote / "embed"), "a red circle", clip=clip_config, k=3)
    assert hits.table.num_rows == 3 and "run/embed/index/manifest.json" in server.keys(bucket, "run/embed/index/")
