"""Builders for how one service's traffic is shaped in Envoy (listeners, clusters, endpoints, bootstrap)."""
