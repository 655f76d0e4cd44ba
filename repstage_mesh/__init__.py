"""RepStage Mesh: a Raft-replicated Envoy xDS control plane that keeps traffic on the current primary."""

__version__ = "0.1.0"
