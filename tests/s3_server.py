"""A real S3-compatible server on 127.0.0.1 for tests (moto in server mode, one process per test session).

`S3Server(log, authenticate=True)` starts one that checks every request the way S3 does: moto's
INITIAL_NO_AUTH_ACTION_COUNT lets the first few requests through unsigned (we spend them creating an admin
IAM user and its key), after which every request must be signed with a key created through moto's IAM API
(a wrong secret gets SignatureDoesNotMatch, an unknown key InvalidAccessKeyId) and IAM policies decide what
each key may do on S3 (AccessDenied otherwise).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

_BOOTSTRAP_REQUESTS = 3
"""Unsigned requests the authenticating server lets through: CreateUser, PutUserPolicy, CreateAccessKey."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """`moto_server` on a free loopback port; `env` is what pyarrow, botocore, Ray workers and MLflow read.

    With authenticate=True, `env` and `client()` carry an admin user's key (moto enforces IAM from the start);
    `restricted_user` makes further users whose IAM policy limits them."""

    def __init__(self, log_path: str, authenticate: bool = False) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.authenticate = authenticate
        self.key_id, self.secret = "testing", "testing"
        self.log = open(log_path, "w")
        server = os.path.join(os.path.dirname(sys.executable), "moto_server")
        env = dict(os.environ)
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        if authenticate:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_BOOTSTRAP_REQUESTS)
        self.proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).read()  # not an AWS action: free
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start; see {log_path}") from None
                time.sleep(0.2)
        if authenticate:
            try:
                self.key_id, self.secret = self._create_user("admin", {"Effect": "Allow", "Action": "*",
                                                                       "Resource": "*"})
            except BaseException:
                self.stop()
                raise

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def _boto(self, service: str, key_id: str | None = None, secret: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client(service, endpoint_url=self.endpoint, aws_access_key_id=key_id or self.key_id,
                            aws_secret_access_key=secret or self.secret, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}))

    def client(self, key_id: str | None = None, secret: str | None = None):
        return self._boto("s3", key_id, secret)

    def _create_user(self, name: str, *statements: dict) -> tuple[str, str]:
        """An IAM user with an inline policy of `statements` and an access key: (key id, secret)."""
        iam = self._boto("iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy",
                            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": list(statements)}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def restricted_user(self, read_only_prefix: str) -> tuple[str, dict[str, str]]:
        """A fresh bucket and a user who may do anything on it except write or delete under `read_only_prefix`
        (there only s3:GetObject and s3:ListBucket). Needs authenticate=True. Returns (bucket, env for the user)."""
        if not self.authenticate:
            raise RuntimeError("IAM policies apply only on an S3Server(..., authenticate=True)")
        bucket = self.create_bucket("iam")
        arn = f"arn:aws:s3:::{bucket}"
        key_id, secret = self._create_user(
            f"user-{uuid.uuid4().hex[:10]}",
            {"Effect": "Allow", "Action": "s3:*", "Resource": [arn, f"{arn}/*"]},
            {"Effect": "Deny", "NotAction": ["s3:GetObject", "s3:ListBucket"],
             "Resource": f"{arn}/{read_only_prefix.strip('/')}/*"},
        )
        return bucket, {**self.env, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}

    def create_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        keys: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return sorted(keys)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
