"""The demo corpus is deterministic, labels its junk truthfully, and the local server behaves."""
import collections
import http.client
import io
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.demo.corpus import (
    JUNK_KINDS,
    DemoCorpusConfig,
    Scene,
    Shape,
    serve_directory,
    write_demo_corpus,
)

BASE = "http://127.0.0.1:1"  # the files do not depend on it; the URL list does


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_corpus_other_seed_other_corpus(tmp_path):
    config = DemoCorpusConfig(num_images=40, seed=3)
    a = write_demo_corpus(config, tmp_path / "a", BASE)
    b = write_demo_corpus(config, tmp_path / "b", BASE)
    c = write_demo_corpus(DemoCorpusConfig(num_images=40, seed=4), tmp_path / "c", BASE)
    assert _files(a.root) == _files(b.root)
    assert pq.read_table(a.url_list).equals(pq.read_table(b.url_list))
    assert pq.read_table(a.ground_truth).equals(pq.read_table(b.ground_truth))
    assert pq.read_table(a.url_list)["caption"].to_pylist() != pq.read_table(c.url_list)["caption"].to_pylist()


def test_ground_truth_labels_every_row_truthfully(tmp_path):
    config = DemoCorpusConfig(num_images=100, seed=0)
    paths = write_demo_corpus(config, tmp_path, BASE)
    rows = pq.read_table(paths.ground_truth).to_pylist()
    assert pq.read_table(paths.url_list).column_names == ["url", "caption"]
    counts = collections.Counter(r["junk"] for r in rows)
    assert counts == {"clean": config.clean_count(), **{k: n for k, n in config.junk_counts().items() if n}}
    assert set(counts) == {"clean", *JUNK_KINDS}  # every kind present at the default fractions
    for r in rows:
        file = paths.root / r["path"]
        if r["junk"] == "clean":
            scene = Scene(r["background"], tuple(Shape(**s) for s in r["shapes"]))
            assert r["caption"] == scene.caption() == r["scene_caption"]
            assert Image.open(file).size == (64, 64)
        elif r["junk"] == "exact_duplicate":
            assert file.read_bytes() == (paths.root / rows[r["source_row"]]["path"]).read_bytes()
            assert r["url"] != rows[r["source_row"]]["url"]
        elif r["junk"] == "near_duplicate":
            assert file.read_bytes() != (paths.root / rows[r["source_row"]]["path"]).read_bytes()
            assert Image.open(file).format == "JPEG"
        elif r["junk"] == "tiny":
            assert Image.open(file).size == (8, 8)
        elif r["junk"] in ("truncated", "non_image"):
            with pytest.raises(OSError):
                Image.open(file).load()
        elif r["junk"] == "mismatched_caption":
            assert r["caption"] == rows[r["caption_source_row"]]["caption"] != r["scene_caption"]
        elif r["junk"] == "missing":
            assert not file.exists()
        elif r["junk"] == "empty_caption":
            assert r["caption"] == ""
        elif r["junk"] == "url_caption":
            assert r["caption"] == r["url"]
        elif r["junk"] == "opt_out":
            assert r["path"].startswith("optout/")


def test_captions_name_colours_shapes_positions():
    scene = Scene("blue", (Shape("circle", "red", "top left"), Shape("star", "orange", "center")))
    assert scene.caption() == "a red circle at the top left and an orange star in the center on a blue background"


def test_config_refuses_junk_that_leaves_no_clean_row():
    with pytest.raises(ValueError, match="no clean image"):
        DemoCorpusConfig(num_images=10, tiny_fraction=0.5, missing_fraction=0.5)
    with pytest.raises(ValueError, match="tiny_fraction"):
        DemoCorpusConfig(tiny_fraction=-0.1)


def test_server_serves_files_404s_opt_out_header_and_redirects(tmp_path):
    with serve_directory(tmp_path / "www") as server:
        paths = write_demo_corpus(DemoCorpusConfig(num_images=40), tmp_path, server.base_url)
        rows = {r["junk"]: r for r in pq.read_table(paths.ground_truth).to_pylist()}
        clean = rows["clean"]
        with urllib.request.urlopen(clean["url"]) as response:
            assert response.headers["Content-Type"] == "image/png"
            assert response.headers.get("X-Robots-Tag") is None
            assert Image.open(io.BytesIO(response.read())).size == (64, 64)
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(rows["missing"]["url"])
        assert missing.value.code == 404
        with urllib.request.urlopen(rows["opt_out"]["url"]) as response:
            assert response.headers["X-Robots-Tag"] == "noai"
        port = int(server.base_url.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/redirect?to=http://example.invalid/x.png")
        response = connection.getresponse()
        assert (response.status, response.headers["Location"]) == (302, "http://example.invalid/x.png")
        connection.close()
        with pytest.raises(urllib.error.HTTPError) as listing:
            urllib.request.urlopen(server.base_url + "/img/")
        assert listing.value.code == 404
        assert server.requests[0] == "/" + clean["path"]
        assert len(server.requests) == 5
