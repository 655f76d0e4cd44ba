"""`repstage-mesh`: the operator CLI.

Client commands talk to a node's REST API (`--api URL`, env REPSTAGE_API, default
http://127.0.0.1:8080; token from `--token` or REPSTAGE_TOKEN): `status`, `services`,
`proxies`, `switchover`, `failovers`, `announce` (for an orchestrator's callback, e.g.
Patroni's on_role_change), `apply FILE [--dry-run]` (the file's services through the API).
`validate CONFIG` checks a config file offline. `serve`,
`bootstrap` and `demo` hand over to their modules (imported lazily).

Output: rich tables, or JSON with `--json` (for scripts). Errors go to stderr as
`error: <message> (field: x)`; exit status 0 ok, 1 error, 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from repstage_mesh.cli import views as render
from repstage_mesh.cli.apply import cmd_apply
from repstage_mesh.cli.client import (
    API_ENV,
    DEFAULT_API,
    TOKEN_ENV,
    ApiClient,
    ApiRequestError,
    ApiUnreachable,
)
from repstage_mesh.cli.output import EXIT_ERROR, EXIT_OK, EXIT_USAGE, CliError, Output, path_segment

# --- parser ---------------------------------------------------------------------------------------


def _client_options(suppress: bool) -> argparse.ArgumentParser:
    """--api/--token/--json/--timeout, accepted before or after the subcommand."""
    default: Any = argparse.SUPPRESS if suppress else None
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("API options")
    group.add_argument(
        "--api",
        metavar="URL",
        default=default,
        help=f"API of a control-plane node (env {API_ENV}; default {DEFAULT_API})",
    )
    group.add_argument(
        "--token", metavar="TOKEN", default=default, help=f"bearer token (env {TOKEN_ENV})"
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print JSON instead of tables",
    )
    group.add_argument("--timeout", type=float, metavar="SECONDS", default=default,
                       help="HTTP timeout (default 10)")  # fmt: skip
    return parent


if TYPE_CHECKING:  # what add_subparsers() returns: generic for the type checker only
    Subcommands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
Parents = list[argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repstage-mesh",
        description="RepStage Mesh: keep client traffic on the current primary of a replicated service.",
        parents=[_client_options(suppress=False)],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = [_client_options(suppress=True)]
    _add_read_commands(sub, common)
    _add_switchover(sub, common)
    _add_announce(sub, common)
    sub.add_parser("failovers", parents=common, help="recent failovers and switchovers")
    validate = sub.add_parser(
        "validate", parents=common, help="check a config file; exit 1 on errors"
    )
    validate.add_argument("config", metavar="CONFIG")
    apply = sub.add_parser(
        "apply", parents=common,
        help="show how a config file's services differ from the replicated ones and apply them (PUT)",
    )
    apply.add_argument("config", metavar="FILE")
    apply.add_argument("--dry-run", action="store_true", help="show the differences, change nothing")
    serve = sub.add_parser("serve", help="run a control-plane node")
    serve.add_argument("--config", metavar="FILE", required=True, help="YAML config file")
    _add_bootstrap(sub)
    _add_demo(sub)
    return parser


def _add_read_commands(sub: Subcommands, common: Parents) -> None:
    """status, services [list | get NAME], proxies."""
    sub.add_parser("status", parents=common, help="cluster, services and proxies at a glance")

    services = sub.add_parser("services", parents=common, help="list services, or show one")
    services_sub = services.add_subparsers(dest="services_command", metavar="ACTION")
    services_sub.add_parser("list", parents=common, help="list services (the default)")
    get = services_sub.add_parser(
        "get", parents=common, help="show one service with its members' roles"
    )
    get.add_argument("name", metavar="NAME")

    sub.add_parser(
        "proxies", parents=common, help="Envoy proxies and the versions they ACKed or NACKed"
    )


def _add_switchover(sub: Subcommands, common: Parents) -> None:
    switch = sub.add_parser("switchover", parents=common, help="make another member the primary")
    switch.add_argument("service", metavar="SERVICE")
    target = switch.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="MEMBER", help="the member to make primary")
    target.add_argument(
        "--no-primary",
        action="store_true",
        help="clear the primary: the primary listener refuses connections (fail closed)",
    )
    switch.add_argument(
        "--epoch",
        type=int,
        metavar="N",
        help="claimed epoch; refused unless greater than the current one",
    )
    switch.add_argument("--cause", default="cli switchover", help="recorded with the change")  # fmt: skip


PRIMARY_ROLES = ("primary", "master")  # Patroni >= 3 says primary, Patroni 2 master


def _add_announce(sub: Subcommands, common: Parents) -> None:
    announce = sub.add_parser(
        "announce",
        parents=common,
        help="announce that MEMBER is now the primary (an orchestrator's callback, e.g. Patroni's on_role_change)",
        description=(
            "POST /v1/services/SERVICE/primary {member: MEMBER}. Used as Patroni's on_role_change "
            "callback, Patroni appends ACTION ROLE SCOPE: the member is announced only when ROLE "
            "is primary (or master); any other role is printed and nothing is sent."
        ),
    )
    announce.add_argument("service", metavar="SERVICE")
    announce.add_argument("member", metavar="MEMBER")
    announce.add_argument(
        "callback",
        nargs="*",
        metavar="ACTION ROLE SCOPE",
        help="what Patroni appends to a callback command (e.g. on_role_change primary pg-cluster)",
    )
    announce.add_argument(
        "--epoch", type=int, metavar="N",
        help="fencing token the orchestrator claims (e.g. Patroni's term); refused unless newer",
    )  # fmt: skip
    announce.add_argument("--cause", help="recorded with the change (default: names the callback)")
    announce.add_argument(
        "--retry-for", type=float, default=10.0, metavar="SECONDS",
        help="keep retrying while the API cannot be reached, up to this long (default 10)",
    )  # fmt: skip


def _add_bootstrap(sub: Subcommands) -> None:
    boot = sub.add_parser(
        "bootstrap", help="print an Envoy bootstrap pointing at the control plane"
    )
    boot.add_argument("--node-id", required=True, help="Envoy node id")
    boot.add_argument(
        "--node-cluster", default=None, help="Envoy node cluster (default: the node id)"
    )
    boot.add_argument(
        "--xds",
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="a control-plane xDS address; repeat for each node",
    )
    boot.add_argument(
        "--admin-port", type=int, default=9901, metavar="N", help="Envoy admin port (default 9901)"
    )
    boot.add_argument(
        "--delta", action="store_true", help="use Delta xDS (DELTA_GRPC) instead of SotW"
    )
    boot.add_argument("--out", metavar="FILE", default=None, help="write to FILE instead of stdout")  # fmt: skip
    boot.add_argument("--keepalive-interval", type=float, default=None, metavar="SECONDS",
                      help="HTTP/2 PING interval on the xDS connection (default 0.5)")  # fmt: skip
    boot.add_argument("--keepalive-timeout", type=float, default=None, metavar="SECONDS",
                      help="leave a control-plane node whose PING is unanswered this long (default 0.25)")  # fmt: skip
    for flag, what in (
        ("--xds-tls-cert", "this Envoy's client certificate (its SAN names the node id)"),
        ("--xds-tls-key", "the client certificate's private key"),
        ("--xds-tls-ca", "the CA that signed the control plane's certificate"),
    ):
        boot.add_argument(flag, metavar="FILE", default=None, help=f"mTLS to the control plane: {what}")
    boot.add_argument(
        "--xds-tls-server-name", metavar="NAME", default=None,
        help="SNI, and the DNS SAN the control plane's certificate must carry",
    )


def _add_demo(sub: Subcommands) -> None:
    demo = sub.add_parser("demo", help="run the self-contained demo")
    demo.add_argument("--keep", action="store_true", help="keep running after the scripted part")
    demo.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS", help="stop after SECONDS"
    )


def _error(message: str, field: str | None = None) -> None:
    suffix = f" (field: {field})" if field else ""
    sys.stderr.write(f"error: {message}{suffix}\n")


# --- client commands ------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> ApiClient:
    api = args.api or os.environ.get(API_ENV) or DEFAULT_API
    token = args.token or os.environ.get(TOKEN_ENV) or None
    return ApiClient(api, token, timeout=args.timeout or 10.0)


_path = path_segment


def cmd_status(args: argparse.Namespace, client: ApiClient, out: Output) -> int:
    cluster = client.get("/v1/cluster")
    services = client.get("/v1/services")
    proxies = client.get("/v1/proxies")
    data = {"api": client.base_url, "cluster": cluster, "services": services["services"],
            "applied_index": services["applied_index"], "proxies": proxies}  # fmt: skip
    out.show(
        data,
        render.cluster_table(cluster),
        render.drift_text(cluster),
        render.services_table(services["services"], services["applied_index"]),
        render.proxies_table(proxies),
    )
    return EXIT_OK


def cmd_services(args: argparse.Namespace, client: ApiClient, out: Output) -> int:
    if args.services_command == "get":
        service = client.get(f"/v1/services/{_path(args.name)}")
        out.show(service, render.service_detail(service))
        return EXIT_OK
    services = client.get("/v1/services")
    out.show(services, render.services_table(services["services"], services["applied_index"]))
    return EXIT_OK


def cmd_proxies(args: argparse.Namespace, client: ApiClient, out: Output) -> int:
    proxies = client.get("/v1/proxies")
    out.show(proxies, render.proxies_table(proxies))
    return EXIT_OK


def wait_for_catch_up(client: ApiClient, change: Mapping[str, Any], out: Output, timeout: float = 10.0) -> list[str]:
    """After an announced change, wait until every connected proxy holds it (synced at a
    snapshot at or after the change), showing progress; returns the proxies still behind."""
    target = int(change.get("applied_index") or change.get("epoch") or 0)
    deadline = time.monotonic() + timeout
    behind: list[str] = []
    with out.console.status("waiting for the proxies to follow...", spinner="dots") as status:
        while True:
            proxies = [p for p in client.get("/v1/proxies") if p.get("connected")]
            behind = [
                str(p["node_id"]) for p in proxies
                if not p.get("synced") or int(p.get("snapshot_version") or 0) < target
            ]
            status.update(f"proxies following the change: {len(proxies) - len(behind)}/{len(proxies)}")
            if not behind or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # polling the server
    if behind:
        _error(f"{len(behind)} proxy(ies) had not followed after {timeout:g}s: {', '.join(behind)}")
    return behind


def _orchestrated(client: ApiClient, service: str) -> bool:
    svc = client.get(f"/v1/services/{_path(service)}")
    return bool(svc.get("spec", {}).get("leadership", {}).get("mode") == "orchestrate")


def cmd_switchover(args: argparse.Namespace, client: ApiClient, out: Output) -> int:
    if args.to is not None and args.epoch is None and _orchestrated(client, args.service):
        return _planned_switchover(args, client, out)
    body: dict[str, Any] = {"member": None if args.no_primary else args.to, "cause": args.cause}
    if args.epoch is not None:
        body["epoch"] = args.epoch
    change = client.post(f"/v1/services/{_path(args.service)}/primary", body)
    behind: list[str] = []
    if change.get("changed") and not out.as_json:
        behind = wait_for_catch_up(client, change, out)
    out.show(change, render.switchover_text(change))
    return EXIT_ERROR if behind else EXIT_OK


def _planned_switchover(args: argparse.Namespace, client: ApiClient, out: Output) -> int:
    """Orchestrate mode: the leader waits for the target to catch up, fences the old primary,
    promotes the target and routes to it; progress is read from /v1/failovers meanwhile."""
    import threading

    result: dict[str, Any] = {}

    from repstage_mesh.api.peers import FORWARD_MARGIN

    def run() -> None:
        # The timeout chain (README "Timeouts"): the leader answers within SWITCHOVER_WAIT, a
        # forwarding follower waits FORWARD_MARGIN longer, this client twice that.
        waiting = ApiClient(client.base_url, client.token,
                            timeout=max(client.timeout, SWITCHOVER_WAIT + 2 * FORWARD_MARGIN))  # fmt: skip
        body = {"to": args.to, "timeout": SWITCHOVER_CATCHUP, "wait": SWITCHOVER_WAIT}
        try:
            result["record"] = waiting.post(f"/v1/services/{_path(args.service)}/switchover", body)
        except ApiRequestError as exc:
            running = exc.details[0] if exc.code == "switchover_running" and exc.details else None
            if isinstance(running, Mapping) and running.get("id"):
                result["record"] = _follow(client, str(running["id"]))
            else:
                result["error"] = exc
        except ApiUnreachable as exc:
            result["error"] = CliError(
                f"{exc}; if the request was sent, the switchover may be running: see "
                "`repstage-mesh failovers`"
            )
        except Exception as exc:  # reported below
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    if out.as_json:
        worker.join()
    else:
        with out.console.status(f"switchover of {args.service} to {args.to}...", spinner="dots") as status:
            while worker.is_alive():
                worker.join(0.1)
                with contextlib.suppress(Exception):
                    running = [
                        r for r in client.get("/v1/failovers").get("failovers", [])
                        if r.get("service") == args.service and r.get("status") == "running"
                    ]
                    if running and running[0].get("timeline"):
                        last = running[0]["timeline"][-1]
                        status.update(f"switchover of {args.service} to {args.to}: {last['name']} (+{last['elapsed_ms']:.0f} ms)")
    if "error" in result:
        raise result["error"]
    record = result["record"]
    if record.get("status") == "failed":
        raise CliError(f"switchover {record.get('id')} failed: {record.get('reason')}")
    lines = [f"{e['name']:<22} +{e['elapsed_ms']:.1f} ms" for e in record.get("timeline", [])]
    summary = (
        f"{args.service}: {record.get('old_primary')} -> {record.get('new_primary')} at epoch {record.get('epoch')}; "
        f"writes unavailable {record.get('write_unavailable_ms')} ms"
    )
    out.show(record, summary, "\n".join(lines))
    return EXIT_OK


def cmd_announce(args: argparse.Namespace, client: ApiClient, out: Output) -> int:
    """Announce MEMBER as SERVICE's primary; as a Patroni callback, only for a primary role."""
    cause = args.cause or "announce"
    if args.callback:
        if len(args.callback) != 3:
            raise CliError(
                "after SERVICE MEMBER expected nothing or ACTION ROLE SCOPE (what Patroni appends "
                f"to a callback), got {' '.join(args.callback)!r}"
            )
        action, role, scope = args.callback
        if role not in PRIMARY_ROLES:
            out.show({"announced": False, "member": args.member, "role": role},
                     f"{args.member} is now {role} ({action}, {scope}): nothing to announce")
            return EXIT_OK
        cause = args.cause or f"patroni {action}: {args.member} is {role} in {scope}"
    if args.epoch is not None and args.epoch < 1:
        raise CliError(f"--epoch must be at least 1, got {args.epoch}")
    if args.retry_for < 0:
        raise CliError(f"--retry-for must not be negative, got {args.retry_for:g}")
    body: dict[str, Any] = {"member": args.member, "cause": cause}
    if args.epoch is not None:
        body["epoch"] = args.epoch
    deadline = time.monotonic() + args.retry_for
    while True:
        try:
            change = client.post(f"/v1/services/{_path(args.service)}/primary", body)
            break
        except ApiUnreachable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)  # retry pacing while the API is unreachable
    out.show(change, render.switchover_text(change))
    return EXIT_OK


SWITCHOVER_CATCHUP = 300.0  # seconds the leader waits for the target to catch up
SWITCHOVER_WAIT = 120.0  # seconds the API holds the request (capped by the node's api.switchover_wait)
FOLLOW_LIMIT = 3600.0  # seconds the CLI follows a switchover still running after SWITCHOVER_WAIT


def _follow(client: ApiClient, record_id: str) -> dict[str, Any]:
    """A switchover outlived the request: follow its record until it ends."""
    deadline = time.monotonic() + FOLLOW_LIMIT
    while True:
        record = dict(client.get(f"/v1/failovers/{_path(record_id)}"))
        if record.get("status") != "running":
            return record
        if time.monotonic() > deadline:
            raise CliError(f"switchover {record_id} still running after {FOLLOW_LIMIT:g} s; "
                           f"follow it with `repstage-mesh failovers`")  # fmt: skip
        time.sleep(0.5)  # polling the server


def cmd_failovers(args: argparse.Namespace, client: ApiClient, out: Output) -> int:
    try:
        failovers = client.get("/v1/failovers")
    except ApiRequestError as exc:
        if exc.status == 404:
            raise CliError(
                f"the server at {client.base_url} does not support /v1/failovers yet (it answered 404)"
            ) from None
        raise
    rows = failovers if isinstance(failovers, list) else failovers.get("failovers", [])
    records = all(isinstance(r, Mapping) and "id" in r and "status" in r for r in rows)
    out.show(failovers, render.failovers_table(rows) if records else render.generic_table("Failovers", rows))
    return EXIT_OK


# --- offline commands -----------------------------------------------------------------------------


def _validate_summary(settings: Any, config: str) -> dict[str, Any]:
    """What `validate --json` prints for a valid config (tokens by name, never their value)."""
    tokens = settings.api.tokens
    entries = tokens.entries() if tokens else ()
    return {
        "valid": True,
        "config": config,
        "node": settings.node.id,
        "xds": settings.xds.listen,
        "api": {
            "listen": settings.api.listen,
            "auth": bool(entries),
            "read_write_tokens": sum(t.role == "read_write" for t in entries),
            "read_only_tokens": sum(t.role == "read_only" for t in entries),
            "token_names": [t.name for t in entries],
            "tls": settings.api.tls is not None,
        },
        "hooks": sorted(settings.hooks),
        "secrets": sorted(settings.secrets),
        "raft": {"bind": settings.raft.bind, "peers": list(settings.raft.peers)},
        "advertised": {"api": settings.api.advertised(), "xds": settings.xds.advertised(),
                       "raft": settings.raft.identity},
        "services": [s.model_dump(mode="json") for s in settings.specs()],
    }


def cmd_validate(args: argparse.Namespace, out: Output) -> int:
    try:
        from repstage_mesh.config import ConfigError, load_config, startup_problems
    except ImportError:
        raise CliError(
            "config support is not available in this build (repstage_mesh.config is missing)"
        ) from None
    # REPSTAGE_API / REPSTAGE_TOKEN configure this CLI, not the node: keep them out of the config.
    env = {k: v for k, v in os.environ.items() if k not in (API_ENV, TOKEN_ENV)}
    try:
        settings = load_config(args.config, env=env)
        # what serve checks before it starts anything (a config that validates starts)
        problems = startup_problems(settings, env)
        if problems:
            raise ConfigError(problems, args.config)
    except ConfigError as exc:
        if out.as_json:
            errors = [{"field": path or None, "message": message} for path, message in exc.errors]
            out.json({"valid": False, "config": args.config, "errors": errors})
        else:
            sys.stderr.write(
                f"{args.config}: invalid configuration ({len(exc.errors)} problem(s))\n"
            )
            for path, message in exc.errors:
                _error(message, path or None)
        return EXIT_ERROR
    summary = _validate_summary(settings, args.config)
    services = summary["services"]
    entries = summary["api"]["token_names"]
    if out.as_json:
        out.json(summary)
        return EXIT_OK
    auth = "on" if entries else "off (loopback only)"
    out.console.print(f"[green]{args.config}: valid[/green]")
    out.console.print(
        f"node {settings.node.id}; xds {settings.xds.listen}; api {settings.api.listen} (auth {auth}); "
        f"raft {settings.raft.bind} with {len(settings.raft.peers)} peer(s); {len(services)} service(s)",
        markup=False,
    )
    advertised = summary["advertised"]
    out.console.print(f"advertised: api {advertised['api']}, xds {advertised['xds']}, raft {advertised['raft']}",
                      markup=False)  # fmt: skip
    views = [
        {**s, "epoch": "-", "members": [{**m, "role": "primary" if m["name"] == s.get("primary") else "replica"}
                                        for m in s["members"]]}
        for s in services
    ]  # fmt: skip
    out.console.print(render.services_table(views))
    return EXIT_OK


_DELEGATES: dict[str, tuple[str, str]] = {
    "serve": ("repstage_mesh.cli.serve", "serve_main"),
    "bootstrap": ("repstage_mesh.cli.bootstrap", "main"),
    "demo": ("repstage_mesh.cli.demo", "main"),
}


def _delegate(command: str, args: argparse.Namespace) -> int:
    module_name, function = _DELEGATES[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise CliError(
                f"`repstage-mesh {command}` is not available in this build yet ({module_name} is missing)"
            ) from None
        raise
    result = getattr(module, function)(args)
    return int(result or 0)


ClientCommand = Callable[[argparse.Namespace, ApiClient, Output], int]
CLIENT_COMMANDS: dict[str, ClientCommand] = {
    "status": cmd_status,
    "services": cmd_services,
    "proxies": cmd_proxies,
    "switchover": cmd_switchover,
    "announce": cmd_announce,
    "failovers": cmd_failovers,
    "apply": cmd_apply,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(list(argv) if argv is not None else None)
        if extra:  # Patroni appends ACTION ROLE SCOPE after the options of an announce
            if args.command != "announce" or any(a.startswith("-") for a in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.callback = [*args.callback, *extra]
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command in _DELEGATES:
        try:
            return _delegate(args.command, args)
        except CliError as exc:
            _error(str(exc))
            return EXIT_ERROR
    out = Output(as_json=bool(getattr(args, "json", False)))
    try:
        if args.command == "validate":
            return cmd_validate(args, out)
        client = _client(args)
        return CLIENT_COMMANDS[args.command](args, client, out)
    except ApiRequestError as exc:
        _error(exc.message, exc.field)
        return EXIT_ERROR
    except (ApiUnreachable, CliError) as exc:
        _error(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
