"""Leadership sources: who is the primary of each service, learned from probes or Consul.

- `probers.py`: a prober per kind (Redis ROLE, PostgreSQL, HTTP, TCP), `make_prober`, `probe_once`;
- `probes.py`: `ProbeRunner`, the probe source (a task per member, debounced by ProbeTracker);
- `consul.py`: `ConsulSource` (blocking queries on Consul's health API);
- `consul_health.py`: what a Consul health answer says about each member (sans-IO);
- `consul_registration.py`: `ConsulRegistration`, this node's own registration, kept in Consul;
- `supervisor.py`: `KeyedTasks`, the keyed-task supervision and delivery both sources share.
"""

from repstage_mesh.sources.consul import ConsulSource
from repstage_mesh.sources.consul_registration import ConsulRegistration
from repstage_mesh.sources.probes import ProbeRunner

__all__ = ["ConsulRegistration", "ConsulSource", "ProbeRunner"]
