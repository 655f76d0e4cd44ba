"""decide: who should be primary, and the steps to get there (sans-IO).

The decider takes observations, applied states and step results, and returns steps
(confirm leadership, commit, wait for proxies, promote, re-point, read positions); the
failover runner (`repstage_mesh.failover`) executes them. Nothing here does I/O.
"""

from repstage_mesh.decide.decider import (
    MAX_BACKOFF,
    AwaitProxies,
    Commit,
    CommitResult,
    ConfirmLeadership,
    Decider,
    Done,
    FailoverRecord,
    Phase,
    Positions,
    Promote,
    PromoteResult,
    ProxyAcks,
    ReadPositions,
    Repoint,
    Step,
    StepFailed,
    StepResult,
    TimelineEvent,
)

__all__ = [
    "MAX_BACKOFF",
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
