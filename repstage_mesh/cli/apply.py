"""`repstage-mesh apply FILE [--dry-run]`: the file's services through the API."""

from __future__ import annotations

import argparse
import os

from rich.text import Text

from repstage_mesh.cli.client import API_ENV, TOKEN_ENV, ApiClient
from repstage_mesh.cli.output import EXIT_OK, CliError, Output, path_segment


def cmd_apply(args: argparse.Namespace, client: ApiClient, out: Output) -> int:
    """Show how the file's services differ from the replicated ones; PUT the changed and the
    missing ones (unless --dry-run). Services only in the replicated state are left alone."""
    from repstage_mesh.config import ConfigError, load_config
    from repstage_mesh.config.drift import diff_lines, drift
    from repstage_mesh.core.models import ServiceSpec

    env = {k: v for k, v in os.environ.items() if k not in (API_ENV, TOKEN_ENV)}
    try:
        settings = load_config(args.config, env=env)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    views = client.get("/v1/services")["services"]
    replicated = {str(v["name"]): ServiceSpec.model_validate(v["spec"]) for v in views}
    items = drift(settings.specs(), replicated)
    todo = [i for i in items if i.kind in ("changed", "missing")]
    applied: list[str] = []
    lines = [line for item in items for line in diff_lines(item)] or ["no differences"]
    if not args.dry_run:
        for item in todo:
            spec = settings.service(item.service)
            assert spec is not None
            body = spec.spec.model_dump(mode="json")
            if item.kind == "changed":  # the file's primary is only an initial one
                body["primary"] = replicated[item.service].primary
            client.put(f"/v1/services/{path_segment(item.service)}", body)
            applied.append(item.service)
    verdict = ("dry run: nothing applied" if args.dry_run
               else f"applied: {', '.join(applied)}" if applied else "nothing to apply")  # fmt: skip
    if any(i.kind == "unmanaged" for i in items):
        verdict += " (services not in the file are left as they are)"
    data = {"config": args.config, "dry_run": bool(args.dry_run), "applied": applied,
            "drift": [i.as_dict() for i in items]}  # fmt: skip
    out.show(data, Text("\n".join(lines)), Text(verdict))
    return EXIT_OK
