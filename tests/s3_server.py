"""A real S3 API on loopback (moto's server) for the delivery tests: boto3 talks HTTP to it."""

import contextlib
import json
import logging
import socket
import threading
import urllib.request
from collections.abc import Iterator

import boto3
from moto.server import ThreadedMotoServer

BUCKET = "videos"


@contextlib.contextmanager
def loopback_s3(access_key: str = "a", secret_key: str = "b") -> Iterator[tuple[str, object]]:
    """Start a server with the bucket ``videos``; yields (endpoint URL, an admin boto3 client)."""
    # The fake server's own access log prints presigned URLs; it is not the worker's log under test.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        admin = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
        )
        admin.create_bucket(Bucket=BUCKET)
        yield endpoint, admin
    finally:
        server.stop()


@contextlib.contextmanager
def loopback_s3_with_keys() -> Iterator[tuple[str, dict[str, tuple[str, str]]]]:
    """A server that checks access keys, signatures and permissions as S3 does (moto's IAM access
    control), with the bucket ``videos`` and two users: ``writer`` may do anything, ``put_only`` may
    only put objects. Yields (endpoint URL, {user: (access key id, secret)})."""
    with loopback_s3() as (endpoint, _):
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="a",
            aws_secret_access_key="b",
        )
        keys = {}
        for user, action in {"writer": "*", "put_only": "s3:PutObject"}.items():
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            policy = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": action, "Resource": "*"}],
            }
            iam.put_user_policy(UserName=user, PolicyName="access", PolicyDocument=json.dumps(policy))
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        _authenticate_after(endpoint, "0")
        try:
            yield endpoint, keys
        finally:  # the setting is process-wide: other servers of this test process check no keys
            _authenticate_after(endpoint, "inf")


def _authenticate_after(endpoint: str, count: str) -> None:
    """moto's switch for access control: requests after the next ``count`` must be signed by a known key."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=count.encode(),
        headers={"Content-Type": "text/plain"},  # a form body would reach moto empty
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


def dead_endpoint() -> str:
    """An S3 endpoint URL on a loopback port nothing listens on: every request is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """An S3 endpoint URL whose server takes connections and requests but never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listening socket closed: done
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for connection in held:
            connection.close()
