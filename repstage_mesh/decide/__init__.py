"""decide: who should be primary, and the steps to get there (sans-IO).

The decider takes observations, applied states and step results, and returns steps
(confirm leadership, commit, wait for proxies, promote, re-point, read positions); the
failover runner (`repstage_mesh.failover`) executes them. Nothing here does I/O.
"""

from repstage_mesh.decide.decider import Decider
from repstage_mesh.decide.plan import Phase
from repstage_mesh.decide.policy import MAX_BACKOFF
from repstage_mesh.decide.records import FailoverRecord, TimelineEvent
from repstage_mesh.decide.steps import (
    AwaitClose,
    AwaitProxies,
    Commit,
    CommitResult,
    ConfirmLeadership,
    Done,
    Positions,
    Promote,
    PromoteResult,
    ProxyAcks,
    ReadPositions,
    Repoint,
    Step,
    StepFailed,
    StepResult,
)

__all__ = [
    "MAX_BACKOFF",
    "AwaitClose",
    "AwaitProxies",
    "Commit",
    "CommitResult",
    "ConfirmLeadership",
    "Decider",
    "Done",
    "FailoverRecord",
    "Phase",
    "Positions",
    "Promote",
    "PromoteResult",
    "ProxyAcks",
    "ReadPositions",
    "Repoint",
    "Step",
    "StepFailed",
    "StepResult",
    "TimelineEvent",
]
