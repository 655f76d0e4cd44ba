from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SnapshotTarget:
    service: str; member: str; host: str; port: int; kind: str  # "redis" | "postgres" | "tcp"
    role: str; epoch: int; snapshot_id: str
    credentials: dict[str, str] = field(default_factory=dict)  # e.g. password from probe settings
@dataclass(frozen=True)
class ActionResult:
    artifact: str                 # URI of what was stored (file:///..., s3://bucket/key)
    point: dict[str, str]         # the snapshot point: redis master_replid/offset; pg start_lsn/stop_lsn/timeline
    size_bytes: int
class SnapshotAction(Protocol):
    async def take(self, target: SnapshotTarget, timeout: float) -> ActionResult: ...
