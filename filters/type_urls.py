"""Type URLs of the resources RepStage Mesh serves, and `pack`, which wraps a message in an `Any`.

`pack` is what `google.protobuf.Any.pack` does minus the message-pool lookup on every call:
the type URL comes from the pool once per message class (cached), the payload is `bytes(message)`.
"""

from __future__ import annotations

from functools import cache

import betterproto2
from envoy_data_plane.google.protobuf import Any
from envoy_data_plane.message_pool import default_message_pool

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
CLUSTER_LOAD_ASSIGNMENT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_CONFIGURATION = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# In the order Envoy wants them pushed (go-control-plane's ResponseOrder): clusters before their
# endpoints, listeners before their routes.
RESOURCE_ORDER: tuple[str, ...] = (CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION)


@cache
def type_url_of(message_class: type[betterproto2.Message]) -> str:
    """The type URL registered for `message_class` (KeyError when it was never registered)."""
    return default_message_pool.type_to_url[message_class]


def pack(message: betterproto2.Message) -> Any:
    """Wrap `message` in an `Any` (same result as `Any.pack`)."""
    return Any(type_url=type_url_of(type(message)), value=bytes(message))
