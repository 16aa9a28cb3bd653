"""The fetch policy and the ingest step, against HTTP servers on 127.0.0.1 only.

Fast tests exercise the policy through `fetch`/`download_image` (the function img2dataset's downloader
calls); slow ones run the whole step on Ray: the demo corpus, the policy inside the step, kill -9 + resume.
"""
import collections
import contextlib
import hashlib
import io
import ipaddress
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.error
from urllib.parse import quote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.demo.corpus import DemoCorpusConfig, serve_directory, write_demo_corpus
from pipelines.fetch_policy import (
    FetchPolicyConfig,
    PolicyRefusal,
    address_refusal,
    download_image,
    fetch,
    refusal_kind,
)
from pipelines.ingest import OUTPUT_SCHEMA, IngestConfig, normalise, read_output, run_ingest
from pipelines.ray_env import RayConfig, init_ray
from pipelines.url_lists import UrlListConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
LOOPBACK_OK = FetchPolicyConfig(allow_loopback=True, timeout_s=5)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    with serve_directory(root / "www") as server:
        paths = write_demo_corpus(DemoCorpusConfig(num_images=90, seed=0), root, server.base_url)
        truth = pq.read_table(paths.ground_truth).to_pylist()
        yield server, paths, truth


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


def _first(truth, junk):
    return next(r for r in truth if r["junk"] == junk)


# -- the policy, fast ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "policy", "refused"),
    [
        ("127.0.0.1", {}, "loopback"),
        ("::1", {}, "loopback"),
        ("::ffff:127.0.0.1", {}, "loopback"),
        ("127.0.0.1", {"allow_loopback": True}, None),
        ("10.0.0.1", {}, "private"),
        ("192.168.1.1", {"allow_loopback": True}, "private"),
        ("10.0.0.1", {"allow_private": True}, None),
        ("100.64.0.1", {}, "private"),  # carrier-grade NAT: not global
        ("169.254.169.254", {"allow_private": True, "allow_loopback": True}, "link-local"),
        ("224.0.0.1", {}, "multicast"),
        ("0.0.0.0", {}, "unspecified"),
        ("240.0.0.1", {}, "reserved"),
        ("93.184.215.14", {}, None),
        ("93.184.215.14", {"blocked_networks": ("93.184.0.0/16",)}, "in blocked network 93.184.0.0/16"),
        ("127.0.0.2", {"allow_loopback": True, "blocked_networks": ("127.0.0.2/32",)}, "in blocked network"),
    ],
)
def test_address_categories(address, policy, refused):
    reason = address_refusal(ipaddress.ip_address(address), FetchPolicyConfig(**policy))
    assert reason == refused if refused is None else refused in reason


def test_default_policy_refuses_loopback_before_connecting(demo):
    server, _, truth = demo
    url = _first(truth, "clean")["url"]
    before = len(server.requests)
    for candidate in (url, url.replace("127.0.0.1", "localhost"), url.replace("http://", "https://")):
        with pytest.raises(PolicyRefusal) as refused:
            fetch(candidate, FetchPolicyConfig())
        assert refused.value.kind == "blocked_address" and "(loopback)" in str(refused.value)
    assert len(server.requests) == before  # the server never saw a request


def test_allow_loopback_downloads_the_same_url(demo):
    server, paths, truth = demo
    row = _first(truth, "clean")
    assert fetch(row["url"], LOOPBACK_OK) == (paths.root / row["path"]).read_bytes()


def test_redirect_to_the_metadata_address_is_refused_without_connecting(demo):
    server, _, _ = demo
    started = time.monotonic()
    with pytest.raises(PolicyRefusal) as refused:
        fetch(f"{server.base_url}/redirect?to=http://169.254.169.254/latest/meta-data/", LOOPBACK_OK)
    assert refused.value.kind == "redirect" and "169.254.169.254 (link-local)" in str(refused.value)
    assert time.monotonic() - started < 2  # a connection attempt there would hang until the 5 s timeout


def test_redirect_to_a_blocked_server_never_reaches_it(demo):
    server, paths, truth = demo
    path = _first(truth, "clean")["path"]
    with serve_directory(paths.root, host="127.0.0.2") as target:  # the "internal" server
        redirect = f"{server.base_url}/redirect?to={quote(f'{target.base_url}/{path}')}"
        blocked = FetchPolicyConfig(allow_loopback=True, blocked_networks=("127.0.0.2/32",), timeout_s=5)
        with pytest.raises(PolicyRefusal) as refused:
            fetch(redirect, blocked)
        assert refused.value.kind == "redirect" and "in blocked network 127.0.0.2/32" in str(refused.value)
        with pytest.raises(PolicyRefusal, match="blocked_address"):
            fetch(f"{target.base_url}/{path}", blocked)
        assert target.requests == []  # neither the redirect nor the direct URL reached it
        assert fetch(redirect, LOOPBACK_OK) == (paths.root / path).read_bytes()  # reachable when allowed
        assert target.requests == [f"/{path}"]


def test_opt_out_header_is_honoured_by_default(demo):
    _, paths, truth = demo
    row = _first(truth, "opt_out")
    with pytest.raises(PolicyRefusal) as refused:
        fetch(row["url"], LOOPBACK_OK)
    assert refused.value.kind == "opt_out" and "X-Robots-Tag: noai" in str(refused.value)
    not_honoured = FetchPolicyConfig(allow_loopback=True, honour_opt_out=False)
    assert fetch(row["url"], not_honoured) == (paths.root / row["path"]).read_bytes()


def test_schemes_sizes_and_slow_servers(demo):
    server, _, truth = demo
    url = _first(truth, "clean")["url"]
    with pytest.raises(PolicyRefusal, match=r"\(scheme\)"):
        fetch("file:///etc/passwd", LOOPBACK_OK)
    with pytest.raises(PolicyRefusal, match=r"\(too_many_bytes\)"):
        fetch(url, FetchPolicyConfig(allow_loopback=True, max_image_bytes=100))
    with pytest.raises(PolicyRefusal, match=r"\(too_many_pixels\): .* is 64x64"):
        fetch(url, FetchPolicyConfig(allow_loopback=True, max_image_pixels=1000))
    started = time.monotonic()
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        fetch(url + "?delay=3", FetchPolicyConfig(allow_loopback=True, timeout_s=0.3))
    assert time.monotonic() - started < 2


def test_download_image_keeps_img2dataset_contract(demo):
    _, _, truth = demo
    key, stream, error = download_image((7, _first(truth, "clean")["url"]), 5, None, ["noai"], policy=LOOPBACK_OK)
    assert (key, error) == (7, None) and Image.open(stream).size == (64, 64)
    key, stream, error = download_image((8, _first(truth, "opt_out")["url"]), 5, None, ["noai"], policy=LOOPBACK_OK)
    assert (key, stream) == (8, None) and error.startswith("refused by fetch policy (opt_out)")
    key, stream, error = download_image((9, _first(truth, "missing")["url"]), 5, None, None, policy=LOOPBACK_OK)
    assert (key, stream, error) == (9, None, "HTTP Error 404: File not found")


def test_normalise_keeps_every_input_row():
    inputs = pa.table({"key": ["000", "001", "002"], "url": ["u0", "u1", "u2"], "caption": ["c0", None, "c2"]})
    image = b"\xff\xd8 not really a jpeg"
    raw = pa.table(  # img2dataset's parquet output, which lost row 001
        {
            "url": ["u2", "u0"],
            "caption": ["c2", "c0"],
            "row_key": ["002", "000"],
            "key": ["00000002", "00000000"],
            "status": ["failed_to_download", "success"],
            "error_message": ["refused by fetch policy (opt_out): u2 ...", None],
            **{c: pa.array([None, 64], pa.int32()) for c in ("width", "height", "original_width", "original_height")},
            "jpg": pa.array([None, image], pa.binary()),
        }
    )
    table = normalise(inputs, raw, "jpg")
    assert table.schema == OUTPUT_SCHEMA
    assert table["key"].to_pylist() == ["000", "001", "002"]
    assert table["status"].to_pylist() == ["success", "failed_internal", "refused"]
    assert table["sha256"].to_pylist() == [hashlib.sha256(image).hexdigest(), None, None]
    assert table["error"][0].as_py() is None and "no result" in table["error"][1].as_py()


def test_ingest_config_checks(tmp_path):
    urls = UrlListConfig(paths=(str(tmp_path / "x.parquet"),))
    with pytest.raises(ValueError, match="rows_per_shard"):
        IngestConfig(url_list=urls, output_dir=str(tmp_path), rows_per_shard=0)
    with pytest.raises(ValueError, match=r"encode_quality for png must be in \[0, 9\]"):
        IngestConfig(url_list=urls, output_dir=str(tmp_path), encode_format="png", encode_quality=95)
    with pytest.raises(ValueError, match="blocked_networks"):
        FetchPolicyConfig(blocked_networks=("10.0.0.0/33",))
    config = IngestConfig(url_list=urls, output_dir=tmp_path, rows_per_shard=100, threads_per_shard=10)
    assert config.attempt_timeout_s == 10 * config.policy.timeout_s + 60  # every URL timing out, plus slack


# -- the step on Ray, slow -------------------------------------------------------------------------
EXPECTED = {  # junk kind -> status after ingest (with loopback allowed)
    "clean": "success",
    "exact_duplicate": "success",
    "near_duplicate": "success",
    "tiny": "success",  # tiny images are curate's to filter, with original_width/height kept
    "mismatched_caption": "success",
    "empty_caption": "success",
    "url_caption": "success",
    "boilerplate_caption": "success",
    "missing": "failed_to_download",
    "truncated": "failed_to_decode",
    "non_image": "failed_to_decode",
    "opt_out": "refused",
}


@pytest.mark.slow
def test_demo_ingest_end_to_end(demo, ray_cluster, tmp_path):
    server, paths, truth = demo
    urls = UrlListConfig(paths=(str(paths.url_list),))
    config = dict(url_list=urls, rows_per_shard=40, threads_per_shard=4)

    before = len(server.requests)
    refused = run_ingest(IngestConfig(output_dir=str(tmp_path / "default"), **config))
    assert refused["by_status"] == {"refused": 90} and len(server.requests) == before
    assert refused["failed_by_reason"] == {"refused: blocked_address": 90}
    assert all("(loopback)" in e for e in read_output(tmp_path / "default")["error"].to_pylist())

    out = tmp_path / "allowed"
    manifest = run_ingest(IngestConfig(output_dir=str(out), policy=LOOPBACK_OK, **config))
    print("\ndemo ingest:", json.dumps({k: manifest[k] for k in ("by_status", "failed_by_reason", "timings")}))
    print("shards (id, rows, import_s, download_s, s):")
    print([(s["shard_id"], s["rows"], s["import_s"], s["download_s"], s["seconds"]) for s in manifest["shards"]])
    table = read_output(out)
    assert table.schema == OUTPUT_SCHEMA and table.num_rows == 90 and len(manifest["shards"]) == 3
    rows = table.to_pylist()
    assert [r["url"] for r in rows] == [t["url"] for t in truth]  # every row, in list order, keys unique
    assert len({r["key"] for r in rows}) == 90
    assert [(t["junk"], r["status"]) for t, r in zip(truth, rows) if EXPECTED[t["junk"]] != r["status"]] == []
    for t, r in zip(truth, rows):
        if r["status"] == "success":
            assert r["error"] is None and r["sha256"] == hashlib.sha256(r["image"]).hexdigest()
            assert Image.open(io.BytesIO(r["image"])).size == (64, 64) == (r["width"], r["height"])
            side = 8 if t["junk"] == "tiny" else 64
            assert (r["original_width"], r["original_height"]) == (side, side)
            if t["junk"] == "exact_duplicate":
                assert r["sha256"] == rows[t["source_row"]]["sha256"]
        else:
            assert r["image"] is None and r["sha256"] is None and r["error"]
    errors = collections.Counter((t["junk"], r["error"]) for t, r in zip(truth, rows) if r["error"])
    assert all(e == "HTTP Error 404: File not found" for (junk, e) in errors if junk == "missing")
    assert all(e == "Image decoding error" for (junk, e) in errors if junk in ("truncated", "non_image"))
    assert all("(opt_out)" in e for (junk, e) in errors if junk == "opt_out")
    expected_counts = collections.Counter(EXPECTED[t["junk"]] for t in truth)
    assert manifest["by_status"] == dict(expected_counts) and manifest["input_rows"] == 90

    before = len(server.requests)
    assert run_ingest(IngestConfig(output_dir=str(out), policy=LOOPBACK_OK, **config)) == manifest
    assert len(server.requests) == before  # a finished step downloads nothing


@pytest.mark.slow
def test_policy_is_enforced_inside_the_ingest_step(demo, ray_cluster, tmp_path):
    server, paths, truth = demo
    path = _first(truth, "clean")["path"]
    with serve_directory(paths.root, host="127.0.0.2") as internal:
        urls = [
            f"{server.base_url}/{path}",
            f"{server.base_url}/redirect?to={quote('http://169.254.169.254/latest/meta-data/')}",
            f"{server.base_url}/redirect?to={quote(f'{internal.base_url}/{path}')}",
            f"{internal.base_url}/{path}",
            _first(truth, "opt_out")["url"],
            "file:///etc/passwd",
        ]
        pq.write_table(pa.table({"url": urls, "caption": ["c"] * len(urls)}), tmp_path / "list.parquet")
        policy = FetchPolicyConfig(allow_loopback=True, blocked_networks=("127.0.0.2/32",), timeout_s=5)
        url_list = UrlListConfig(paths=(str(tmp_path / "list.parquet"),))
        config = IngestConfig(url_list=url_list, output_dir=str(tmp_path / "out"), policy=policy)
        run_ingest(config)
        table = read_output(tmp_path / "out")
        assert internal.requests == []
    kinds = [refusal_kind(e) for e in table["error"].to_pylist()]
    assert table["status"].to_pylist() == ["success"] + ["refused"] * 5
    assert kinds == [None, "redirect", "redirect", "blocked_address", "opt_out", "scheme"]


_RUN_SCRIPT = """
import sys
from pipelines.fetch_policy import FetchPolicyConfig
from pipelines.ingest import IngestConfig, run_ingest
from pipelines.ray_env import RayConfig
from pipelines.url_lists import UrlListConfig

url_list, output_dir = sys.argv[1:3]
config = IngestConfig(
    url_list=UrlListConfig(paths=(url_list,)), output_dir=output_dir, rows_per_shard=20,
    policy=FetchPolicyConfig(allow_loopback=True, timeout_s=5), threads_per_shard=2, max_concurrent_shards=1,
)
run_ingest(config, RayConfig(num_cpus=2))
"""


def _resume_config(url_list, output_dir):
    return IngestConfig(
        url_list=UrlListConfig(paths=(str(url_list),)),
        output_dir=str(output_dir),
        rows_per_shard=20,
        policy=FetchPolicyConfig(allow_loopback=True, timeout_s=5),
        threads_per_shard=2,
    )


def _kill_9(proc):
    """kill -9 the run: its process group and every process under it (Ray's raylet puts its workers in
    their own process groups; left alive, they go on downloading for a moment after the driver dies)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:  # it ended on its own (a failure the caller reports)
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(tree, timeout=30)
    proc.wait()


def _wait_until_quiet(server, quiet_s=0.5, limit_s=10.0):
    """Requests the killed run sent before dying may still be queued in the server: let them land."""
    deadline = time.monotonic() + limit_s
    count, since = len(server.requests), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.05)
        if len(server.requests) != count:
            count, since = len(server.requests), time.monotonic()


def _request_target(url):
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_clean_result_and_skips_finished_shards(demo, ray_cluster, tmp_path):
    server, paths, truth = demo
    # 60 rows, 3 shards of 20, each URL 0.1 s slow: a shard takes >= 1 s on 2 threads, one shard at a time.
    list_path = tmp_path / "slow.parquet"
    pq.write_table(
        pa.table({"url": [t["url"] + "?delay=0.1" for t in truth[:60]], "caption": [t["caption"] for t in truth[:60]]}),
        list_path,
    )
    killed = tmp_path / "killed"
    (tmp_path / "run.py").write_text(_RUN_SCRIPT)
    with open(tmp_path / "run.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "run.py"), str(list_path), str(killed)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so kill -9 reaches Ray's processes too
        )
        deadline = time.monotonic() + 300
        while not list((killed / "_done").glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        _kill_9(proc)
    _wait_until_quiet(server)
    done = sorted(p.stem for p in (killed / "_done").glob("*.json"))
    assert done and len(done) < 3, (tmp_path / "run.log").read_text()[-3000:]
    assert not (killed / "manifest.json").exists()

    before = len(server.requests)
    resumed = run_ingest(_resume_config(list_path, killed))
    during_rerun = server.requests[before:]
    finished = pa.concat_tables([pq.read_table(killed / "inputs" / f"{s}.parquet") for s in done])
    finished_urls = {_request_target(u) for u in finished["url"].to_pylist()}
    assert finished_urls and not finished_urls & set(during_rerun)  # a finished shard is not downloaded again
    assert len(during_rerun) == 60 - len(finished_urls)  # the interrupted shard is redone whole
    assert resumed["shards_resumed"] == len(done)

    clean = run_ingest(_resume_config(list_path, tmp_path / "clean"))
    a, b = read_output(killed), read_output(tmp_path / "clean")
    assert a["key"].to_pylist() == b["key"].to_pylist() and len(set(a["key"].to_pylist())) == a.num_rows == 60
    assert a.equals(b)  # same statuses, errors, image bytes
    assert resumed["by_status"] == clean["by_status"]
