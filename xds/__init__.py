"""Generic xDS delivery: sans-IO stream protocol, versioned cache, grpcio server, proxy tracker.

Knows nothing of RepStage's domain; imports only envoy_data_plane.
"""
