"""Where snapshots are kept: a local directory (`file:///...`, the default) or an S3-compatible
bucket (`s3://bucket/prefix`, through boto3, optional extra `repstage-mesh[s3]`).

A snapshot is a small set of files (`dump.rdb`; `base.tar`, `pg_wal.tar`, `backup_manifest`)
under the key `<service>/<snapshot id>/`. An action writes them into a staging directory
(`stage()`), then `commit()` makes them visible at once: a rename within the same file system
for `file://`, an upload for `s3://` (the listing never shows a snapshot's files before its
record says it completed, which is what readers go by). `fetch()` brings a stored snapshot back
as a local directory for a restore drill. S3 credentials come from boto3's usual chain
(environment, shared files, instance role); `s3_endpoint_url` names a non-AWS endpoint.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from repstage_mesh.snapshots.actions.errors import SnapshotActionFailed

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Stored:
    uri: str  # file:///root/svc/id/ or s3://bucket/prefix/svc/id/
    size_bytes: int


class Storage(Protocol):
    def stage(self) -> Path: ...
    async def commit(self, staged: Path, key: str) -> Stored: ...
    def discard(self, staged: Path) -> None: ...


def snapshot_key(service: str, snapshot_id: str) -> str:
    """`<service>/<snapshot id>`; both must be plain path segments (no '/', no '..')."""
    for name, value in (("service", service), ("snapshot_id", snapshot_id)):
        if not _SEGMENT.match(value):
            raise SnapshotActionFailed(
                f"{name} {value!r} cannot name a snapshot: use letters, digits, '.', '_', '-'"
            )
    return f"{service}/{snapshot_id}"


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


class FileStorage:
    """Snapshots in a local directory; staged in `<root>/.staging` (same file system)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def stage(self) -> Path:
        staging = self.root / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=staging))

    async def commit(self, staged: Path, key: str) -> Stored:
        final = self.root / key
        if final.exists():
            raise SnapshotActionFailed(f"a snapshot is already stored at {final}")
        final.parent.mkdir(parents=True, exist_ok=True)
        size = _size(staged)
        await asyncio.to_thread(_fsync_tree, staged)
        os.replace(staged, final)
        return Stored(final.as_uri() + "/", size)

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _s3_client(endpoint_url: str | None, timeout: float) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # an optional extra
        raise SnapshotActionFailed(
            "storage s3://... needs boto3: pip install 'repstage-mesh[s3]'"
        ) from exc
    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 2})
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


class S3Storage:
    """Snapshots in an S3-compatible bucket under `prefix`; staged in a local temp directory."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, timeout: float) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url, self.timeout = endpoint_url, timeout

    def _object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def stage(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="repstage-snapshot-"))

    async def commit(self, staged: Path, key: str) -> Stored:
        base = self._object_key(key)

        def upload() -> int:
            client = _s3_client(self.endpoint_url, self.timeout)
            total = 0
            for path in sorted(p for p in staged.rglob("*") if p.is_file()):
                client.upload_file(str(path), self.bucket, f"{base}/{path.relative_to(staged)}")
                total += path.stat().st_size
            return total

        try:
            size = await asyncio.to_thread(upload)
        except SnapshotActionFailed:
            raise
        except Exception as exc:  # botocore's errors: the bucket, the credentials, the network
            raise SnapshotActionFailed(f"upload to s3://{self.bucket}/{base}/ failed: {exc}") from exc
        finally:
            self.discard(staged)
        return Stored(f"s3://{self.bucket}/{base}/", size)

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)


def open_storage(url: str, s3_endpoint_url: str | None = None, timeout: float = 60.0) -> Storage:
    """The storage `url` names; SnapshotActionFailed says what is wrong with a bad one."""
    parsed = urlparse(url)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost") and parsed.path:
        return FileStorage(Path(unquote(parsed.path)))
    if parsed.scheme == "s3" and parsed.netloc:
        return S3Storage(parsed.netloc, parsed.path, s3_endpoint_url, timeout)
    raise SnapshotActionFailed(
        f"storage {url!r}: expected file:///absolute/directory or s3://bucket/prefix"
    )


async def fetch(uri: str, into: Path, s3_endpoint_url: str | None = None,
                timeout: float = 300.0) -> Path:
    """A local directory holding the files of the snapshot stored at `uri` (a `file://`
    snapshot is read where it is; an `s3://` one is downloaded into `into`)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        local = Path(unquote(parsed.path))
        if not local.is_dir():
            raise SnapshotActionFailed(f"snapshot {uri}: no such directory")
        return local
    if parsed.scheme != "s3" or not parsed.netloc:
        raise SnapshotActionFailed(f"snapshot {uri!r}: not a file:// or s3:// location")
    bucket, prefix = parsed.netloc, parsed.path.strip("/") + "/"

    def download() -> int:
        client = _s3_client(s3_endpoint_url, timeout)
        count = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                relative = item["Key"][len(prefix):]
                if not relative or ".." in relative.split("/"):
                    continue
                target = into / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, item["Key"], str(target))
                count += 1
        return count

    try:
        count = await asyncio.to_thread(download)
    except SnapshotActionFailed:
        raise
    except Exception as exc:
        raise SnapshotActionFailed(f"download of {uri} failed: {exc}") from exc
    if count == 0:
        raise SnapshotActionFailed(f"snapshot {uri}: no objects under that prefix")
    return into
