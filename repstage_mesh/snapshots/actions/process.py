"""Run one external program for an action: argv (never a shell), a minimal environment, a
timeout that kills the program's whole process group, and the reason kept in the error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from repstage_mesh.snapshots.actions.errors import SnapshotActionFailed, SnapshotActionTimeout

MINIMAL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OUTPUT_TAIL = 2000  # characters of stdout/stderr kept for records and error messages


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """PATH, LANG and what the caller adds: nothing of the mesh's own environment leaks."""
    env = {"PATH": MINIMAL_PATH, "LANG": "C.UTF-8"}
    env.update(extra or {})
    return env


def _tail(data: bytes) -> str:
    return data.decode(errors="replace")[-OUTPUT_TAIL:]


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def run_argv(
    argv: Sequence[str],
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    what: str = "command",
    check: bool = True,
) -> Completed:
    """Run `argv` to its end within `timeout` seconds.

    Raises SnapshotActionTimeout (the process group killed) at the timeout, SnapshotActionFailed
    when the program cannot start or exits non-zero (with the tail of its stderr). A cancelled
    caller kills the group too: nothing outlives the action.
    """
    if not argv:
        raise SnapshotActionFailed(f"{what}: empty command")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else minimal_env(),
            cwd=cwd,
            start_new_session=True,  # its own process group, killed as one
        )
    except OSError as exc:
        raise SnapshotActionFailed(f"{what}: cannot run {argv[0]!r}: {exc}") from exc
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await proc.communicate()
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        raise SnapshotActionTimeout(
            f"{what} {argv[0]!r} killed after its timeout of {timeout:.3g} s"
        ) from None
    except BaseException:
        _kill_group(proc)
        raise
    _kill_group(proc)  # whatever it left behind in its group goes with it
    done = Completed(tuple(argv), proc.returncode or 0, _tail(stdout), _tail(stderr))
    if check and done.returncode != 0:
        raise SnapshotActionFailed(
            f"{what} {argv[0]!r} exited with status {done.returncode}: {done.stderr.strip()}"
        )
    return done
