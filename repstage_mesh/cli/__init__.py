"""The `repstage-mesh` command line: commands and their tables, the HTTP client, `bootstrap`, and
the `demo` with its Redis writer."""
