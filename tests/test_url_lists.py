"""URL lists in every format read the same; every malformed list fails fast, naming file and problem."""
import gzip
import json
import os
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.url_lists import KEY_DIGITS, UrlListConfig, UrlListError, split_into_shards, validate_url_list

ROWS = [(f"http://images.example/{i}.jpg", f"caption {i}, with a comma") for i in range(7)]


def _write(path, fmt, rows=ROWS, url="url", caption="caption"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        columns = {url: [u for u, _ in rows], caption: [c for _, c in rows], "extra": [1] * len(rows)}
        pq.write_table(pa.table(columns), path)
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        quote = (lambda s: f'"{s}"') if fmt == "csv" else (lambda s: s)
        path.write_text(f"{url}{sep}{caption}\n" + "".join(f"{quote(u)}{sep}{quote(c)}\n" for u, c in rows))
    else:
        path.write_text("".join(json.dumps({url: u, caption: c}) + "\n" for u, c in rows))
    return path


def _read_all(config, tmp_path, rows_per_shard=3):
    out = tmp_path / "shards"
    ids = split_into_shards(config, rows_per_shard, out)
    return ids, pa.concat_tables([pq.read_table(out / f"{i}.parquet") for i in ids])


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_each_format_reads_the_same_rows(tmp_path, fmt):
    path = _write(tmp_path / f"list.{fmt}", fmt)
    ids, table = _read_all(UrlListConfig(paths=(str(path),)), tmp_path)
    assert ids == ["00000", "00001", "00002"]
    assert table.column_names == ["key", "url", "caption"]
    assert list(zip(table["url"].to_pylist(), table["caption"].to_pylist())) == ROWS
    assert table["key"].to_pylist() == [f"{i:0{KEY_DIGITS}d}" for i in range(7)]


def test_laion_column_names_folders_compression_and_fsspec_urls(tmp_path):
    folder = tmp_path / "laion"
    _write(folder / "part-00000.parquet", "parquet", ROWS[:4], url="URL", caption="TEXT")
    _write(folder / "part-00001.parquet", "parquet", ROWS[4:], url="URL", caption="TEXT")
    (folder / "_SUCCESS").write_text("")
    config = UrlListConfig(paths=(str(folder),), url_column="URL", caption_column="TEXT")
    _, table = _read_all(config, tmp_path / "a")
    assert table["url"].to_pylist() == [u for u, _ in ROWS]

    gz = tmp_path / "list.csv.gz"
    gz.write_bytes(gzip.compress(_write(tmp_path / "plain.csv", "csv").read_bytes()))
    _, table = _read_all(UrlListConfig(paths=(str(gz),)), tmp_path / "b")
    assert table["caption"].to_pylist() == [c for _, c in ROWS]

    memory = fsspec.filesystem("memory")
    with memory.open("/lists/list.jsonl", "wb") as f:
        f.write(_write(tmp_path / "m.jsonl", "jsonl").read_bytes())
    _, table = _read_all(UrlListConfig(paths=("memory://lists/list.jsonl",)), tmp_path / "c")
    assert table["url"].to_pylist() == [u for u, _ in ROWS]

    no_caption = UrlListConfig(paths=(str(tmp_path / "plain.csv"),), caption_column=None)
    _, table = _read_all(no_caption, tmp_path / "d")
    assert table["caption"].null_count == len(ROWS)


def test_keys_are_global_and_stable_and_a_split_is_reused(tmp_path):
    a = _write(tmp_path / "a.csv", "csv", ROWS[:5])
    b = _write(tmp_path / "b.csv", "csv", ROWS[5:])
    config = UrlListConfig(paths=(str(a), str(b)))
    ids, table = _read_all(config, tmp_path, rows_per_shard=4)
    assert ids == ["00000", "00001"]  # 7 rows across two files -> 4 + 3
    assert table["key"].to_pylist()[-1] == f"{6:0{KEY_DIGITS}d}"
    first = (tmp_path / "shards" / "00000.parquet").stat().st_mtime_ns
    assert _read_all(config, tmp_path, rows_per_shard=4)[0] == ids
    assert (tmp_path / "shards" / "00000.parquet").stat().st_mtime_ns == first  # not rewritten
    ids, _ = _read_all(config, tmp_path, rows_per_shard=7)
    assert ids == ["00000"] and sorted(p.name for p in (tmp_path / "shards").glob("*.parquet")) == ["00000.parquet"]


def _fails_fast(config, *needles):
    started = time.monotonic()
    with pytest.raises(UrlListError) as err:
        validate_url_list(config)
    assert time.monotonic() - started < 5
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    return str(err.value)


def test_missing_path_fails_naming_it(tmp_path):
    _fails_fast(UrlListConfig(paths=(str(tmp_path / "nope.parquet"),)), "nope.parquet", "no such file")


def test_missing_column_lists_the_columns_found(tmp_path):
    path = _write(tmp_path / "list.parquet", "parquet", url="URL", caption="TEXT")
    config = UrlListConfig(paths=(str(path),))
    _fails_fast(config, str(path), "no column 'url'", "['URL', 'TEXT', 'extra']", "url_column=")
    path = _write(tmp_path / "list.csv", "csv")
    _fails_fast(UrlListConfig(paths=(str(path),), caption_column="TEXT"), "no column 'TEXT'", "caption_column=")


def test_wrong_type_and_columns_without_urls(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"url": [1, 2], "caption": ["a", "b"]}), path)
    _fails_fast(UrlListConfig(paths=(str(path),)), str(path), "'url' has type int64, expected strings")
    path = _write(tmp_path / "swapped.jsonl", "jsonl", url="caption", caption="url")
    _fails_fast(UrlListConfig(paths=(str(path),)), str(path), "holds no URLs", "url_column=")


def test_empty_list_fails(tmp_path):
    header_only = tmp_path / "header.csv"
    header_only.write_text("url,caption\n")
    zero_bytes = tmp_path / "zero.jsonl"
    zero_bytes.write_text("")
    empty_parquet = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}), empty_parquet)
    paths = (str(header_only), str(zero_bytes), str(empty_parquet))
    _fails_fast(UrlListConfig(paths=paths), "the URL list is empty", "header.csv", "empty.parquet")
    # An empty file among files with rows is fine: it contributes no rows.
    ids, table = _read_all(UrlListConfig(paths=(*paths, str(_write(tmp_path / "rows.csv", "csv")))), tmp_path)
    assert table.num_rows == len(ROWS)


def test_garbled_and_unreadable_files_fail(tmp_path):
    garbled = tmp_path / "list.parquet"
    garbled.write_bytes(os.urandom(4096))
    _fails_fast(UrlListConfig(paths=(str(garbled),)), str(garbled), "cannot be read as parquet")
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(_write(tmp_path / "whole.parquet", "parquet").read_bytes()[:-100])
    _fails_fast(UrlListConfig(paths=(str(truncated),)), str(truncated), "cannot be read as parquet")
    not_lines = tmp_path / "array.json"
    not_lines.write_text('[{"url": "http://a/1.jpg", "caption": "x"},\n {"url": "http://a/2.jpg"}]')
    _fails_fast(UrlListConfig(paths=(str(not_lines),)), str(not_lines), "cannot be read as jsonl")
    unknown = tmp_path / "list.txt"
    unknown.write_text("http://a/1.jpg\n")
    _fails_fast(UrlListConfig(paths=(str(unknown),)), str(unknown), "set format=")
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    _fails_fast(UrlListConfig(paths=(str(empty_folder),)), str(empty_folder), "holds no")


def test_config_checks():
    assert UrlListConfig(paths="a.parquet").paths == ("a.parquet",)
    with pytest.raises(UrlListError, match="paths is empty"):
        UrlListConfig(paths=())
    with pytest.raises(UrlListError, match="format must be"):
        UrlListConfig(paths=("a",), format="xlsx")
