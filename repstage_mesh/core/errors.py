"""Every exception RepStage Mesh raises on purpose, in one tree rooted in `MeshError` (httpx style).

A domain error carries a `code` (and, where input was wrong, the `field` it names); the REST
API turns codes into HTTP statuses in one table (`api/errors.py`), the CLI into messages.
Classes defined here are the domain's; the few defined elsewhere belong to an edge and are
listed here with their module, so this docstring stays the one map of the tree
(tests/test_errors.py fails when a class is missing from it or not under MeshError).

MeshError
├── ConfigError              the config file or environment is wrong (every problem, with its field path)
├── ReplicationError
│   ├── NoQuorum             a write could not be committed: no leader or no majority (API 503)
│   │   └── NoLeaderKnown    no Raft leader is known to this node, so nothing can be carried to it (API 503)
│   ├── CommitTimeout        the write may or may not have been committed (API 504)
│   ├── NoQuorumOutcomeUnknown  both: no majority now, but the write reached a leader (API 504)
│   ├── RaftBindError        this node could not bind its Raft address (field raft.bind)
│   └── DataDirInUse         another running node holds node.data_dir's lock
├── Rejected                 the state machine refused a command (API 404/409/422 by its code)
├── DecisionRefused          the decider will not run a requested switchover (404/409/422 by its code)
├── SnapshotRefused          a snapshot or a consistent point cannot start: no such member, no primary, one running (404/409/422)
├── NotReady                 this node leads but has not started deciding yet (API 503)
├── NotLeader                a forwarded request reached a node that does not lead; never forwarded again (API 503)
├── SwitchoverFailed         a switchover ran and failed; carries its record (API 409)
├── SwitchoverRunning        a switchover outlived the request's wait; carries its running record (API 504)
├── SwitchoverUnknown        a forwarded switchover got no answer from the leader: it may be running (API 504)
├── ApiRequestError          another node's (or, for the CLI, the server's) API answered an error; relayed as is
│   └── ApiError             api/errors.py: an HTTP error answer a handler raises (adds its headers)
├── ApiUnreachable           no answer at all from an API
│   └── ApiNoAnswer          api/peers.py: a request was sent to another node but no usable answer came back
├── ListenError              this node could not bind a listener (field xds.listen or api.listen)
├── InsecureBindError        api/app.py: the API would listen beyond loopback with no tokens
├── ConsulError              sources/consul.py: Consul answered an error or refused a registration (logged by the source, never leaves it)
├── CliError                 cli/main.py: a command line the CLI cannot carry out
└── SnapshotActionFailed     snapshots/actions/errors.py: taking, storing or restoring a snapshot failed
    ├── SnapshotActionTimeout   a command or transfer ran past its timeout (a command killed with its process group); also a TimeoutError
    └── RdbFormatError       snapshots/actions/rdb.py: bytes that are not an RDB

Not in the tree, on purpose: `repstage_mesh.xds.protocol.ProtocolError`. The generic xDS layer
imports nothing of the domain (an import-linter contract), and the error never leaves it: the
server closes the offending stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from repstage_mesh.core.models import Rejection


class MeshError(Exception):
    """Base of every error RepStage Mesh raises on purpose."""

    code: str = "internal"
    field: str | None = None


class ConfigError(MeshError):
    """The config file or the environment is wrong.

    `errors` is a list of (field path, message), e.g. ("services[0].members[1].port", "...");
    the path is "" for problems with the file as a whole. str() is a readable multi-line text.
    """

    code = "invalid_config"

    def __init__(self, errors: Sequence[tuple[str, str]], source: str | None = None) -> None:
        self.errors: list[tuple[str, str]] = list(errors)
        self.source = source
        super().__init__(format_errors(self.errors, source))


def format_errors(errors: Sequence[tuple[str, str]], source: str | None = None) -> str:
    """A readable multi-line message: a heading naming the source, then one line per problem."""
    where = f" in {source}" if source else ""
    count = "1 problem" if len(errors) == 1 else f"{len(errors)} problems"
    lines = [f"invalid configuration{where} ({count}):"]
    for path, message in errors:
        lines.append(f"  {path}: {message}" if path else f"  {message}")
    return "\n".join(lines)


class ReplicationError(MeshError):
    code = "replication"


class NoQuorum(ReplicationError):
    code = "no_quorum"


class NoLeaderKnown(NoQuorum):
    """No Raft leader is known to this node right now (a request for the leader cannot be
    carried to it)."""


class CommitTimeout(ReplicationError):
    code = "commit_timeout"


class NoQuorumOutcomeUnknown(NoQuorum, CommitTimeout):
    """No majority now, and the write reached a leader that may still commit it later."""

    code = "commit_timeout"


class RaftBindError(ReplicationError):
    """This node could not bind its Raft address."""

    field = "raft.bind"


class DataDirInUse(ReplicationError):
    """Another running node holds the lock of this node's data directory (two nodes sharing
    one journal would corrupt it)."""

    code = "data_dir_in_use"
    field = "node.data_dir"


class ListenError(MeshError):
    """A listener of this node could not bind; `field` names its config field."""

    code = "listen"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Rejected(MeshError):
    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection
        self.code = rejection.code
        self.field = rejection.field


class DecisionRefused(MeshError):
    """A switchover request the decider will not run. `code` is not_found, conflict or
    invalid, like Rejection codes; `field` names the bad input."""

    def __init__(self, code: str, message: str, field: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


class SnapshotRefused(MeshError):
    """A snapshot request that cannot start (no such member, no primary, one already running).
    `code` is not_found, conflict or invalid; `field` names the bad input."""

    def __init__(self, code: str, message: str, field: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


class NotReady(MeshError):
    code = "not_ready"


class NotLeader(MeshError):
    """A request another node forwarded here, to a node that does not lead (a request is
    forwarded at most once). `leader` is who this node believes leads (its Raft address), if
    anyone."""

    code = "not_leader"

    def __init__(self, message: str, leader: str | None = None) -> None:
        super().__init__(message)
        self.leader = leader


class SwitchoverRunning(MeshError):
    """The switchover is still running when the request's wait ends; `record` is its record
    (as a dict) so the caller can follow it at GET /v1/failovers/{id}."""

    code = "switchover_running"

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


class SwitchoverUnknown(MeshError):
    """A switchover carried to the leader got no answer (timeout, connection lost): it may
    be running or done there; GET /v1/failovers tells."""

    code = "switchover_unknown"


class SwitchoverFailed(MeshError):
    """The switchover ran and failed; `record` is its failover record (as a dict)."""

    code = "switchover_failed"

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


class ApiRequestError(MeshError):
    """An API answered with an error: its status, code, message, field and details."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        details: list[Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.details = list(details or [])


class ApiUnreachable(MeshError):
    """No answer from an API at all."""

    code = "unreachable"
