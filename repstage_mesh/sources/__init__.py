"""Leadership sources: who is the primary of each service, learned from probes or Consul.

- `probers.py`: a prober per kind (Redis ROLE, PostgreSQL, HTTP, TCP), `make_prober`, `probe_once`;
- `probes.py`: `ProbeRunner`, the probe source (a task per member, debounced by ProbeTracker);
- `consul.py`: `ConsulSource` (blocking queries on Consul's health API) and `ConsulRegistration`;
- `supervisor.py`: `KeyedTasks`, the keyed-task supervision and delivery both sources share.
"""

from repstage_mesh.sources.consul import ConsulRegistration, ConsulSource
from repstage_mesh.sources.probes import ProbeRunner

__all__ = ["ConsulRegistration", "ConsulSource", "ProbeRunner"]
