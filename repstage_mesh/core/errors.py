"""Every exception RepStage Mesh raises on purpose, in one place (httpx style).

MeshError
├── ConfigError          the config file or environment is wrong (defined in config.py, re-exported here)
├── ReplicationError
│   ├── NoQuorum         a write could not be committed: no leader or no majority (API: 503)
│   ├── CommitTimeout    the write may or may not have been committed (API: 504)
│   └── NotLeader        an operation only the confirmed Raft leader may do
└── Rejected             the state machine refused a command (API: 404/409/422 by code)
"""

from __future__ import annotations

from repstage_mesh.core.models import Rejection


class MeshError(Exception):
    """Base of every error RepStage Mesh raises on purpose."""


class ReplicationError(MeshError):
    pass


class NoQuorum(ReplicationError):
    pass


class CommitTimeout(ReplicationError):
    pass


class NotLeader(ReplicationError):
    pass


class Rejected(MeshError):
    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection
