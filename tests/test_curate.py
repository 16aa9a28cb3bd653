"""Curation on the demo corpus: the tiny CLIP, every filter's decision, re-selection without CLIP.

The ingest-shaped shards here are built straight from the demo corpus files (real images and
captions, re-encoded as the ingest step does); the slow test at the end runs the real ingest.
Helpers here are shared with test_embed.py and test_search_report.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import pathlib
import random
import shutil
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines.demo import corpus as dc
from pipelines.clip_model import (TINY_CLIP_NAME, Clip, ClipConfig, ClipWeightsUnavailable, TinyClipFit,
                                  caption_separation, check_clip_source, fit_tiny_clip)
from pipelines.curate import (AestheticFilter, AspectFilter, CaptionFilter, ClipScoreFilter, CurateConfig, NearDupFilter,
                              ScoreConfig, SelectConfig, SizeFilter, UnsafeFilter, caption_reasons, curate,
                              per_sample_decisions, read_decisions, score, select)
from pipelines.dedup import changed_pixels, exact_duplicates, pairs_above
from pipelines.sketches import RankCut, cut_value, hi_counts, lo_counts, ordered_bits
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


def false_near_duplicates(rows: list[dict]) -> list[dict]:
    """Rows removed as near duplicates of a row with another origin (source row) in the ground truth."""
    by_row, by_key = {r["row"]: r for r in rows}, {r["key"]: r for r in rows}

    def origin(row: int) -> int:
        source = by_row[row]["source_row"]
        return row if source is None else source

    return [r for r in rows if r["reason"] == "near_duplicate"
            and origin(r["row"]) != origin(by_key[r["duplicate_of"]]["row"])]


def _brightness(colour: str) -> float:
    """A demo colour's luma on a 1-10 scale (the aesthetic head stand-in's target)."""
    r, g, b = dc.COLOURS[colour]
    return 1 + 9 * (0.299 * r + 0.587 * g + 0.114 * b) / 255


def reshard(src: pathlib.Path, out: pathlib.Path, rows_per_shard: int, score_config: ScoreConfig) -> None:
    """The same ingest and score rows split into shards of another size (real data, no CLIP rerun)."""
    import pipelines.step as step_mod

    for name, step_name in (("ingest", "ingest"), ("scores", "curate_score")):
        manifest = json.loads((src / name / "manifest.json").read_text())
        parts = [pq.read_table(src / name / "shards" / f"{s['shard_id']}.parquet") for s in manifest["shards"]]
        table = pa.concat_tables(parts)
        config = {"resharded": str(src), "rows_per_shard": rows_per_shard}
        inputs = [] if name == "ingest" else [json.loads((out / "ingest" / "manifest.json").read_text())["key"]]
        step = StepDir.open(out / name, step_name, config, inputs)
        ids = []
        for start in range(0, table.num_rows, rows_per_shard):
            shard_id = f"{start // rows_per_shard:05d}"
            atomic_write_parquet(step_mod.shard_path(out / name, shard_id), table.slice(start, rows_per_shard))
            step.mark_done(shard_id, {"rows": min(rows_per_shard, table.num_rows - start)})
            ids.append(shard_id)
        extra = {} if name == "ingest" else {"clip": manifest["clip"]}
        step.finish(ids, **extra)


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
    with pytest.raises(ValueError, match='"fp16" needs a GPU.*"bf16"'):
        ClipConfig(model_name="local-dir:/x", precision="fp16")
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


def test_bf16_on_cpu_scores_like_fp32(clip_dir):
    """bf16 CLIP on CPU (the fast path on CPUs with bf16 instructions) keeps what curation reads: each pair's
    score within 0.01 of fp32's, the same matched-over-mismatched order for every pair, the same embeddings up to
    rounding (centred, so the shared direction of all embeddings does not hide differences)."""
    rng = random.Random(11)
    scenes = [dc.random_scene(rng) for _ in range(128)]
    images, captions = [dc.render(s, 64) for s in scenes], [s.caption() for s in scenes]
    wrong = captions[1:] + captions[:1]
    out = {}
    for precision in ("fp32", "bf16"):
        clip = Clip(ClipConfig.tiny(clip_dir, precision=precision))
        emb = clip.encode_images(images)
        out[precision] = emb, (emb * clip.encode_texts(captions)).sum(-1), (emb * clip.encode_texts(wrong)).sum(-1)
    (e32, s32, w32), (e16, s16, w16) = out["fp32"], out["bf16"]
    assert e16.dtype == torch.float32 and (s16 - s32).abs().max() < 0.01, (s16 - s32).abs().max()
    assert torch.equal(s32 > w32, s16 > w16)
    centred = torch.nn.functional.cosine_similarity(e32 - e32.mean(0), e16 - e32.mean(0))
    assert centred.min() > 0.999, centred.min()


# -- pure filter logic ----------------------------------------------------------------------------
def test_caption_rules_name_every_failure():
    cfg = CaptionFilter()
    assert caption_reasons("a red circle on a blue background", cfg) == []
    assert caption_reasons("   ", cfg) == ["caption_empty"]
    assert caption_reasons(None, cfg) == ["caption_empty"]
    assert caption_reasons("https://example.com/img/1.jpg", cfg) == ["caption_url_only", "caption_too_short"]
    for text in dc.BOILERPLATE_CAPTIONS:
        assert "caption_boilerplate" in caption_reasons(text, cfg), text
    assert caption_reasons("a  red\tcircle", cfg) == []  # whitespace runs count as one separator
    assert caption_reasons("cat", cfg) == ["caption_too_short"]
    assert caption_reasons("word " * 129, cfg) == ["caption_too_long"]
    with pytest.raises(ValueError, match="min_words <= max_words"):
        CaptionFilter(min_words=5, max_words=2)
    with pytest.raises(ValueError, match="keep_fraction"):
        ClipScoreFilter(mode="percentile", keep_fraction=0.0)


def test_size_and_aspect_use_the_original_size_and_every_reason_is_kept():
    base = {"status": "success", "caption": "a red circle on a blue background", "score_error": None,
            "clip_score": 0.9, "unsafe_margin": -0.1, "unsafe_concept": "x", "width": 64, "height": 64}
    rows = [
        {**base, "original_width": 640, "original_height": 480},
        {**base, "original_width": 8, "original_height": 8},  # upscaled to 64 by ingest: still too small
        {**base, "original_width": 900, "original_height": 200, "caption": ""},
        {**base, "original_width": None, "original_height": None, "status": "failed_to_download"},
        {**base, "original_width": 640, "original_height": 480, "clip_score": None, "score_error": "OSError: x"},
    ]
    table = pa.Table.from_pylist(rows, pa.schema([
        ("status", pa.string()), ("caption", pa.string()), ("score_error", pa.string()), ("clip_score", pa.float32()),
        ("unsafe_margin", pa.float32()), ("unsafe_concept", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("original_width", pa.int32()), ("original_height", pa.int32())]))
    config = SelectConfig(size=SizeFilter(min_side=32), aspect=AspectFilter(max_ratio=3.0))
    out = per_sample_decisions(table, config).to_pylist()
    assert [r["reasons"] for r in out] == [[], ["too_small"], ["bad_aspect_ratio", "caption_empty"],
                                           ["download_failed_to_download"], ["undecodable"]]
    assert [r["filter"] for r in out] == [None, "min_size", "aspect_ratio", "download", "decode"]
    assert [r["detail"] for r in out][1:] == ["8x8 < 32", "4.50 > 3.0", "failed_to_download", "OSError: x"]
    assert [r["alive"] for r in out] == [True, False, False, False, False]
    off = SelectConfig(size=SizeFilter(enabled=False), aspect=AspectFilter(enabled=False),
                       caption=CaptionFilter(enabled=False))
    assert [r["reasons"] for r in per_sample_decisions(table, off).to_pylist()][:3] == [[], [], []]


def test_candidate_pairs_within_a_list_name_the_smaller_key_as_original():
    emb = np.array([[1, 0], [0.999, 0.0447], [0, 1], [0.9995, 0.0316], [0.998, -0.06]], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keys = np.array(["b", "a", "c", "d", "0"])
    member = np.array([True, True, True, True, False])  # the last row probes this list from its own
    pairs = pairs_above(emb, keys, member, 0.99)
    found = sorted((keys[a], keys[b]) for a, b in zip(pairs.a, pairs.b))
    # member pairs once each, the probing row against members only; a: the smaller key
    assert found == [("0", "a"), ("0", "b"), ("0", "d"), ("a", "b"), ("a", "d"), ("b", "d")]
    assert np.allclose(pairs.cos, [emb[a] @ emb[b] for a, b in zip(pairs.a, pairs.b)])
    blocked = pairs_above(emb, keys, member, 0.99, block=1)
    assert sorted(zip(keys[blocked.a], keys[blocked.b])) == found  # blocks agree
    dups, firsts = exact_duplicates(pa.array(["x", "y", "x", "x", None]), pa.array(["3", "1", "2", "5", "4"]))
    assert sorted(zip(dups.tolist(), firsts.tolist())) == [(0, 2), (3, 2)]  # the first by key (2: "2") stays


def test_pixel_check_tells_a_shifted_copy_from_a_look_alike():
    """The demo's junk: a copy shifted by 1-2 px and re-encoded; a look-alike: another shape in the same
    place on the same background (the tiny CLIP puts them at cosine 0.99, 8x8 thumbnails 1.5 apart)."""
    def ingested(image):
        return np.asarray(Image.open(io.BytesIO(_as_ingested(dc.encode(image, "jpg"))[0])).convert("RGB"))

    scene = dc.Scene("gray", (dc.Shape("circle", "green", "top"),))
    other = dc.Scene("gray", (dc.Shape("cross", "green", "top"),))
    original = ingested(dc.render(scene, 64))
    copies = [ingested(dc.render(scene, 64).crop((dx, dy, 64, 64)).resize((64, 64))) for dx in (1, 2) for dy in (1, 2)]
    look_alike = ingested(dc.render(other, 64))
    changed = changed_pixels(np.stack([original] * 5), np.stack(copies + [look_alike]))
    print(f"\nchanged pixels: shifted copies {changed[:4].tolist()}, look-alike {changed[4]}")
    assert max(changed[:4]) <= NearDupFilter().max_changed_pixels < changed[4]


def test_radix_counts_find_the_exact_cut_with_ties():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.3, 0.05, 5000), np.full(40, 0.25), -rng.random(300)]).astype(np.float32)
    shards = np.array_split(rng.permutation(scores), 7)
    order = np.sort(scores)[::-1]
    for n_keep in (1, 17, 2500, 4700, len(scores)):
        cut = RankCut()
        for part in shards:
            cut.add(hi_counts(part))
        hi, above = cut.locate(n_keep)
        lo_cut = RankCut()
        for part in shards:
            lo_cut.add(lo_counts(part, hi))
        lo, _ = lo_cut.locate(n_keep - above)
        assert cut_value(hi, lo) == order[n_keep - 1], n_keep
    assert np.all(np.diff(ordered_bits(np.sort(scores)).astype(np.int64)) >= 0)


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
    # Clean rows removed as "near duplicates" of a different picture: the pixel check's misses.
    false = false_near_duplicates(rows)
    clean = sum(r["junk"] == "clean" for r in rows)
    print(f"clean rows wrongly removed as near duplicates: {len(false)} of {clean}")
    assert len(false) <= 0.01 * clean


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


def test_selection_does_not_depend_on_shards_or_lists(scored, selected, tmp_path):
    """Resharded rows (7 shards of 30 instead of 4 of 50) and an index of many small lists (16 rows
    each instead of one list) give the same decision, reason and kept copy for every row."""
    root, _, config, _ = scored
    _, _, _, rows = selected
    reshard(root, tmp_path, 30, config)
    small_lists = dataclasses.replace(DEMO_SELECT, near_dup=dataclasses.replace(DEMO_SELECT.near_dup, rows_per_list=16))
    manifest = select(tmp_path / "ingest", tmp_path / "scores", tmp_path / "curate", small_lists)
    again = {r["key"]: r for r in read_decisions(tmp_path / "curate").to_pylist()}
    assert len(manifest["shards"]) == 7 and manifest["dedup"]["alive"] > 100
    fields = ("decision", "filter", "reason", "reasons", "duplicate_of")
    assert [{f: r[f] for f in fields} for r in rows] == [{f: again[r["key"]][f] for f in fields} for r in rows]


def test_classifier_heads_filter_from_stored_embeddings(scored, clip_dir, tmp_path):
    """Heads the test fits on separately generated demo scenes: an "unsafe" stand-in (black background,
    logistic) and an "aesthetic" stand-in (background brightness on LAION's 1-10 scale, linear); both
    run on the stored embeddings, so selection with them never loads CLIP. (At max_score 0.5 the unsafe
    head also flagged two blue crosses on brown, at 0.55: a head's threshold is tuned like any other.)"""
    from pipelines.heads import HeadFileInvalid, HeadFileMissing, fit_linear_head, load_head, save_head

    root, truth, config, score_manifest = scored
    rng = random.Random(5)
    scenes = [dc.random_scene(rng) for _ in range(400)]
    images = [Image.open(io.BytesIO(_as_ingested(dc.encode(dc.render(s, 64), "png"))[0])) for s in scenes]
    emb = Clip(config.clip).encode_images(images).numpy()
    black = np.array([s.background == "black" for s in scenes], float)
    brightness = np.array([_brightness(s.background) for s in scenes])
    clip_record = score_manifest["clip"]
    unsafe_head = save_head(tmp_path / "unsafe.safetensors", fit_linear_head(emb, black, kind="logistic", l2=1e-4),
                            output="sigmoid", clip=clip_record)
    aesthetic_head = save_head(tmp_path / "aesthetic.safetensors",
                               fit_linear_head(emb, brightness, kind="regression", l2=1e-4), clip=clip_record)
    assert load_head(unsafe_head).output == "sigmoid" and load_head(aesthetic_head).embed_dim == emb.shape[1]
    from pipelines.curate import AestheticFilter, UnsafeClassifierFilter

    with_heads = dataclasses.replace(
        DEMO_SELECT, unsafe_classifier=UnsafeClassifierFilter(enabled=True, head=str(unsafe_head), max_score=0.7),
        aesthetic=AestheticFilter(enabled=True, head=str(aesthetic_head), min_score=4.5))
    select(root / "ingest", root / "scores", tmp_path / "heads", with_heads)
    rows = with_truth(read_decisions(tmp_path / "heads"), truth)
    # the junk kind "tiny" (8x8 upscaled, a blur) is no scene the heads were fitted on
    judged = [r for r in rows if r["unsafe_score"] is not None and r["junk"] != "tiny" and r["scene_caption"]]
    background = {r["key"]: r["scene_caption"].rsplit(" on a", 1)[1].split()[-2] for r in judged}
    flagged = [r for r in judged if "unsafe_classifier" in r["reasons"]]
    on_black = [r for r in judged if background[r["key"]] == "black"]
    hits = [r for r in flagged if background[r["key"]] == "black"]
    # the first failing filter names the row: judge the aesthetic head on rows the unsafe head let pass
    low = [r for r in judged if "low_aesthetic" in r["reasons"]]
    darker = [r for r in low if _brightness(background[r["key"]]) < _brightness("gray")]
    darkest = [r for r in judged if _brightness(background[r["key"]]) < 4.0 and "unsafe_classifier" not in r["reasons"]]
    print(f"\nunsafe head: flagged {len(flagged)}, {len(hits)} on black of {len(on_black)}; aesthetic head "
          f"(min 4.5): rejected {len(low)}, {len(darker)} darker than gray; of {len(darkest)} blue/purple rows "
          f"{sum('low_aesthetic' in r['reasons'] for r in darkest)} rejected; flagged off black: "
          f"{[(r['junk'], r['scene_caption'], round(r['unsafe_score'], 2)) for r in flagged if r not in hits]}")
    assert len(hits) >= 0.9 * len(flagged) and len(hits) >= 0.85 * len(on_black) > 0
    assert len(darker) >= 0.9 * len(low) > 0
    assert sum("low_aesthetic" in r["reasons"] for r in darkest) >= 0.9 * len(darkest)
    assert all(r["aesthetic_score"] is not None for r in judged)
    # A missing head file is named before any work starts; a head of another CLIP is refused.
    missing = dataclasses.replace(DEMO_SELECT, aesthetic=AestheticFilter(enabled=True, head=str(tmp_path / "no.safetensors")))
    with pytest.raises(HeadFileMissing, match="aesthetic head file .*no.safetensors does not exist"):
        select(root / "ingest", root / "scores", tmp_path / "missing", missing)
    assert not (tmp_path / "missing").exists()
    other = save_head(tmp_path / "other.safetensors", fit_linear_head(emb, brightness, kind="regression"),
                      clip={"model_name": "ViT-B-32", "pretrained": "openai"})
    with pytest.raises(HeadFileInvalid, match="was trained on CLIP .*ViT-B-32"):
        select(root / "ingest", root / "scores", tmp_path / "other",
               dataclasses.replace(DEMO_SELECT, aesthetic=AestheticFilter(enabled=True, head=str(other))))


@pytest.mark.slow
def test_near_duplicates_at_the_demo_size(ray_session, clip_dir, tmp_path):
    """The demo's corpus size (480 rows, seed 0): with the index, pixel check and the demo values this
    module recommends (cosine 0.85, thumbnail pre-check 8.0), every planted exact and shifted copy goes
    and at most 1% of clean rows are removed as copies of another picture; the 8x8-thumbnail check alone
    (the previous confirmation) is printed beside it."""
    paths, truth = demo_corpus(tmp_path / "corpus", 480)
    write_ingest_like(paths, tmp_path / "ingest", rows_per_shard=120)
    config = ScoreConfig(clip=ClipConfig.tiny(clip_dir), unsafe_concepts=STAND_IN_UNSAFE, safe_concepts=STAND_IN_SAFE)
    score(tmp_path / "ingest", tmp_path / "scores", config)
    variants = {
        "index + pixel check": NearDupFilter(threshold=0.85, max_thumbnail_mad=8.0),
        "8x8 thumbnail only": NearDupFilter(threshold=0.9, max_thumbnail_mad=3.0, max_changed_pixels=None),
    }
    results = {}
    for name, near in variants.items():
        out = tmp_path / name.replace(" ", "_")
        select(tmp_path / "ingest", tmp_path / "scores", out, dataclasses.replace(DEMO_SELECT, near_dup=near),
               search_index=None)
        rows = with_truth(read_decisions(out), truth)
        kept = {r["row"] for r in rows if r["decision"] == "keep"}
        missed = [r["row"] for r in rows if r["junk"] in ("exact_duplicate", "near_duplicate")
                  and r["row"] in kept and r["source_row"] in kept]
        clean = sum(r["junk"] == "clean" for r in rows)
        results[name] = (missed, len(false_near_duplicates(rows)), clean)
        print(f"\n{name}: copies kept beside their source {missed}; clean rows removed as copies "
              f"{results[name][1]} of {clean}")
    missed, false, clean = results["index + pixel check"]
    assert missed == [] and false <= 0.01 * clean


# -- the scoring pipeline's two stages ----------------------------------------------------------------------
def test_model_actors_receive_pixels_never_image_bytes(ray_session, clip_dir, tmp_path):
    """Decoding and CLIP preprocessing run in the CPU decode tasks: what each model actor's __call__ gets is
    pixel tensors (one forward pass each) with row numbers and captions, never image bytes. The shards it writes
    equal the one-process scorer's (same CLIP, same threads)."""
    from pipelines.curate import ClipScorer, DecodeConfig, ShardScorer, _score_pending, shard_path
    from pipelines.step import ActorPoolConfig

    paths, _ = demo_corpus(tmp_path / "corpus", 50, seed=4)
    ingest = write_ingest_like(paths, tmp_path / "ingest", rows_per_shard=20)
    seen = tmp_path / "seen"
    seen.mkdir()

    class Recording(ClipScorer):
        def __init__(self, *args, **kwargs):
            import os

            import pipelines.curate as in_actor

            def no_decoding_here(data):  # decoding in this process would be counted, and fail the shard
                with open(seen / f"decoded_in_actor_{os.getpid()}", "a") as f:
                    f.write("x")
                raise AssertionError("decode_image called in a model actor")

            in_actor.decode_image = no_decoding_here
            super().__init__(*args, **kwargs)

        def __call__(self, batch):
            import os

            import numpy as np

            record = {k: [str(v.dtype), list(v.shape),
                          bool(v.dtype == object and any(isinstance(x, bytes) for x in v.ravel()))]
                      for k, v in batch.items()}
            with open(seen / f"{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            assert not any(np.asarray(v).dtype.kind == "S" for v in batch.values())
            return super().__call__(batch)

    config = ScoreConfig(clip=ClipConfig.tiny(clip_dir, batch_size=8), unsafe_concepts=STAND_IN_UNSAFE,
                         safe_concepts=STAND_IN_SAFE)
    step = StepDir.open(tmp_path / "scores", "curate_score", config, [ingest["key"]])
    shard_ids = [s["shard_id"] for s in ingest["shards"]]
    _score_pending(storage_path(tmp_path / "ingest"), step, config, shard_ids, ActorPoolConfig(size=2),
                   DecodeConfig(num_cpus=0.5), scorer_cls=Recording)
    calls = [json.loads(line) for f in seen.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert not list(seen.glob("decoded_in_actor_*"))
    assert calls and all(step.is_done(s) for s in shard_ids)
    for call in calls:
        assert "image" not in call and not any(bytes_ for _, _, bytes_ in call.values())
        assert call["pixels"][:2] == ["uint8", [1, 8, 32, 32, 3]]  # (calls, batch_size, H, W, C): decoded
    one_process = ShardScorer(config, str(tmp_path / "ingest"), step, torch_threads=1)
    for shard_id in shard_ids:
        expected = one_process.score_shard(shard_path(tmp_path / "ingest", shard_id))
        assert pq.read_table(str(shard_path(tmp_path / "scores", shard_id))).equals(expected)
        assert expected.num_rows == 20 or shard_id == shard_ids[-1]


def storage_path(p):
    from pipelines import storage

    return storage.path(p)


def test_pool_and_decode_resources_flow_from_the_pipeline_config(monkeypatch):
    """`--set curate.pool.num_gpus=0.5` and friends reach the Ray Data calls: the decode tasks' CPUs, the model
    actors' CPUs, GPUs (fractional) and pool size."""
    import ray

    import pipelines.curate as curate_mod
    from pipelines.pipeline_config import load_pipeline_config

    root = pathlib.Path(__file__).resolve().parents[1]
    config = load_pipeline_config(str(root / "cluster" / "run" / "paper.toml"), [
        "run_dir=/tmp/imagen-config-test", "curate.pool.num_gpus=0.5", "curate.pool.num_cpus=0.25",
        "curate.pool.size=3", "curate.decode.num_cpus=1.5", "curate.score.clip.batch_size=16"])
    assert (config.curate.pool.num_gpus, config.curate.pool.num_cpus, config.curate.decode.num_cpus) == (0.5, 0.25, 1.5)
    paper = load_pipeline_config(str(root / "cluster" / "run" / "paper.toml"))
    assert paper.curate.pool.num_gpus > 0 and paper.curate.score.clip.device == "cuda"
    assert paper.embed.pool.num_gpus > 0 and paper.embed.device == "cuda"

    calls = []

    class Recorder:
        context = types.SimpleNamespace()

        def map_batches(self, fn, **kwargs):
            calls.append((fn, kwargs))
            return self

    monkeypatch.setattr(ray.data, "from_items", lambda items, **kw: calls.append((items, kw)) or Recorder())
    monkeypatch.setattr(curate_mod, "clip_preprocess", lambda clip: "the CLIP transform")
    curate_mod.scoring_dataset(storage_path("/tmp/ingest"), config.curate.score, ["00000", "00001"],
                               config.curate.pool, config.curate.decode)
    (items, source), (decode_fn, decode), (actor, model) = calls
    assert source["override_num_blocks"] == 2 and len(items) == 2  # one decode task per shard
    assert decode["num_cpus"] == 1.5 and "compute" not in decode  # tasks, not actors
    assert decode["ray_remote_args_fn"]() == {"num_cpus": 1.5}  # (and never fused into the actors)
    assert decode["fn_kwargs"]["preprocess"] == "the CLIP transform" and decode["fn_kwargs"]["batch_size"] == 16
    assert actor is curate_mod.ClipScorer
    assert (model["num_cpus"], model["num_gpus"]) == (0.25, 0.5)
    assert isinstance(model["compute"], ray.data.ActorPoolStrategy) and model["compute"].max_size == 3
    assert Recorder.context.wait_for_min_actors_s == config.curate.pool.start_timeout_s  # actors first, bounded


def test_an_actor_pool_the_cluster_cannot_place_fails_before_reading_input(ray_session, clip_dir, tmp_path):
    """Actors asking for GPUs this Ray lacks: scoring fails after the pool's start timeout, before any shard is
    decoded or written, instead of waiting for ever."""
    import ray

    from pipelines.curate import DecodeConfig
    from pipelines.step import ActorPoolConfig

    paths, _ = demo_corpus(tmp_path / "corpus", 20, seed=5)
    write_ingest_like(paths, tmp_path / "ingest", rows_per_shard=20)
    config = ScoreConfig(clip=ClipConfig.tiny(clip_dir, batch_size=8), unsafe_concepts=STAND_IN_UNSAFE,
                         safe_concepts=STAND_IN_SAFE)
    with pytest.raises(RuntimeError, match=r"curate\.pool .* did not start within curate\.pool\.start_timeout_s=2"
                       r".*lacks those resources") as failed:
        score(tmp_path / "ingest", tmp_path / "scores", config, ActorPoolConfig(num_gpus=1, start_timeout_s=2),
              DecodeConfig())
    assert isinstance(failed.value.__cause__, ray.exceptions.GetTimeoutError)
    assert not list((tmp_path / "scores").glob("shards/*.parquet"))
    assert not (tmp_path / "scores" / "manifest.json").exists()


# -- bad input to selection: a clear error before work, or a recorded reason; nothing silently dropped ----------
@pytest.mark.parametrize("make, message", [
    (lambda: SizeFilter(min_side=-1), "SizeFilter.min_side must be >= 0"),
    (lambda: ClipScoreFilter(min_score=1.5), r"ClipScoreFilter.min_score is a cosine, in \[-1, 1\]"),
    (lambda: ClipScoreFilter(mode="percentile", keep_fraction=0.0), r"keep_fraction must be in \(0, 1\]"),
    (lambda: NearDupFilter(threshold=1.0), r"NearDupFilter.threshold must be in \(-1, 1\)"),
    (lambda: UnsafeFilter(margin=3.0), r"UnsafeFilter.margin .* in \[-2, 2\]"),
    (lambda: AestheticFilter(enabled=True, head="h.safetensors", min_score=float("nan")), "must be a finite"),
    (lambda: AspectFilter(max_ratio=0.5), "AspectFilter.max_ratio must be >= 1"),
])
def test_a_threshold_outside_its_range_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _copy_step_dirs(root: pathlib.Path, to: pathlib.Path) -> pathlib.Path:
    for name in ("ingest", "scores"):
        shutil.copytree(root / name, to / name)
    return to


def test_bad_score_shards_and_an_empty_ingest_fail_before_work_or_are_recorded(scored, tmp_path):
    root, _, _, _ = scored
    # a score shard without its embedding column: named with what to do, before any selection task runs
    bad = _copy_step_dirs(root, tmp_path / "no_embedding")
    first = bad / "scores" / "shards" / "00000.parquet"
    pq.write_table(pq.read_table(first).drop_columns(["image_embedding"]), first)
    with pytest.raises(ValueError, match=r"score shard 00000 .* lacks the column\(s\) \['image_embedding'\].*rerun "
                                         "scoring"):
        select(bad / "ingest", bad / "scores", bad / "curate", DEMO_SELECT)
    assert not (bad / "curate").exists()
    # the same in a later shard: the shard's task fails with the message (the other shards' work is kept)
    late = _copy_step_dirs(root, tmp_path / "late")
    last = sorted((late / "scores" / "shards").glob("*.parquet"))[-1]
    pq.write_table(pq.read_table(last).drop_columns(["image_embedding"]), last)
    with pytest.raises(Exception, match=f"score shard {last.stem} .* lacks the column"):
        select(late / "ingest", late / "scores", late / "curate", DEMO_SELECT)
    assert not (late / "curate" / "manifest.json").exists()

    # NaN scores of downloaded images: each such row is rejected with a recorded reason and detail, none lost
    nan = _copy_step_dirs(root, tmp_path / "nan")
    shard = nan / "scores" / "shards" / "00000.parquet"
    table = pq.read_table(shard)
    ingest_rows = pq.read_table(nan / "ingest" / "shards" / "00000.parquet", columns=["key", "status"]).to_pylist()
    fetched = [i for i, r in enumerate(ingest_rows) if r["status"] == "success" and table["score_error"][i].as_py() is None]
    poisoned = fetched[:5]
    values = table["clip_score"].to_numpy(zero_copy_only=False).astype(np.float32)
    values[poisoned] = np.nan
    pq.write_table(table.set_column(table.schema.get_field_index("clip_score"), "clip_score",
                                    pa.array(values, pa.float32())), shard)
    select(nan / "ingest", nan / "scores", nan / "curate", DEMO_SELECT)
    decisions = read_decisions(nan / "curate").to_pylist()
    assert len(decisions) == sum(pq.read_metadata(p).num_rows for p in (nan / "ingest" / "shards").glob("*.parquet"))
    keys = {ingest_rows[i]["key"] for i in poisoned}
    got = [r for r in decisions if r["key"] in keys]
    assert len(got) == 5 and all(r["decision"] == "reject" and r["reason"] == "undecodable" for r in got), got
    assert all(r["detail"] == "not scored" for r in got), got

    # an ingest step with no shards: a clear error, nothing written
    empty = _copy_step_dirs(root, tmp_path / "empty")
    manifest = json.loads((empty / "ingest" / "manifest.json").read_text())
    (empty / "ingest" / "manifest.json").write_text(json.dumps({**manifest, "shards": []}))
    with pytest.raises(ValueError, match="nothing to select: the ingest step .* has no shards"):
        select(empty / "ingest", empty / "scores", empty / "curate", DEMO_SELECT)
    assert not (empty / "curate").exists()


DRIVER_PEAK = r"""
import json, sys, tracemalloc
import pyarrow as pa
from pipelines.curate import ClipScoreFilter, SelectConfig, select
from pipelines.ray_env import RayConfig, init_ray

init_ray(RayConfig(num_cpus=2))  # started before the measurement
tracemalloc.start()  # numpy's and Python's allocations; Arrow's own pool is read beside it
config = SelectConfig(clip_score=ClipScoreFilter(mode="percentile", keep_fraction=0.8))
manifest = select(sys.argv[1] + "/ingest", sys.argv[1] + "/scores", sys.argv[2], config, search_index=None)
print(json.dumps({"peak": tracemalloc.get_traced_memory()[1] + pa.default_memory_pool().max_memory(),
                  "funnel": manifest["funnel"]}))
"""


@pytest.mark.slow
def test_selection_driver_allocates_a_small_fraction_of_the_rows(tmp_path):
    """Percentile selection, exact and near dedup over 200,000 synthetic rows (the benchmark's generator: 64-wide
    embeddings, thumbnails, planted copies) in a fresh driver process: what the driver allocates during `select`
    is under an eighth of the rows' embeddings and thumbnails, which stay in the Ray tasks. (Measured the same
    way: 5.96 MB at 50,000 rows, 5.98 at 200,000, 6.06 at 800,000.)"""
    import subprocess
    import sys

    from pipelines.curate import THUMB

    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    from bench_curate import DIM, generate

    rows = 200_000
    generate(tmp_path / "data", rows, rows_per_shard=25_000)
    done = subprocess.run([sys.executable, "-c", DRIVER_PEAK, str(tmp_path / "data"), str(tmp_path / "out")], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    funnel = measured["funnel"]
    assert funnel["input"] == rows and sum(s["removed"] for s in funnel["stages"]) + funnel["kept"] == rows
    removed = {s["filter"]: s["removed"] for s in funnel["stages"]}
    assert removed["exact_duplicate"] > 0 and removed["near_duplicate"] > 0, removed  # both dedup stages ran
    row_bytes = rows * (DIM * 2 + THUMB * THUMB * 3)  # fp16 embeddings + 8x8 RGB thumbnails: 64 MB
    assert measured["peak"] < row_bytes / 8, (measured["peak"], row_bytes)
