"""`repstage-mesh serve --config FILE [--debug]`: load and check the config, run one node until
SIGINT or SIGTERM (the node itself is built in `repstage_mesh/node.py`, the composition root).

A node that cannot start says why in one line per problem on stderr, naming the file and the
field and what to do, with no traceback, and the command exits 2 (`--debug` keeps tracebacks):
an invalid or unreadable file, a port taken (checked before anything starts, and again by
each listener: `ListenError`, `RaftBindError`), a data directory another node holds
(`DataDirInUse`). README: "Exit codes and start-up errors".
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from repstage_mesh.config import (
    ConfigError,
    Settings,
    bind_problems,
    load_config,
    replicated_problems,
    startup_problems,
)
from repstage_mesh.core.errors import MeshError
from repstage_mesh.core.models import MeshState
from repstage_mesh.telemetry import logs

if TYPE_CHECKING:
    from repstage_mesh.node import Node

log = logging.getLogger("repstage_mesh.node")

EXIT_REFUSED = 2  # the node refused to start: config, file, port or data directory
EXIT_UNEXPECTED = 1  # a bug: rerun with --debug


async def run_until_signalled(start: Callable[[], Awaitable[Node]]) -> None:
    node = await start()
    # Start-up objects (modules, messages, config) never die: keep the collector from walking
    # them on every push (bench: ~30% less server CPU per push at 5,000 streams).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await node.stop()


async def start_node(settings: Settings) -> Node:
    """Build and start a node; when the start fails, stop what did start (Raft, the xDS server)
    before raising, so that the data directory and the ports are free again.

    The node's modules (Raft, xDS, the API, the probes' clients: ~1.5 s of imports) are loaded
    here, after the config was read and checked: a refused start says why at once."""
    from repstage_mesh.node import Node

    node = Node(settings)
    node.on_apply(_replicated_conflicts(settings))
    try:
        await node.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await node.stop()
        raise
    return node


def _replicated_conflicts(settings: Settings) -> Callable[[MeshState], None]:
    """An apply listener that logs, once each, the replicated services whose ports this
    config gives to the fence or admin listeners (config/checks.replicated_problems)."""
    deployment = settings.deployment()
    logged: set[str] = set()
    seen = -1

    def check(state: MeshState) -> None:
        nonlocal seen
        if state.last_change == seen:
            return
        seen = state.last_change
        for problem in replicated_problems((s.spec for s in state.services.values()), deployment):
            if problem.message not in logged:
                logged.add(problem.message)
                log.error("%s: %s", problem.field, problem.message)

    return check


# CPython's GIL switch interval for a serving node (default 5 ms). The event loop and pysyncobj's
# tick thread hand work to each other on every commit (a pipe write wakes the tick thread, a
# self-pipe write wakes the loop); with 5 ms, a thread that needs the GIL back can wait up to
# 5 ms behind the other's CPU work. Measured with bench/rest_latency.py (3 nodes, load 7-10,
# alternated): an announce sent to a follower p50 43-44 ms -> 28-29 ms, to the leader 29 -> 22-23 ms.
SWITCH_INTERVAL = 0.001


def serve_main(args: Any) -> int:
    """`repstage-mesh serve --config FILE [--debug]`."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    debug = bool(getattr(args, "debug", False))
    fmt = getattr(args, "log_format", None)  # --log-format wins over the file's log.format
    logs.configure(fmt or "text", "debug" if debug else "info")
    source = getattr(args, "config", None)
    try:
        settings = load_config(source)
        # the same checks as `validate`, then whether the ports are free, before anything starts
        problems = [*startup_problems(settings), *bind_problems(settings)]
        if problems:
            raise ConfigError(problems, source)
    except ConfigError as exc:
        for field, message in exc.errors:
            _start_error(f"{field}: {message}" if field else message, exc.source)
        return EXIT_REFUSED
    logs.configure(fmt or settings.log.format, "debug" if debug else settings.log.level)
    try:
        asyncio.run(run_until_signalled(lambda: start_node(settings)))
    except (MeshError, OSError) as exc:
        if debug:
            log.exception("the node could not start")
        named: str | None = getattr(exc, "field", None)
        _start_error(f"{named}: {exc}" if named else str(exc), source)
        return EXIT_REFUSED
    except Exception as exc:
        if debug:
            raise
        _start_error(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", source)
        return EXIT_UNEXPECTED
    return 0


def _start_error(message: str, source: str | None) -> None:
    """One line on stderr: `error: FILE: FIELD: what is wrong; what to do`."""
    where = f"{source}: " if source and source not in message else ""
    sys.stderr.write(f"error: {where}{' '.join(message.split())}\n")
