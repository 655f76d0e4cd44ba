"""Snapshots the Raft leader coordinates: a sans-IO workflow (`workflow.py`), the member choice
(`choice.py`), its I/O edges (`edges.py`) and the leader's runner (`runner.py`). The actions
themselves (Redis, PostgreSQL, filesystem, storage) live in `actions/` behind `actions/base.py`."""
