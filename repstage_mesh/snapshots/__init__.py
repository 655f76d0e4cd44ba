"""Snapshots coordinated by the mesh (issue 16). `actions/` takes, stores and verifies them."""
