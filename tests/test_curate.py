"""Curation on the demo corpus: the tiny CLIP, every filter's decision, re-selection without CLIP.

The ingest-shaped shards here are built straight from the demo corpus files (real images and
captions, re-encoded as the ingest step does); the slow test at the end runs the real ingest.
Helpers here are shared with test_embed.py and test_search_report.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import pathlib
import random
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import demo_corpus as dc
from pipelines.clip_model import (TINY_CLIP_NAME, Clip, ClipConfig, ClipWeightsUnavailable, TinyClipFit,
                                  caption_separation, check_clip_source, fit_tiny_clip)
from pipelines.curate import (AspectFilter, CaptionFilter, ClipScoreFilter, CurateConfig, NearDupFilter,
                              ScoreConfig, SelectConfig, SizeFilter, UnsafeFilter, _caption_reasons, curate,
                              near_duplicates, per_sample_reasons, read_decisions, score, select)
from pipelines.step import StepDir, StepKeyMismatch, atomic_write_parquet

INGEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("sha256", pa.string()),
])
CLIP_FIT = TinyClipFit(steps=150)
CLIP_TRAIN_SCENES, CLIP_TRAIN_SEED = 512, 1000  # a different seed from every evaluated corpus
from pipelines.demo.run import demo_select  # noqa: E402 - the demo's thresholds for the tiny CLIP
DEMO_SELECT = demo_select()
# A stand-in "unsafe" concept (the demo corpus has nothing unsafe): black backgrounds. The tiny CLIP
# reads backgrounds well zero-shot; it cannot bind colour to shape ("a red cross" flags at random).
STAND_IN_UNSAFE = ("a black background",)
STAND_IN_SAFE = tuple(f"a {c} background" for c in dc.COLOURS if c != "black")


# -- shared helpers ---------------------------------------------------------------------------------
def tiny_clip_checkpoint(cache_root: pathlib.Path) -> pathlib.Path:
    """The tiny CLIP fitted on clean demo scenes, cached across test sessions by a hash of its recipe."""
    import pipelines.clip_model as clip_model

    recipe = json.dumps([pathlib.Path(clip_model.__file__).read_text(), CLIP_FIT.__dict__, CLIP_TRAIN_SCENES,
                         CLIP_TRAIN_SEED, pathlib.Path(dc.__file__).read_text()])
    folder = cache_root / f"tiny_clip_{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    rng = random.Random(CLIP_TRAIN_SEED)
    scenes = [dc.random_scene(rng) for _ in range(CLIP_TRAIN_SCENES)]
    return fit_tiny_clip([dc.render(s, 64) for s in scenes], [s.caption() for s in scenes], folder, CLIP_FIT)


def clip_cache_root(request, tmp_path_factory) -> pathlib.Path:
    """pytest's cache folder (survives sessions), or a temp folder when the cache plugin is off."""
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("imagen_curate") if cache is not None else tmp_path_factory.mktemp("clip_cache")


def _as_ingested(data: bytes, size: int = 64) -> tuple[bytes, int, int]:
    """What the ingest step stores: centre-cropped to size x size, JPEG quality 95."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        w, h = img.size
        side = min(w, h)
        img = img.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)).resize((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), w, h


def write_ingest_like(corpus: dc.DemoCorpusPaths, ingest_dir: pathlib.Path, rows_per_shard: int) -> dict:
    """Ingest-schema shards + manifest from the demo files, with ingest's statuses. One deliberate
    difference: truncated files pass as "success" with their bytes, so curate's decode check runs."""
    urls = pq.read_table(corpus.url_list).to_pylist()
    truth = pq.read_table(corpus.ground_truth).to_pylist()
    step = StepDir.open(ingest_dir, "ingest", {"demo": str(corpus.root), "rows_per_shard": rows_per_shard}, [])
    shard_ids = []
    for start in range(0, len(urls), rows_per_shard):
        shard_id = f"{start // rows_per_shard:05d}"
        stop = min(len(urls), start + rows_per_shard)
        rows = [_ingest_row(i, urls[i], truth[i], corpus.root) for i in range(start, stop)]
        atomic_write_parquet(ingest_dir / "shards" / f"{shard_id}.parquet", pa.Table.from_pylist(rows, INGEST_SCHEMA))
        step.mark_done(shard_id, {"rows": len(rows)})
        shard_ids.append(shard_id)
    return step.finish(shard_ids)


def _ingest_row(i: int, url: dict, truth: dict, root: pathlib.Path) -> dict:
    row = {name: None for name in INGEST_SCHEMA.names}
    row.update(key=f"{i:09d}", url=url["url"], caption=url["caption"], status="success")
    path = root / truth["path"]
    if truth["junk"] == "opt_out":
        return {**row, "status": "refused", "error": "opt_out: X-Robots-Tag noai"}
    if not path.exists():
        return {**row, "status": "failed_to_download", "error": "HTTP Error 404: File not found"}
    data = path.read_bytes()
    if truth["junk"] == "truncated":
        w, h = Image.open(io.BytesIO(data)).size  # the header survives truncation
        return {**row, "image": data, "width": w, "height": h, "original_width": w, "original_height": h,
                "sha256": hashlib.sha256(data).hexdigest()}
    try:
        image, w, h = _as_ingested(data)
    except OSError:
        return {**row, "status": "failed_to_decode", "error": "Image decoding error"}
    return {**row, "image": image, "width": 64, "height": 64, "original_width": w, "original_height": h,
            "sha256": hashlib.sha256(image).hexdigest()}


def demo_corpus(root: pathlib.Path, num_images: int, seed: int = 0) -> tuple[dc.DemoCorpusPaths, list[dict]]:
    paths = dc.write_demo_corpus(dc.DemoCorpusConfig(num_images=num_images, seed=seed), root, "http://127.0.0.1:9")
    return paths, pq.read_table(paths.ground_truth).to_pylist()


def with_truth(decisions: pa.Table, truth: list[dict]) -> list[dict]:
    """Decision rows joined with the corpus ground truth (junk kind, source row) by URL."""
    by_url = {t["url"]: t for t in truth}
    return [{**d, **{k: by_url[d["url"]][k] for k in ("row", "junk", "source_row", "scene_caption")}}
            for d in decisions.to_pylist()]


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dir(request, tmp_path_factory) -> pathlib.Path:
    """A private copy of the cached tiny CLIP (a test deletes it to prove selection never loads it)."""
    cached = tiny_clip_checkpoint(clip_cache_root(request, tmp_path_factory))
    return pathlib.Path(shutil.copytree(cached.parent, tmp_path_factory.mktemp("clip") / "tiny_clip"))


@pytest.fixture(scope="module")
def scored(ray_session, clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    paths, truth = demo_corpus(root / "corpus", 200)
    write_ingest_like(paths, root / "ingest", rows_per_shard=50)
    config = ScoreConfig(clip=ClipConfig.tiny(clip_dir), unsafe_concepts=STAND_IN_UNSAFE, safe_concepts=STAND_IN_SAFE)
    manifest = score(root / "ingest", root / "scores", config)
    return root, truth, config, manifest


@pytest.fixture(scope="module")
def selected(scored):
    root, truth, _, _ = scored
    manifest = select(root / "ingest", root / "scores", root / "curate", DEMO_SELECT)
    return root, truth, manifest, with_truth(read_decisions(root / "curate"), truth)


# -- the tiny CLIP --------------------------------------------------------------------------------
def test_clip_config_and_missing_weights_errors():
    with pytest.raises(ValueError, match="random-init CLIP"):
        ClipConfig(model_name="ViT-B-32")
    with pytest.raises(ValueError, match="leave pretrained=None"):
        ClipConfig(model_name="local-dir:/x", pretrained="openai")
    with pytest.raises(ClipWeightsUnavailable, match="HF_HUB_OFFLINE=1 is set.*fit_tiny_clip"):
        Clip(ClipConfig(model_name="ViT-B-32", pretrained="openai"))  # offline: fails at once
    with pytest.raises(ClipWeightsUnavailable, match="not found|Directory"):
        Clip(ClipConfig(model_name="local-dir:/nonexistent/clip"))
    # The same mistakes caught on the driver, before any actor starts:
    with pytest.raises(ClipWeightsUnavailable, match="lacks open_clip_config.json or a weights file"):
        check_clip_source(ClipConfig(model_name="local-dir:/nonexistent/clip"))
    with pytest.raises(ClipWeightsUnavailable, match="known tags: .*openai"):
        check_clip_source(ClipConfig(model_name="ViT-B-32", pretrained="no-such-tag"))
    with pytest.raises(ValueError, match="no architecture"):
        check_clip_source(ClipConfig(model_name="ViT-Q-99", pretrained="openai"))


def test_tiny_clip_separates_matched_from_mismatched_captions(clip_dir):
    rng = random.Random(7)  # scenes the CLIP never saw
    scenes = [dc.random_scene(rng) for _ in range(200)]
    images, captions = [dc.render(s, 64) for s in scenes], [s.caption() for s in scenes]
    clip = Clip(ClipConfig.tiny(clip_dir))
    sep = caption_separation(clip, images, captions)
    print(f"\ntiny CLIP on 200 unseen scenes: {sep}, fit {json.loads((clip_dir / 'fit_stats.json').read_text())}")
    assert sep["auc"] > 0.95 and sep["matched_mean"] - sep["mismatched_mean"] > 0.5
    # The same weights load by registered name + safetensors file, with the same preprocessing.
    by_name = Clip(ClipConfig(model_name=TINY_CLIP_NAME, pretrained=str(clip_dir / "open_clip_model.safetensors")))
    assert np.allclose(by_name.encode_images(images[:4]), clip.encode_images(images[:4]), atol=1e-5)


# -- pure filter logic ----------------------------------------------------------------------------
def test_caption_rules_name_every_failure():
    cfg = CaptionFilter()
    patterns = [re.compile(p, re.IGNORECASE) for p in cfg.boilerplate]
    assert _caption_reasons("a red circle on a blue background", cfg, patterns) == []
    assert _caption_reasons("   ", cfg, patterns) == ["caption_empty"]
    assert _caption_reasons("https://example.com/img/1.jpg", cfg, patterns) == ["caption_url_only", "caption_too_short"]
    for text in dc.BOILERPLATE_CAPTIONS:
        assert "caption_boilerplate" in _caption_reasons(text, cfg, patterns), text
    assert _caption_reasons("cat", cfg, patterns) == ["caption_too_short"]
    assert _caption_reasons("word " * 129, cfg, patterns) == ["caption_too_long"]
    with pytest.raises(ValueError, match="min_words <= max_words"):
        CaptionFilter(min_words=5, max_words=2)
    with pytest.raises(ValueError, match="keep_fraction"):
        ClipScoreFilter(mode="percentile", keep_fraction=0.0)


def test_size_and_aspect_use_the_original_size_and_every_reason_is_kept():
    import pandas as pd

    base = {"status": "success", "caption": "a red circle on a blue background", "score_error": None,
            "clip_score": 0.9, "unsafe_margin": -0.1, "unsafe_concept": "x", "width": 64, "height": 64}
    meta = pd.DataFrame([
        {**base, "original_width": 640, "original_height": 480},
        {**base, "original_width": 8, "original_height": 8},  # upscaled to 64 by ingest: still too small
        {**base, "original_width": 900, "original_height": 200, "caption": ""},
        {**base, "original_width": None, "original_height": None, "status": "failed_to_download"},
    ])
    config = SelectConfig(size=SizeFilter(min_side=32), aspect=AspectFilter(max_ratio=3.0))
    reasons = [[code for _, code, _ in found] for found in per_sample_reasons(meta, config)]
    assert reasons == [[], ["too_small"], ["bad_aspect_ratio", "caption_empty"], ["download_failed_to_download"]]
    off = SelectConfig(size=SizeFilter(enabled=False), aspect=AspectFilter(enabled=False),
                       caption=CaptionFilter(enabled=False))
    assert [f for f in per_sample_reasons(meta, off)][:3] == [[], [], []]


def test_near_duplicates_keep_the_first_and_need_the_thumbnail_to_agree():
    emb = np.array([[1, 0], [0.999, 0.0447], [0, 1], [0.9995, 0.0316]], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    same = np.zeros((4, 192), np.int16)
    assert near_duplicates(emb, same, 0.99, 3.0) == [None, 0, None, 0]
    other = same.copy()
    other[3] += 100  # row 3 looks like row 0 to CLIP but is another picture
    assert near_duplicates(emb, other, 0.99, 3.0) == [None, 0, None, None]
    assert near_duplicates(emb, other, 0.99, None) == [None, 0, None, 0]
    assert near_duplicates(emb, same, 0.99, 3.0, block=1) == [None, 0, None, 0]  # blocks agree


# -- the steps on the demo corpus -------------------------------------------------------------------
def test_every_row_has_a_decision_and_junk_is_rejected_by_the_right_filter(selected):
    root, truth, manifest, rows = selected
    assert len(rows) == len(truth) == manifest["funnel"]["input"] == 200
    assert len({r["key"] for r in rows}) == 200
    assert all((r["decision"] == "keep") == (r["reason"] is None) for r in rows)
    assert all(r["reasons"] and r["reasons"][0] == r["reason"] for r in rows if r["decision"] == "reject")
    expected = {"missing": "download", "opt_out": "download", "non_image": "download", "truncated": "decode",
                "tiny": "min_size", "empty_caption": "caption", "url_caption": "caption",
                "boilerplate_caption": "caption"}
    wrong = [(r["junk"], r["filter"]) for r in rows if r["junk"] in expected and r["filter"] != expected[r["junk"]]]
    assert wrong == []
    funnel = manifest["funnel"]
    assert funnel["kept"] + sum(s["removed"] for s in funnel["stages"]) == funnel["input"]
    kept = pq.read_table(root / "curate" / "shards" / "00000.parquet")
    assert {"key", "image", "caption", "clip_score", "clip_image_embedding"} <= set(kept.column_names)
    print("\ndemo funnel (200 rows):", json.dumps(funnel))


def test_duplicates_are_removed_keeping_one_copy(selected):
    _, _, _, rows = selected
    kept = {r["row"] for r in rows if r["decision"] == "keep"}
    by_row = {r["row"]: r for r in rows}

    def origin(row: int) -> int:
        source = by_row[row]["source_row"]
        return row if source is None else source

    for kind in ("exact_duplicate", "near_duplicate"):
        junk = [r for r in rows if r["junk"] == kind]
        both = [r["row"] for r in junk if r["row"] in kept and r["source_row"] in kept]
        print(f"\n{kind}: {len(junk)} junk rows, {len(both)} kept next to their source")
        assert len(junk) == 10 and both == []
    # Clean rows removed as "near duplicates" of a different picture: the thumbnail check's misses.
    false = [r for r in rows if r["reason"] == "near_duplicate"
             and origin(r["row"]) != origin(next(x["row"] for x in rows if x["key"] == r["duplicate_of"]))]
    clean = sum(r["junk"] == "clean" for r in rows)
    print(f"clean rows wrongly removed as near duplicates: {len(false)} of {clean}")
    assert len(false) <= 0.1 * clean


def test_tiny_clip_rejects_most_mismatched_captions(selected):
    _, _, _, rows = selected
    mismatched = [r for r in rows if r["junk"] == "mismatched_caption"]
    rejected = [r for r in mismatched if r["filter"] == "clip_score"]
    clean = [r for r in rows if r["junk"] == "clean" and r["clip_score"] is not None]
    clean_low = [r for r in clean if r["clip_score"] < DEMO_SELECT.clip_score.min_score]
    print(f"\nmismatched captions rejected by CLIP score: {len(rejected)} of {len(mismatched)}; "
          f"clean rows below the threshold: {len(clean_low)} of {len(clean)}")
    assert len(mismatched) == 10 and len(rejected) >= 8 and len(clean_low) <= 0.05 * len(clean)


def test_percentile_keeps_the_requested_fraction_and_reselection_never_loads_clip(scored, selected, tmp_path):
    root, _, _, _ = scored
    clip_dir = pathlib.Path(scored[2].clip.model_name.removeprefix("local-dir:"))
    before = {p: p.stat().st_mtime_ns for p in (root / "scores").rglob("*") if p.is_file()}
    hidden = clip_dir.with_name("hidden")
    clip_dir.rename(hidden)  # any attempt to load CLIP would now fail
    try:
        for fraction in (0.5, 0.7):
            config = SelectConfig(**{**DEMO_SELECT.__dict__,
                                     "clip_score": ClipScoreFilter(mode="percentile", keep_fraction=fraction)})
            manifest = select(root / "ingest", root / "scores", tmp_path / f"p{fraction}", config)
            rows = read_decisions(tmp_path / f"p{fraction}").to_pylist()
            survivors = [r for r in rows if not [x for x in r["reasons"] if x != "below_clip_percentile"]]
            kept = [r for r in rows if r["decision"] == "keep"]
            assert len(kept) == math.floor(fraction * len(survivors) + 0.5) == manifest["funnel"]["kept"]
            cut = [r for r in survivors if r["decision"] == "reject"]
            assert min(r["clip_score"] for r in kept) >= max(r["clip_score"] for r in cut)
    finally:
        hidden.rename(clip_dir)
    assert {p: p.stat().st_mtime_ns for p in (root / "scores").rglob("*") if p.is_file()} == before


def test_rerun_is_a_no_op_and_a_changed_config_is_refused(scored, selected):
    root, _, config, score_manifest = scored
    _, _, manifest, _ = selected
    shard = root / "curate" / "shards" / "00000.parquet"
    mtime = shard.stat().st_mtime_ns
    again = curate(root / "ingest", root / "curate", CurateConfig(score=config, select=DEMO_SELECT),
                   score_dir=root / "scores")
    assert again == manifest and shard.stat().st_mtime_ns == mtime
    assert score(root / "ingest", root / "scores", config) == score_manifest
    with pytest.raises(StepKeyMismatch, match="Use a new output directory"):
        select(root / "ingest", root / "scores", root / "curate", SelectConfig())


def test_unsafe_concepts_flag_by_margin_without_rescoring(scored, tmp_path):
    root, truth, _, _ = scored
    flagged_at = {}
    for margin in (0.0, 0.05):
        config = SelectConfig(**{**DEMO_SELECT.__dict__, "unsafe": UnsafeFilter(enabled=True, margin=margin)})
        select(root / "ingest", root / "scores", tmp_path / f"m{margin}", config)
        rows = with_truth(read_decisions(tmp_path / f"m{margin}"), truth)
        flagged_at[margin] = {r["key"] for r in rows if "unsafe" in r["reasons"]}
        black = {r["key"] for r in rows if r["scene_caption"] and r["scene_caption"].endswith("on a black background")
                 and r["clip_score"] is not None}
        hits = flagged_at[margin] & black
        print(f"\nstand-in unsafe concept {STAND_IN_UNSAFE}, margin {margin}: flagged {len(flagged_at[margin])}, "
              f"{len(hits)} of them on black; black-background images: {len(black)}")
        assert len(hits) >= 0.7 * len(flagged_at[margin]) and len(hits) >= 0.7 * len(black)
        assert all(r["unsafe_concept"] == "a black background" for r in rows if r["key"] in flagged_at[margin])
    assert flagged_at[0.05] <= flagged_at[0.0]  # a larger margin only ever flags less
