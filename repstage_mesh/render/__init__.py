"""Replicated state to Envoy resources: options.py (how this deployment renders, no Envoy import)
and envoy.py (the pure, deterministic render function)."""
