"""Where steps read and write: a local path or an object-store URL (s3://, gs://, hdfs://, any fsspec scheme).

Every step goes through `StoragePath`, so one code path serves a laptop's disk, a cluster's NFS and a bucket.
The filesystem behind a URL is pyarrow's (S3, GCS, HDFS are native; other schemes through fsspec), the same one
Ray Data and Ray Train resolve, configured the usual way: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_ENDPOINT_URL (an S3-compatible server such as MinIO or Ceph) / AWS_DEFAULT_REGION, or GOOGLE_APPLICATION_CREDENTIALS.

Writes are whole-object: a reader never sees half a file. On a local disk that takes a temporary file and a
rename; an object store's PUT (and multipart upload, completed on close) is already all-or-nothing. That is what
makes "a step is finished when its manifest exists" hold on both.
"""
from __future__ import annotations

import fnmatch
import functools
import json
import os
import pathlib
import posixpath
import shutil
import tempfile
import uuid
from typing import Any


class StorageError(RuntimeError):
    """A store that cannot be used (no such bucket, credentials refused, read-only): says which URI and why."""


def is_url(path: str | os.PathLike | "StoragePath") -> bool:
    return "://" in str(path)


_CREDENTIAL_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "AWS_DEFAULT_REGION", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS")


def _filesystem_for(scheme_and_authority: str) -> Any:
    # One filesystem per bucket and credentials: building an S3 client per call costs milliseconds.
    return _cached_filesystem(scheme_and_authority, tuple(os.environ.get(k) for k in _CREDENTIAL_ENV))


@functools.lru_cache(maxsize=64)
def _cached_filesystem(scheme_and_authority: str, _credentials: tuple[str | None, ...]) -> Any:
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, _ = pafs.FileSystem.from_uri(scheme_and_authority + "/")
        return fs
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import fsspec

        fs, _ = fsspec.core.url_to_fs(scheme_and_authority + "/")
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def filesystem(path: str | os.PathLike) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) for a local path or URL; fsspec serves schemes pyarrow lacks."""
    import pyarrow.fs as pafs

    text = str(path)
    if not is_url(text):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
    scheme, rest = text.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), "/" + rest.lstrip("/")
    authority, _, key = rest.partition("/")
    fs = _filesystem_for(f"{scheme}://{authority}")
    if isinstance(fs, pafs.PyFileSystem):  # fsspec names paths its own way (memory:// keeps a leading /)
        import fsspec

        return fs, fsspec.core.url_to_fs(text)[1]
    return fs, f"{authority}/{key}".rstrip("/")


class StoragePath:
    """A file or folder on a local disk or in an object store, with the pathlib subset the steps use.

    str() is what pyarrow, Ray Data and Ray Train take: an absolute local path, or the URL.
    """

    __slots__ = ("_uri",)

    def __init__(self, path: str | os.PathLike | "StoragePath") -> None:
        text = str(path)
        if is_url(text):
            scheme, rest = text.split("://", 1)
            text = f"{scheme}://{posixpath.normpath(rest).lstrip('/')}" if rest.strip("/") else f"{scheme}://"
            if scheme == "file":
                text = "/" + rest.lstrip("/")
        else:
            text = os.path.abspath(os.path.expanduser(text))
        self._uri = text

    # -- naming ---------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        return self._uri

    def __repr__(self) -> str:
        return f"StoragePath({self._uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoragePath) and other._uri == self._uri

    def __hash__(self) -> int:
        return hash(self._uri)

    def __truediv__(self, part: str | os.PathLike) -> "StoragePath":
        return StoragePath(f"{self._uri.rstrip('/')}/{os.fspath(part)}")

    def __reduce__(self) -> tuple[Any, ...]:
        return StoragePath, (self._uri,)

    @property
    def is_local(self) -> bool:
        return not is_url(self._uri)

    @property
    def local(self) -> pathlib.Path:
        """The local path; a URL has none (download it, or pass str(self) to a reader that takes URLs)."""
        if not self.is_local:
            raise ValueError(f"{self} is not on a local disk")
        return pathlib.Path(self._uri)

    @property
    def name(self) -> str:
        return posixpath.basename(self._uri.rstrip("/"))

    @property
    def stem(self) -> str:
        return pathlib.PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return pathlib.PurePosixPath(self.name).suffix

    @property
    def parent(self) -> "StoragePath":
        return StoragePath(self._uri.rstrip("/").rsplit("/", 1)[0] or "/")

    def relative_to(self, other: "StoragePath | str") -> str:
        base = str(StoragePath(other)).rstrip("/") + "/"
        if not self._uri.startswith(base):
            raise ValueError(f"{self} is not under {other}")
        return self._uri[len(base):]

    @property
    def fs(self) -> Any:
        return filesystem(self._uri)[0]

    @property
    def fs_path(self) -> str:
        return filesystem(self._uri)[1]

    # -- queries --------------------------------------------------------------------------------------------
    def _info(self) -> Any:
        fs, inner = filesystem(self._uri)
        return fs.get_file_info(inner)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def files(self, pattern: str = "*", recursive: bool = False) -> list["StoragePath"]:
        """Files under this folder whose path relative to it matches `pattern` (fnmatch), sorted; none if absent."""
        import pyarrow.fs as pafs

        fs, inner = filesystem(self._uri)
        try:
            infos = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            relative = info.path[len(inner.rstrip("/")) + 1:]
            if fnmatch.fnmatch(relative, pattern):
                out.append(self / relative)
        return sorted(out, key=str)

    def glob(self, pattern: str) -> list["StoragePath"]:
        """pathlib's glob for files: `*.parquet` in this folder, `**/x` or `a/*.json` below it."""
        return self.files(pattern.removeprefix("**/") if pattern.startswith("**/") else pattern,
                          recursive="/" in pattern)

    def dirs(self) -> list["StoragePath"]:
        import pyarrow.fs as pafs

        fs, inner = filesystem(self._uri)
        infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
        return sorted((self / posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory), key=str)

    # -- reading --------------------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        fs, inner = filesystem(self._uri)
        with fs.open_input_stream(inner) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def open_input(self) -> Any:
        """A seekable binary file (what pyarrow.parquet.ParquetFile and PIL take)."""
        fs, inner = filesystem(self._uri)
        return fs.open_input_file(inner)

    # -- writing (whole-object) -----------------------------------------------------------------------------
    def mkdir(self) -> None:
        """Create the folder (and parents) on a local disk; object stores have no folders to create."""
        if self.is_local:
            self.local.mkdir(parents=True, exist_ok=True)

    def write_bytes(self, data: bytes) -> None:
        if self.is_local:
            _atomic_local_write(self.local, data)
            return
        fs, inner = filesystem(self._uri)
        with fs.open_output_stream(inner) as f:
            f.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def write_json(self, obj: Any) -> None:
        self.write_bytes((json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def write_parquet(self, table: Any, **write_options: Any) -> None:
        import pyarrow.parquet as pq

        if self.is_local:
            path = self.local
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                pq.write_table(table, tmp, **write_options)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return
        fs, inner = filesystem(self._uri)
        pq.write_table(table, inner, filesystem=fs, **write_options)

    def unlink(self, missing_ok: bool = True) -> None:
        fs, inner = filesystem(self._uri)
        try:
            fs.delete_file(inner)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def remove(self) -> None:
        fs, inner = filesystem(self._uri)
        if self.is_dir():
            fs.delete_dir(inner)
        elif self.exists():
            fs.delete_file(inner)

    def move_to(self, target: "StoragePath") -> None:
        """Rename on a local disk; copy then delete on an object store (which has no rename)."""
        if self.is_local and target.is_local:
            target.parent.mkdir()
            shutil.move(str(self), str(target))
            return
        copy_tree(self, target)
        self.remove()

    # -- whole folders between a local disk and the store ---------------------------------------------------
    def upload_from(self, local_dir: str | os.PathLike) -> None:
        """Copy a local folder's files here (a no-op when this is that folder)."""
        copy_tree(StoragePath(local_dir), self)

    def download_to(self, local_dir: str | os.PathLike, pattern: str = "*") -> pathlib.Path:
        """Copy this folder's files matching `pattern` into a local folder; returns it."""
        local = pathlib.Path(local_dir)
        for f in self.files(pattern, recursive=True):
            target = local / f.relative_to(self)
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_file(f, StoragePath(target))
        return local


def _atomic_local_write(path: pathlib.Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _copy_file(source: StoragePath, target: StoragePath) -> None:
    import pyarrow.fs as pafs

    if source == target:
        return
    if source.is_local and target.is_local:
        target.parent.mkdir()
        shutil.copyfile(str(source), str(target))
        return
    src_fs, src = filesystem(str(source))
    dst_fs, dst = filesystem(str(target))
    target.parent.mkdir()
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def copy_tree(source: StoragePath, target: StoragePath) -> None:
    """Every file under `source` to the same relative path under `target` (a file: to `target` itself)."""
    if source == target:
        return
    if source.is_file():
        _copy_file(source, target)
        return
    for f in source.files(recursive=True):
        _copy_file(f, target / f.relative_to(source))


def path(p: str | os.PathLike | StoragePath) -> StoragePath:
    """The StoragePath of a local path (made absolute: paths travel to Ray workers) or URL."""
    return p if isinstance(p, StoragePath) else StoragePath(p)


def check_writable(root: str | os.PathLike | StoragePath, what: str) -> None:
    """Write, read back and delete a probe object under `root`: a missing bucket, refused credentials or a
    read-only prefix fail here, in seconds, naming the URI, before any step starts."""
    where = path(root)
    if where.is_local:  # the nearest existing folder must take new files; nothing is created before the run
        existing = where.local
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"{what} {where} cannot be written: {existing} is not a writable folder. Choose "
                               "another path, or fix its permissions.")
        return
    probe = where / f"_imagen_write_check_{uuid.uuid4().hex[:12]}"
    try:
        probe.write_bytes(b"ok")
        if probe.read_bytes() != b"ok":
            raise OSError("read back something else than was written")
        probe.remove()
    except Exception as error:  # noqa: BLE001 - every store error becomes one message naming the URI
        said = f"{type(error).__name__}: {error}"
        code = said.upper().replace(" ", "_")
        if where.is_local:
            hint = "check the folder exists or can be created and is writable"
        elif any(c in code for c in ("SIGNATURE_DOES_NOT_MATCH", "SIGNATUREDOESNOTMATCH", "INVALID_ACCESS_KEY_ID",
                                     "INVALIDACCESSKEYID", "INVALID_CLIENT_TOKEN", "EXPIRED_TOKEN", "INVALID_TOKEN",
                                     "UNAUTHENTICATED")):
            hint = ("the credentials were refused (unknown access key or wrong secret key): check "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN, or the cluster's role) are the "
                    "ones for this store and AWS_ENDPOINT_URL")
        elif any(c in code for c in ("ACCESS_DENIED", "ACCESSDENIED", "PERMISSION_DENIED", "HTTP_STATUS_403")):
            hint = ("access was denied: the credentials in use (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the "
                    "cluster's role) may not write, read back and delete under this prefix (read-only for them, "
                    "or a bucket policy forbids it); use a writable prefix or grant s3:PutObject, s3:GetObject "
                    "and s3:DeleteObject on it")
        else:
            hint = ("check the bucket exists, the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the "
                    "cluster's role) and AWS_ENDPOINT_URL for an S3-compatible server, and that the prefix is writable")
        raise StorageError(f"{what} {where} cannot be written: {said}. {hint}.") from None
