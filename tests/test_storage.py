"""pipelines/storage.py against a real S3-compatible server on 127.0.0.1 and a local disk: the same calls."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.step import StepDir


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return storage.path(tmp_path / "root")
    server, bucket = request.getfixturevalue("s3")
    return storage.path(f"s3://{bucket}/runs/r1")


def test_write_read_list_move_on_local_disk_and_s3(root):
    (root / "a" / "x.json").write_json({"n": 1})
    (root / "a" / "shards" / "0.parquet").write_parquet(pa.table({"k": [1, 2, 3]}))
    (root / "b.txt").write_text("hello")
    assert (root / "a" / "x.json").read_json() == {"n": 1}
    assert (root / "b.txt").read_text() == "hello" and (root / "b.txt").is_file() and (root / "a").is_dir()
    assert not (root / "missing.json").exists() and (root / "nowhere").files() == []
    assert [f.relative_to(root) for f in root.files(recursive=True)] == ["a/shards/0.parquet", "a/x.json", "b.txt"]
    assert [f.relative_to(root) for f in root.files("a/shards/*.parquet", recursive=True)] == ["a/shards/0.parquet"]
    assert pq.read_table(str(root / "a" / "shards" / "0.parquet")).num_rows == 3  # pyarrow takes str() as is
    (root / "a").move_to(root / "moved" / "a")
    assert not (root / "a").exists() and (root / "moved" / "a" / "x.json").read_json() == {"n": 1}


def test_step_dir_on_s3_is_finished_only_when_its_manifest_exists(s3):
    server, bucket = s3
    step = StepDir.open(f"s3://{bucket}/run/ingest", "ingest", {"rows": 3}, [])
    assert step.manifest() is None and step.pending(["0", "1"]) == ["0", "1"]
    step.mark_done("0", {"rows": 2})
    assert step.pending(["0", "1"]) == ["1"]
    step.mark_done("1", {"rows": 1})
    step.finish(["0", "1"], rows=3)
    assert StepDir.open(f"s3://{bucket}/run/ingest", "ingest", {"rows": 3}, []).manifest()["rows"] == 3
    assert server.keys(bucket) == ["run/ingest/_done/0.json", "run/ingest/_done/1.json", "run/ingest/_key.json",
                                   "run/ingest/manifest.json"]


def test_a_bucket_that_does_not_exist_is_named_before_any_work(s3):
    with pytest.raises(storage.StorageError, match=r"run_dir s3://no-such-bucket-here/runs cannot be written.*NO_SUCH_BUCKET"):
        storage.check_writable("s3://no-such-bucket-here/runs", "run_dir")


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_refused_credentials_are_named_before_any_work(s3_auth_server, monkeypatch, wrong):
    server = s3_auth_server
    bucket = server.create_bucket()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    if wrong == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret[:-4] + "XXXX")
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    with pytest.raises(storage.StorageError) as raised:
        storage.check_writable(f"s3://{bucket}/runs", "run_dir")
    message = str(raised.value)
    assert message.startswith(f"run_dir s3://{bucket}/runs cannot be written: ")
    assert ("SIGNATURE_DOES_NOT_MATCH" if wrong == "secret" else "INVALID_ACCESS_KEY_ID") in message
    assert "the credentials were refused" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert server.keys(bucket) == []  # nothing was written


def test_a_read_only_prefix_is_named_before_any_work_and_a_writable_one_passes(s3_auth_server, monkeypatch):
    server = s3_auth_server
    bucket, user_env = server.restricted_user(read_only_prefix="runs/ro")
    server.client().put_object(Bucket=bucket, Key="runs/ro/inputs.txt", Body=b"shared")
    for key, value in user_env.items():
        monkeypatch.setenv(key, value)

    storage.check_writable(f"s3://{bucket}/runs/rw", "run_dir")  # same user, same bucket: allowed
    # The fixture's premise: the user may read the prefix (read-only, not no-access), asked of the server directly.
    user = server.client(user_env["AWS_ACCESS_KEY_ID"], user_env["AWS_SECRET_ACCESS_KEY"])
    assert user.get_object(Bucket=bucket, Key="runs/ro/inputs.txt")["Body"].read() == b"shared"
    with pytest.raises(storage.StorageError) as raised:
        storage.check_writable(f"s3://{bucket}/runs/ro", "run_dir")
    message = str(raised.value)
    assert message.startswith(f"run_dir s3://{bucket}/runs/ro cannot be written: ")
    assert "ACCESS_DENIED" in message and "access was denied" in message and "credentials" in message
    assert [k for k in server.keys(bucket) if "_imagen_write_check_" in k] == []  # no probe left behind
    assert server.keys(bucket, "runs/ro/") == ["runs/ro/inputs.txt"]


def test_the_authenticating_server_refuses_what_its_policies_forbid(s3_auth_server):
    """The tests above mean something only if the server really checks: a sanity check on the fixture itself."""
    import botocore.exceptions

    server = s3_auth_server
    bucket, user_env = server.restricted_user(read_only_prefix="ro")
    user = server.client(user_env["AWS_ACCESS_KEY_ID"], user_env["AWS_SECRET_ACCESS_KEY"])
    for client, key, code in [(server.client(server.key_id, "wrong"), "x", "SignatureDoesNotMatch"),
                              (server.client("AKIANOSUCHKEY0000000", "x"), "x", "InvalidAccessKeyId"),
                              (user, "ro/x", "AccessDenied")]:
        with pytest.raises(botocore.exceptions.ClientError) as raised:
            client.put_object(Bucket=bucket, Key=key, Body=b"1")
        assert raised.value.response["Error"]["Code"] == code
    user.put_object(Bucket=bucket, Key="rw/x", Body=b"1")
