"""Reading URL lists as people have them, checked up front, and cutting them into input shards.

A URL list is LAION-style: one row per image with a URL column and a caption column, in parquet, csv,
tsv or JSON Lines; one file, many files or folders; local paths or URLs (`s3://`, `gs://`, `hdfs://`
through pyarrow's filesystems, anything fsspec knows through `pyarrow.fs.FSSpecHandler`).

`validate_url_list` opens every file and reads its schema and first rows, so a wrong path, a garbled
file, a wrong column name or type, or an empty list fails in seconds with a message naming the file,
before any download starts. `split_into_shards` then writes input shards with a stable row key.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from pipelines import storage
from pipelines.storage import StoragePath

Format = Literal["auto", "parquet", "csv", "tsv", "jsonl"]
_EXTENSION_FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}
_COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")
KEY_DIGITS = 12
"""Width of the zero-padded row key: 10^12 rows, more than any public URL list (LAION-5B: 5.85e9)."""
_STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view())
_BATCH_ROWS = 65_536
_SPLIT_RECORD = "_split.json"


class UrlListError(ValueError):
    """The URL list cannot be used; the message names the file, the problem and what to do."""


@dataclass(kw_only=True, frozen=True)
class UrlListConfig:
    paths: tuple[str, ...]
    """Files or folders (searched recursively for .parquet/.csv/.tsv/.jsonl/.json, optionally .gz/.zst/...),
    local paths or URLs such as s3://bucket/laion/ or memory://list.parquet."""
    url_column: str = "url"
    """Column holding the image URLs (LAION parquet: "URL")."""
    caption_column: str | None = "caption"
    """Column holding the captions (LAION parquet: "TEXT"); None when the list has none."""
    format: Format = "auto"
    """File format; "auto" decides per file from its extension."""

    def __post_init__(self) -> None:
        paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else tuple(self.paths)
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))
        if not self.paths:
            raise UrlListError("UrlListConfig.paths is empty: give at least one file or folder")
        if not self.url_column:
            raise UrlListError("url_column must name the column holding the image URLs")
        if self.format not in ("auto", "parquet", "csv", "tsv", "jsonl"):
            raise UrlListError(f"format must be auto, parquet, csv, tsv or jsonl, got {self.format!r}")


@dataclass(frozen=True)
class UrlListFile:
    """One file of the list, as found: enough to read it again and to notice it changed."""

    path: str
    format: str
    size: int
    mtime_ns: int | None

    def fingerprint(self) -> str:
        return f"{self.path}|{self.size}|{self.mtime_ns}"


# -- finding the files ----------------------------------------------------------------------------
def _format_of(path: str, requested: Format) -> str | None:
    name = path.lower()
    for suffix in _COMPRESSIONS:
        name = name.removesuffix(suffix)
    detected = _EXTENSION_FORMATS.get(pathlib.PurePosixPath(name).suffix)
    return detected if requested == "auto" else requested


def _in_folder_format(path: str, requested: Format) -> bool:
    """Whether a file found in a folder belongs to the list: a known extension, or with a forced
    format, that format's extension or none at all (Spark-style `part-00000`)."""
    detected = _format_of(path, "auto")
    return detected is not None if requested == "auto" else detected in (requested, None)


def _expand(given: str, requested: Format) -> list[UrlListFile]:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(given)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise UrlListError(f"{given}: no such file or folder. Check the path (and credentials for a bucket).")
    if info.type == pafs.FileType.File:
        fmt = _format_of(path, requested)
        if fmt is None:
            raise UrlListError(
                f"{given}: cannot tell the format from the extension; set format= to parquet, csv, tsv or jsonl"
            )
        infos = [info]
    else:
        infos = [
            i
            for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if i.type == pafs.FileType.File
            and not i.base_name.startswith(("_", "."))  # _SUCCESS, .crc and other writer droppings
            and _in_folder_format(i.path, requested)
        ]
        if not infos:
            raise UrlListError(f"{given}: the folder holds no .parquet/.csv/.tsv/.jsonl files")
    prefix = given.split("://", 1)[0] + "://" if "://" in given else ""
    return [
        UrlListFile(
            path=f"{prefix}{i.path}" if prefix else i.path,
            format=_format_of(i.path, requested),
            size=i.size,
            mtime_ns=i.mtime_ns,
        )
        for i in sorted(infos, key=lambda i: i.path)
    ]


def find_files(config: UrlListConfig) -> list[UrlListFile]:
    """Every file of the list, in a stable order (paths in the order given, each folder sorted)."""
    files: list[UrlListFile] = []
    for given in config.paths:
        files.extend(_expand(given, config.format))
    return files


# -- reading --------------------------------------------------------------------------------------
def _open_batches(
    file: UrlListFile, columns: list[str], select: bool
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """Schema and batches of one file; `columns` are read as text, and only they when `select`."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(file.path)
    if file.format == "parquet":
        reader = pq.ParquetFile(fs.open_input_file(path))
        return reader.schema_arrow, reader.iter_batches(batch_size=_BATCH_ROWS, columns=columns if select else None)
    stream = fs.open_input_stream(path, compression="detect")
    if file.format == "jsonl":
        reader = pajson.open_json(stream)
    else:
        # Every column stays text: a caption "1984" must not become an integer.
        reader = pacsv.open_csv(
            stream,
            parse_options=pacsv.ParseOptions(delimiter="\t" if file.format == "tsv" else ",", newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns if select else None, column_types={c: pa.string() for c in columns}
            ),
        )
    return reader.schema, iter(reader)


def _first_batch(batches: Iterator[pa.RecordBatch]) -> pa.RecordBatch | None:
    return next((b for b in batches if b.num_rows > 0), None)


def _columns(config: UrlListConfig) -> list[str]:
    return [config.url_column] + ([config.caption_column] if config.caption_column else [])


def _check_file(file: UrlListFile, config: UrlListConfig) -> int:
    """Read the schema and first rows of one file; return how many rows that first batch had."""
    try:
        schema, batches = _open_batches(file, _columns(config), select=False)
        first = _first_batch(batches)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as err:
        if file.size == 0 or any(m in str(err) for m in ("Empty CSV file", "Empty JSON stream")):
            return 0
        text = "".join(c if c.isprintable() else "?" for c in str(err))  # a garbled file's bytes show up here
        detail = text if len(text) < 200 else text[:200] + "..."
        raise UrlListError(
            f"{file.path}: cannot be read as {file.format} ({detail}). The file may be truncated or in "
            "another format: re-download it, or set format= to its real format."
        ) from None
    names = schema.names
    for role, column in (("url_column", config.url_column), ("caption_column", config.caption_column)):
        if column is not None and column not in names:
            raise UrlListError(
                f"{file.path}: no column {column!r} (columns found: {names}). Set {role}= to the right one."
            )
    for column in (config.url_column, config.caption_column):
        if column is not None and schema.field(column).type not in _STRING_TYPES + (pa.null(),):
            raise UrlListError(
                f"{file.path}: column {column!r} has type {schema.field(column).type}, expected strings. "
                f"Is it the right column? (columns found: {names})"
            )
    if first is not None:
        urls = [u for u in first.column(config.url_column).to_pylist()[:1000] if u]
        if urls and not any("://" in u for u in urls):
            raise UrlListError(
                f"{file.path}: column {config.url_column!r} holds no URLs (first values: {urls[:3]}). "
                "Set url_column= to the column with the image URLs."
            )
    return 0 if first is None else first.num_rows


def validate_url_list(config: UrlListConfig) -> list[UrlListFile]:
    """Find and check every file before any download; raise UrlListError on the first problem."""
    files = find_files(config)
    if sum(_check_file(f, config) > 0 for f in files) == 0:
        shown = ", ".join(f.path for f in files[:5]) + (" ..." if len(files) > 5 else "")
        raise UrlListError(f"the URL list is empty: {shown} hold no rows. Point paths= at a list with rows.")
    return files


def iter_url_batches(config: UrlListConfig, files: list[UrlListFile]) -> Iterator[pa.RecordBatch]:
    """Batches with `url` and `caption` string columns (caption null when the list has none)."""
    for file in files:
        if file.size == 0:
            continue
        _, batches = _open_batches(file, _columns(config), select=True)
        for batch in batches:
            url = batch.column(config.url_column).cast(pa.string())
            caption = (
                batch.column(config.caption_column).cast(pa.string())
                if config.caption_column
                else pa.nulls(batch.num_rows, pa.string())
            )
            yield pa.RecordBatch.from_arrays([url, caption], names=["url", "caption"])


# -- input shards ---------------------------------------------------------------------------------
def shard_path(shards_dir: str | os.PathLike | StoragePath, shard_id: str) -> StoragePath:
    return storage.path(shards_dir) / f"{shard_id}.parquet"


def _write_shard(shards_dir: StoragePath, index: int, first_row: int, rows: pa.Table) -> str:
    from pipelines.step import atomic_write_parquet

    shard_id = f"{index:05d}"
    keys = pa.array([f"{first_row + i:0{KEY_DIGITS}d}" for i in range(rows.num_rows)], pa.string())
    table = pa.table({"key": keys, "url": rows.column("url"), "caption": rows.column("caption")})
    atomic_write_parquet(shard_path(shards_dir, shard_id), table)
    return shard_id


def split_into_shards(
    config: UrlListConfig,
    rows_per_shard: int,
    out_dir: str | os.PathLike,
    files: list[UrlListFile] | None = None,
) -> list[str]:
    """Write input shards `<out_dir>/<shard_id>.parquet` (key, url, caption); return the shard ids.

    The key is the zero-padded row number over the whole list, in file order: the same list gives the
    same keys and shards on every run. A split already made from the same files is reused.
    """
    import json

    from pipelines.step import atomic_write_json

    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    files = validate_url_list(config) if files is None else files
    out = storage.path(out_dir)
    record_path = out / _SPLIT_RECORD
    identity = {
        "config": dataclasses.asdict(config),
        "rows_per_shard": rows_per_shard,
        "files": [f.fingerprint() for f in files],
    }
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as read back from the record
    if record_path.exists():
        record = record_path.read_json()
        if record.get("identity") == identity:
            return record["shard_ids"]
        record_path.unlink()
    shard_ids: list[str] = []
    pending: list[pa.RecordBatch] = []
    pending_rows = row = 0
    for batch in iter_url_batches(config, files):
        pending.append(batch)
        pending_rows += batch.num_rows
        while pending_rows >= rows_per_shard:
            table = pa.Table.from_batches(pending)
            shard_ids.append(_write_shard(out, len(shard_ids), row, table.slice(0, rows_per_shard)))
            row += rows_per_shard
            rest = table.slice(rows_per_shard)
            pending, pending_rows = rest.to_batches(), rest.num_rows
    if pending_rows:
        shard_ids.append(_write_shard(out, len(shard_ids), row, pa.Table.from_batches(pending)))
    for stale in out.glob("*.parquet"):  # shards of an earlier, different split
        if stale.stem not in shard_ids:
            stale.unlink()
    atomic_write_json(record_path, {"identity": identity, "shard_ids": shard_ids, "rows": row + pending_rows})
    return shard_ids
