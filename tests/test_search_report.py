"""Search and report on curated demo data; the slow test runs ingest -> curate -> embed end to end."""
from __future__ import annotations

import dataclasses
import json
import time

import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_curate import (DEMO_SELECT, STAND_IN_SAFE, STAND_IN_UNSAFE, clip_cache_root, demo_corpus,
                         tiny_clip_checkpoint, with_truth, write_ingest_like)

from pipelines.clip_model import TINY_CLIP_NAME, Clip, ClipConfig
from pipelines.curate import FILTER_ORDER, CurateConfig, ScoreConfig, curate, read_decisions
from pipelines.step import ActorPoolConfig
from pipelines.report import report
from pipelines.search import search

TINY_T5 = "imagen-asset:tiny-t5"  # shipped with the package (imagen_core/assets/tiny-t5)


@pytest.fixture(scope="module")
def clip_config(request, tmp_path_factory) -> ClipConfig:
    return ClipConfig.tiny(tiny_clip_checkpoint(clip_cache_root(request, tmp_path_factory)))


def curate_config(clip: ClipConfig) -> CurateConfig:
    return CurateConfig(score=ScoreConfig(clip=clip, unsafe_concepts=STAND_IN_UNSAFE, safe_concepts=STAND_IN_SAFE),
                        select=DEMO_SELECT)


@pytest.fixture(scope="module")
def curated(ray_session, clip_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    paths, truth = demo_corpus(root / "corpus", 120, seed=3)
    write_ingest_like(paths, root / "ingest", rows_per_shard=60)
    # One actor: on 2 shared cores, starting a second one costs more than it saves on 120 rows.
    curate(root / "ingest", root / "curate", dataclasses.replace(curate_config(clip_config), pool=ActorPoolConfig(size=1)))
    return root, truth


def test_search_ranks_the_image_of_a_caption_first(curated, clip_config):
    root, _ = curated
    kept = pq.read_table(root / "curate" / "shards" / "00000.parquet", columns=["key", "caption"]).to_pylist()[:8]
    clip, ranks = Clip(clip_config), []  # loaded once for the eight queries
    for row in kept:
        result = search(root / "curate", row["caption"], clip=clip, k=10)
        keys = result.table["key"].to_pylist()
        ranks.append(keys.index(row["key"]) + 1 if row["key"] in keys else None)
    print(f"\nrank of the captioned image among 10 hits, 8 queries: {ranks}")
    assert sum(r is not None and r <= 3 for r in ranks) >= 6
    sims = result.table["similarity"].to_pylist()
    assert sims == sorted(sims, reverse=True) and result.table.num_rows == 10
    with Image.open(result.contact_sheet.local) as sheet:
        assert sheet.width > 8 * 96 and sheet.height > 2 * 96  # 10 cells: two rows of eight


def test_search_refuses_a_different_clip(curated, clip_config):
    root, _ = curated
    other = ClipConfig(model_name=TINY_CLIP_NAME,
                       pretrained=clip_config.model_name.removeprefix("local-dir:") + "/open_clip_model.safetensors")
    with pytest.raises(ValueError, match="Search with the CLIP that curated the data"):
        search(root / "curate", "a red circle", clip=other)


def test_search_by_image_finds_that_image_and_its_copies(curated, clip_config):
    root, truth = curated
    decisions = with_truth(read_decisions(root / "curate"), truth)
    kept = pq.read_table(root / "curate" / "shards" / "00001.parquet", columns=["key", "image"]).to_pylist()
    row = kept[0]
    result = search(root / "curate", clip=Clip(clip_config), k=5, image=row["image"])
    assert result.table["key"][0].as_py() == row["key"] and result.table["similarity"][0].as_py() > 0.99
    assert result.contact_sheet.name == "image-image.png" and result.contact_sheet.exists()
    with pytest.raises(ValueError, match="exactly one of a text query or an image query"):
        search(root / "curate", "a red circle", clip=Clip(clip_config), image=row["image"])
    assert len(decisions) == 120


def test_index_lists_return_what_a_full_scan_returns(curated, clip_config, tmp_path):
    """An index of many small lists (4 rows each) against brute force over every kept embedding: the
    same top 10 when every list is probed, and most of it from a few lists."""
    import numpy as np

    from pipelines.ann_index import IvfConfig, IvfIndex, build_search_index, embeddings_of, unit

    root, _ = curated
    manifest = build_search_index(root / "curate", IvfConfig(rows_per_list=4, train_points_per_list=4),
                                  out_dir=tmp_path / "index")
    assert manifest["lists"] > 10 and manifest["buckets"] >= 1
    index = IvfIndex(tmp_path / "index")
    tables = [pq.read_table(p, columns=["key", "clip_image_embedding"]) for p in sorted((root / "curate" / "shards").glob("*.parquet"))]
    keys = [k for t in tables for k in t["key"].to_pylist()]
    emb = unit(np.concatenate([embeddings_of(t["clip_image_embedding"]) for t in tables]))
    assert manifest["rows"] == len(keys)
    queries = Clip(clip_config).encode_texts([f"a {c} circle on a {b} background" for c, b in
                                              (("red", "blue"), ("white", "black"), ("yellow", "green"))]).numpy()
    recall = []
    for q, every, few in zip(queries, index.search(queries, 10, nprobe=manifest["lists"]), index.search(queries, 10, nprobe=8)):
        truth = [keys[i] for i in np.lexsort((np.array(keys), -(emb @ (q / np.linalg.norm(q)))))[:10]]
        assert every["key"].to_pylist() == truth
        recall.append(len(set(few["key"].to_pylist()) & set(truth)) / 10)
    index.close()
    print(f"\nrecall@10 probing 8 of {manifest['lists']} lists: {recall}")
    assert np.mean(recall) >= 0.7


def test_report_accounts_for_every_row_and_logs_to_mlflow(curated, tmp_path):
    import mlflow

    root, truth = curated
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = report(root / "curate", tracking_uri=uri, examples=8)
    out = root / "curate" / "report"
    on_disk = json.loads((out / "report.json").read_text())
    funnel = on_disk["funnel"]
    assert funnel["input"] == len(truth) == 120
    assert funnel["kept"] + sum(s["removed"] for s in funnel["stages"]) == funnel["input"]
    decisions = read_decisions(root / "curate").to_pylist()
    for stage in funnel["stages"]:
        assert sum(stage["reasons"].values()) == stage["removed"]
        assert stage["removed"] == sum(d["filter"] == stage["filter"] for d in decisions)
    removing = {s["filter"] for s in funnel["stages"] if s["removed"]}
    assert set(on_disk["files"]) == {"clip_score_hist.png", "kept.png"} | {f"rejected_{f}.png" for f in removing}
    for name in on_disk["files"]:
        with Image.open(out / name) as png:
            assert png.width > 100 and png.height > 100
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(summary["mlflow_run_id"], "curation")}
    assert {f"curation/{name}" for name in on_disk["files"] + ["report.json"]} <= artifacts
    metrics = mlflow.MlflowClient(uri).get_run(summary["mlflow_run_id"]).data.metrics
    assert metrics["curation_kept"] == funnel["kept"] and metrics["curation_input"] == 120


@pytest.mark.slow
def test_ingest_curate_embed_end_to_end(ray_session, clip_config, tmp_path):
    from imagen_core.text_encoder import TextEncoderConfig
    from pipelines.demo.corpus import DemoCorpusConfig, serve_directory, write_demo_corpus
    from pipelines.embed import EmbedConfig, embed, read_embeddings, storage_stats
    from pipelines.fetch_policy import FetchPolicyConfig
    from pipelines.ingest import IngestConfig, run_ingest
    from pipelines.url_lists import UrlListConfig

    times = {}
    with serve_directory(tmp_path / "corpus" / "www") as server:  # serves files written after it starts
        paths = write_demo_corpus(DemoCorpusConfig(num_images=200, seed=11), tmp_path / "corpus", server.base_url)
        truth = pq.read_table(paths.ground_truth).to_pylist()
        started = time.monotonic()
        ingest = run_ingest(IngestConfig(
            url_list=UrlListConfig(paths=(str(paths.url_list),)), output_dir=str(tmp_path / "ingest"),
            rows_per_shard=50, threads_per_shard=4, policy=FetchPolicyConfig(allow_loopback=True, timeout_s=5)))
        times["ingest_s"] = time.monotonic() - started
    started = time.monotonic()
    curated = curate(tmp_path / "ingest", tmp_path / "curate", curate_config(clip_config))
    times["curate_s"] = time.monotonic() - started
    started = time.monotonic()
    embedded = embed(tmp_path / "curate", tmp_path / "embed",
                     EmbedConfig(text_encoder=TextEncoderConfig(kind="t5", name=TINY_T5)))
    times["embed_s"] = time.monotonic() - started
    started = time.monotonic()
    summary = report(tmp_path / "curate")
    hits = search(tmp_path / "embed", truth[0]["caption"] or "a red circle", clip=clip_config, k=8)
    times["report_search_s"] = time.monotonic() - started

    rows = with_truth(read_decisions(tmp_path / "curate"), truth)
    assert ingest["input_rows"] == len(rows) == 200 and len({r["key"] for r in rows}) == 200
    rejected = [r for r in rows if r["decision"] == "reject"]
    assert all(r["filter"] in FILTER_ORDER and r["reasons"][0] == r["reason"] for r in rejected)
    expected = {"missing": "download", "opt_out": "download", "non_image": "download", "truncated": "download",
                "tiny": "min_size", "empty_caption": "caption", "url_caption": "caption",
                "boilerplate_caption": "caption"}
    wrong = [(r["junk"], r["filter"]) for r in rows if r["junk"] in expected and r["filter"] != expected[r["junk"]]]
    assert wrong == []
    kept_rows = {r["row"] for r in rows if r["decision"] == "keep"}
    both_kept = {kind: [r["row"] for r in rows if r["junk"] == kind and r["row"] in kept_rows
                        and r["source_row"] in kept_rows] for kind in ("exact_duplicate", "near_duplicate")}
    # Exact copies always go; a shifted copy can slip past the thumbnail check (about 1 in 20).
    assert both_kept["exact_duplicate"] == [] and len(both_kept["near_duplicate"]) <= 1
    mismatched = [r for r in rows if r["junk"] == "mismatched_caption"]
    n_embedded = sum(1 for _ in read_embeddings(tmp_path / "embed"))
    assert n_embedded == curated["funnel"]["kept"] == summary["funnel"]["kept"]
    assert n_embedded == sum(s["rows"] for s in embedded["shards"])
    assert hits.table.num_rows == 8
    print("\nend to end on 200 demo rows:", json.dumps({k: round(v, 1) for k, v in times.items()}))
    print("funnel:", json.dumps(curated["funnel"]))
    print(f"duplicates kept next to their source: {both_kept}")
    print(f"mismatched captions rejected: {sum(r['filter'] == 'clip_score' for r in mismatched)} of {len(mismatched)}")
    print("embedding storage:", json.dumps(storage_stats(tmp_path / "embed")))
