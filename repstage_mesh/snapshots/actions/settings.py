"""What the actions need of the snapshot settings.

A structural stand-in for `config.sections.SnapshotSettings` (which has these fields and more),
so that the actions import nothing above `core`.
"""

from __future__ import annotations

from typing import Protocol


class ActionSettings(Protocol):
    storage: str  # "file:///var/lib/repstage/snapshots" or "s3://bucket/prefix"
    take_timeout: float  # seconds; one take (copy and upload) never runs longer
    s3_endpoint_url: str | None  # an S3-compatible endpoint; None means AWS
